"""DepthSplat's Gaussian adapter: per-pixel depth, the image and the head's raw channels -> 3D Gaussians.

Raw channels per pixel (37 at SH degree 2): 0 opacity logit; 1-2 sub-pixel offset (x, y); 3-5 scales; 6-9
quaternion (x, y, z, w); 10-36 SH coefficients, colour-major (channel 10 + 9 c + k).

Where it differs from MVSplat's (:mod:`..mvsplat.gaussian_adapter`, whose ray, covariance and SH-rotation
functions it uses):

- the opacity is the sigmoid of a head channel, not the matching confidence;
- the depth is a z-depth: centres are ``t + z R K^-1 (u, v, 1)`` with the ray's z component 1;
- the scales are ``softplus(x - 4)`` clamped to ``[scale_min, scale_max]``, independent of depth and pixel size;
- the SH DC starts from the image: ``(RGB - 0.5) / C0`` is added after the degree damping.

``scales`` and ``rotations`` stay in the camera frame (xyzw), as MVSplat's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from ..mvsplat.gaussian_adapter import GaussianAdapter as MVSplatGaussianAdapter
from ..mvsplat.gaussian_adapter import (
    QUATERNION_EPS,
    AdapterOutput,
    pixel_rays,
    rotate_harmonics,
    world_covariances,
)

# The degree-0 real spherical harmonic, Y_0^0 = 1 / (2 sqrt(pi)).
SH_C0 = 0.28209479177387814
# Raw scales are shifted down before the softplus so that a zero output gives small Gaussians (about 0.018).
SCALE_SHIFT = 4.0


class GaussianAdapter(MVSplatGaussianAdapter):
    """Maps depth, image and raw channels to Gaussians. Parameter-free (``sh_mask``, MVSplat's damping of the
    higher SH degrees, is not persistent); one more raw channel than MVSplat's, the opacity logit."""

    def __init__(self, scale_min: float = 1e-10, scale_max: float = 3.0, sh_degree: int = 2) -> None:
        super().__init__(scale_min, scale_max, sh_degree)

    @property
    def raw_channels(self) -> int:
        return 1 + super().raw_channels

    def forward(  # type: ignore[override]  # DepthSplat's adapter reads the image, not a density
        self,
        camera_to_world: Float[Tensor, "B V 4 4"],
        intrinsics: Float[Tensor, "B V 3 3"],
        depths: Float[Tensor, "B V H W"],
        raw: Float[Tensor, "B V H W C"],
        images: Float[Tensor, "B V 3 H W"],
        with_harmonics: bool = True,
    ) -> AdapterOutput:
        """Args:
            camera_to_world: OpenCV camera-to-world transforms.
            intrinsics: normalised intrinsics (row 0 / W, row 1 / H).
            depths: per-pixel z-depth.
            raw: the head's raw channels (layout in the module docstring).
            images: RGB in [0, 1], the SH DC's starting point.
            with_harmonics: compute the SH tensor (the reconstructor does not need it).
        """
        b, v, h, w, _ = raw.shape
        opacity_logits, offsets, scale_raw, quaternions, sh = raw.split(
            (1, 2, 3, 4, 3 * self.sh_coefficients), dim=-1
        )
        rays = pixel_rays(intrinsics, offsets)
        rays = rays / rays[..., 2:]  # exactly z = 1, so that the depth is a z-depth
        directions = torch.einsum("bvij,bvhwj->bvhwi", camera_to_world[..., :3, :3], rays)
        means = camera_to_world[..., :3, 3][:, :, None, None] + directions * depths[..., None]

        scales = F.softplus(scale_raw - SCALE_SHIFT).clamp(self.scale_min, self.scale_max)
        rotations = quaternions / (quaternions.norm(dim=-1, keepdim=True) + QUATERNION_EPS)
        covariances = world_covariances(rotations, scales, camera_to_world)
        harmonics = None
        if with_harmonics:
            sh = sh.reshape(b, v, h, w, 3, self.sh_coefficients) * self.sh_mask
            sh[..., 0] = sh[..., 0] + (images.permute(0, 1, 3, 4, 2) - 0.5) / SH_C0
            harmonics = rotate_harmonics(sh, camera_to_world, self.sh_degree)
        return AdapterOutput(means, covariances, scales, rotations, harmonics, opacity_logits[..., 0].sigmoid())
