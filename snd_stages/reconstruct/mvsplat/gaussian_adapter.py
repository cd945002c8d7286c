"""MVSplat's Gaussian adapter: per-pixel depth and raw head outputs -> pixel-aligned 3D Gaussians.

Raw channels per pixel (84): 0-1 sub-pixel offset (x, y); 2-4 scale logits; 5-8 quaternion (x, y, z, w);
9-83 spherical-harmonic coefficients, colour-major (channel 9 + 25 c + k).

.. note:: Quirks of the reference, reproduced on purpose

   - The depth is used as the distance along the unit ray through the (offset) pixel, although the cost volume
     treated it as a z-depth.
   - The scale multiplier sums the x and y pixel footprints (it does not average them).
   - ``scales`` and ``rotations`` are returned in the camera frame, the quaternion in (x, y, z, w) order; only
     the covariance is rotated to the world. Conversion to snd's world-frame wxyz happens at the boundary.
   - SH degrees l >= 1 are damped by 0.1 * 0.25^l and rotated with e3nn's real Wigner-D matrices, which follow
     e3nn's basis, not the 3DGS rasteriser's.
   - The opacity is ``0.5 * ((1 - (1 - rho)) + rho)``: rho up to float32 rounding (the opacity mapping's
     exponent is 2^0 = 1 in this configuration).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from jaxtyping import Float
from torch import Tensor

# The reference's pixel-footprint multiplier of the scales.
SCALE_MULTIPLIER = 0.1
QUATERNION_EPS = 1e-8


@dataclass
class AdapterOutput:
    """Pixel-aligned Gaussians, ``[B, V, H, W, ...]``.

    Attributes:
        means: ``[..., 3]`` world positions.
        covariances: ``[..., 3, 3]`` world-frame covariances.
        scales: ``[..., 3]`` standard deviations along the Gaussian's axes.
        rotations: ``[..., 4]`` unit quaternions (x, y, z, w), camera frame (axes relative to the camera).
        harmonics: ``[..., 3, 25]`` world-frame SH coefficients (colour, coefficient), or None if not asked for.
        opacities: ``[...]`` in (0, 1).
    """

    means: Float[Tensor, "B V H W 3"]
    covariances: Float[Tensor, "B V H W 3 3"]
    scales: Float[Tensor, "B V H W 3"]
    rotations: Float[Tensor, "B V H W 4"]
    harmonics: Float[Tensor, "B V H W 3 25"] | None
    opacities: Float[Tensor, "B V H W"]


def quaternion_xyzw_to_matrix(quaternions: Float[Tensor, "*batch 4"], eps: float = QUATERNION_EPS) -> Float[Tensor, "*batch 3 3"]:
    """Rotation matrices of (x, y, z, w) quaternions, with the reference's ``2 / (|q|^2 + eps)`` factor."""
    i, j, k, r = quaternions.unbind(-1)
    two_s = 2 / ((quaternions * quaternions).sum(dim=-1) + eps)
    matrix = torch.stack(
        (
            1 - two_s * (j * j + k * k), two_s * (i * j - k * r), two_s * (i * k + j * r),
            two_s * (i * j + k * r), 1 - two_s * (i * i + k * k), two_s * (j * k - i * r),
            two_s * (i * k - j * r), two_s * (j * k + i * r), 1 - two_s * (i * i + j * j),
        ),
        dim=-1,
    )
    return matrix.reshape(*quaternions.shape[:-1], 3, 3)


def sh_rotation_matrices(rotations: Float[Tensor, "*batch 3 3"], degree: int) -> list[Float[Tensor, "*batch n n"]]:
    """e3nn's real Wigner-D matrices D^0 ... D^degree of rotation matrices, as the reference rotates SH.

    Computed on the CPU (a handful of 3x3 matrices: one per view) in the rotations' dtype and moved back, which
    also avoids e3nn versions that build their generators on the CPU whatever the input's device.
    """
    from e3nn.o3 import matrix_to_angles, wigner_D  # imported here: e3nn takes ~1.5 s to import

    device = rotations.device
    alpha, beta, gamma = matrix_to_angles(rotations.detach().cpu())
    return [wigner_D(l, alpha, beta, gamma).to(dtype=rotations.dtype, device=device) for l in range(degree + 1)]


class GaussianAdapter(nn.Module):
    """Maps depth, density and raw channels to Gaussians. Parameter-free (``sh_mask`` is not persistent)."""

    sh_mask: Tensor

    def __init__(self, scale_min: float = 0.5, scale_max: float = 15.0, sh_degree: int = 4) -> None:
        super().__init__()
        self.scale_min = scale_min
        self.scale_max = scale_max
        self.sh_degree = sh_degree
        # Biases the initial colours towards their DC term; part of the trained model's behaviour.
        mask = torch.ones((sh_degree + 1) ** 2)
        for degree in range(1, sh_degree + 1):
            mask[degree**2 : (degree + 1) ** 2] = 0.1 * 0.25**degree
        self.register_buffer("sh_mask", mask, persistent=False)

    @property
    def sh_coefficients(self) -> int:
        return (self.sh_degree + 1) ** 2

    @property
    def raw_channels(self) -> int:
        return 2 + 3 + 4 + 3 * self.sh_coefficients

    def forward(
        self,
        camera_to_world: Float[Tensor, "B V 4 4"],
        intrinsics: Float[Tensor, "B V 3 3"],
        depths: Float[Tensor, "B V H W"],
        densities: Float[Tensor, "B V H W"],
        raw: Float[Tensor, "B V H W C"],
        with_harmonics: bool = True,
    ) -> AdapterOutput:
        """Args:
            camera_to_world: OpenCV camera-to-world transforms.
            intrinsics: normalised intrinsics (row 0 / W, row 1 / H).
            depths: per-pixel depth, used as the distance along the unit ray.
            densities: per-pixel density in (0, 1).
            raw: the head's raw channels (layout in the module docstring).
            with_harmonics: compute the (large) SH tensor; the reconstructor does not need it.
        """
        b, v, h, w, _ = raw.shape
        offsets, scale_logits, quaternions, sh = raw.split((2, 3, 4, 3 * self.sh_coefficients), dim=-1)
        cameras = (slice(None), slice(None), None, None)  # broadcast [B, V, ...] over the pixels

        directions = pixel_rays(intrinsics, offsets)
        directions = directions / directions.norm(dim=-1, keepdim=True)
        directions = torch.einsum("bvij,bvhwj->bvhwi", camera_to_world[..., :3, :3], directions)
        origins = camera_to_world[..., :3, 3][cameras]
        means = origins + directions * depths[..., None]

        scales = self.scale_min + (self.scale_max - self.scale_min) * scale_logits.sigmoid()
        pixel_size = 1 / torch.tensor((w, h), dtype=raw.dtype, device=raw.device)
        footprint = torch.einsum("bvij,j->bvi", torch.linalg.inv(intrinsics[..., :2, :2]), pixel_size)
        multiplier = (SCALE_MULTIPLIER * footprint).sum(dim=-1)  # summed, not averaged: the reference's
        scales = scales * depths[..., None] * multiplier[cameras][..., None]

        rotations = quaternions / (quaternions.norm(dim=-1, keepdim=True) + QUATERNION_EPS)
        covariances = world_covariances(rotations, scales, camera_to_world)
        harmonics = None
        if with_harmonics:
            sh = sh.reshape(b, v, h, w, 3, self.sh_coefficients) * self.sh_mask
            harmonics = rotate_harmonics(sh, camera_to_world, self.sh_degree)

        # The reference's opacity mapping 0.5 (1 - (1 - rho)^e + rho^(1/e)) with exponent e = 1.
        opacities = 0.5 * (1 - (1 - densities) + densities)
        return AdapterOutput(means, covariances, scales, rotations, harmonics, opacities)


def pixel_rays(intrinsics: Float[Tensor, "B V 3 3"], offsets: Float[Tensor, "B V H W 2"]) -> Float[Tensor, "B V H W 3"]:
    """Camera-frame ``K^-1 (u, v, 1)`` (z = 1) through each pixel's centre moved by its predicted sub-pixel offset.

    ``(u, v) = ((j + 0.5) / W, (i + 0.5) / H) + (sigmoid(offset) - 0.5) / (W, H)``: up to half a pixel either
    way, in normalised image coordinates (``intrinsics`` are normalised by the image size).
    """
    h, w = offsets.shape[2:4]
    device = offsets.device
    pixel_size = 1 / torch.tensor((w, h), dtype=offsets.dtype, device=device)
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    centres = torch.stack([(cols + 0.5) / w, (rows + 0.5) / h], dim=-1)  # [H, W, 2]
    coordinates = centres + (offsets.sigmoid() - 0.5) * pixel_size
    homogeneous = torch.cat([coordinates, torch.ones_like(coordinates[..., :1])], dim=-1)
    return torch.einsum("bvij,bvhwj->bvhwi", torch.linalg.inv(intrinsics), homogeneous)


def world_covariances(
    rotations: Float[Tensor, "B V H W 4"], scales: Float[Tensor, "B V H W 3"], camera_to_world: Float[Tensor, "B V 4 4"]
) -> Float[Tensor, "B V H W 3 3"]:
    """``R (R_q diag(s)^2 R_q^T) R^T``: covariances from camera-frame xyzw quaternions and scales, in the world."""
    rotation = quaternion_xyzw_to_matrix(rotations)
    scale_matrix = scales.diag_embed()
    covariances = rotation @ scale_matrix @ scale_matrix.transpose(-1, -2) @ rotation.transpose(-1, -2)
    world_rotation = camera_to_world[..., :3, :3][:, :, None, None]
    return world_rotation @ covariances @ world_rotation.transpose(-1, -2)


def rotate_harmonics(
    sh: Float[Tensor, "B V H W 3 K"], camera_to_world: Float[Tensor, "B V 4 4"], degree: int
) -> Float[Tensor, "B V H W 3 K"]:
    """Camera-frame SH coefficients -> world frame, each degree block by e3nn's Wigner-D of the camera rotation."""
    blocks = []
    for l, matrix in enumerate(sh_rotation_matrices(camera_to_world[..., :3, :3], degree)):
        blocks.append(torch.einsum("bvij,bvhwcj->bvhwci", matrix, sh[..., l**2 : (l + 1) ** 2]))
    return torch.cat(blocks, dim=-1)
