"""The MVSplat encoder (Chen et al., ECCV 2024): two posed RGB views -> per-pixel depth and 3D Gaussians.

Layout of the module tree (and of the official checkpoint's ``encoder.*`` keys)::

    backbone            BackboneMultiview: CNN (backbone.backbone) + multi-view transformer (backbone.transformer)
    gaussian_adapter    GaussianAdapter (no parameters)
    depth_predictor     DepthPredictor: cost volume, its U-Net, the depth heads, the refinement U-Net, the
                        Gaussian head

Conventions at this module's boundary are MVSplat's, not snd's: intrinsics normalised by the image size,
OpenCV camera-to-world extrinsics, camera-frame xyzw rotations (see :mod:`..mvsplat` for the conversion).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
from jaxtyping import Float
from torch import Tensor

from .backbone import BackboneMultiview
from .depth_predictor import DepthPredictor, DepthPredictorCfg
from .gaussian_adapter import GaussianAdapter

# Images must tile into the refinement U-Net's four halvings of the full-resolution map (and the cost U-Net's
# two of the 1/4 map, and the transformer's 2 x 2 windows of the 1/4 map).
SIZE_MULTIPLE = 16
# Attention windows per side of the 1/4-resolution map (``multiview_trans_attn_split``).
ATTENTION_SPLITS = 2


@dataclass
class MVSplatOutput:
    """Everything the encoder predicts for ``B`` pairs of ``V = 2`` views of ``H x W``; Gaussian ``(v, row, col)``
    of a sample is pixel (row, col) of view v.

    Attributes:
        depths: ``[B, V, H, W]`` depth per pixel (placed along the unit ray for ``means``).
        means: ``[B, V, H, W, 3]`` world positions.
        covariances: ``[B, V, H, W, 3, 3]`` world-frame covariances.
        scales: ``[B, V, H, W, 3]`` standard deviations along the Gaussians' axes.
        rotations: ``[B, V, H, W, 4]`` unit quaternions (x, y, z, w) of those axes in the *camera* frame.
        harmonics: ``[B, V, H, W, 3, (degree + 1)^2]`` world-frame SH coefficients (degree 4: 25), or None.
        opacities: ``[B, V, H, W]``.
    """

    depths: Float[Tensor, "B V H W"]
    means: Float[Tensor, "B V H W 3"]
    covariances: Float[Tensor, "B V H W 3 3"]
    scales: Float[Tensor, "B V H W 3"]
    rotations: Float[Tensor, "B V H W 4"]
    harmonics: Float[Tensor, "B V H W 3 K"] | None
    opacities: Float[Tensor, "B V H W"]


def check_image_size(height: int, width: int) -> None:
    """Raise ``ValueError`` unless ``height`` and ``width`` are positive multiples of :data:`SIZE_MULTIPLE`."""
    if height <= 0 or width <= 0 or height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
        raise ValueError(
            f"MVSplat needs image height and width that are multiples of {SIZE_MULTIPLE}, got {height}x{width}"
        )


class MVSplatEncoder(nn.Module):
    """MVSplat's ``EncoderCostVolume`` in the RE10K configuration (2 context views, 128 depth candidates,
    SH degree 4, scales in [0.5, 15] x depth x pixel footprint)."""

    name = "mvsplat"
    size_multiple = SIZE_MULTIPLE

    def __init__(self, cfg: DepthPredictorCfg = DepthPredictorCfg()) -> None:
        super().__init__()
        self.backbone = BackboneMultiview(feature_channels=cfg.feature_channels)
        self.gaussian_adapter = GaussianAdapter(scale_min=0.5, scale_max=15.0, sh_degree=4)
        assert cfg.raw_gaussian_channels == self.gaussian_adapter.raw_channels
        self.depth_predictor = DepthPredictor(cfg)

    def forward(
        self,
        images: Float[Tensor, "B 2 3 H W"],
        intrinsics: Float[Tensor, "B 2 3 3"],
        camera_to_world: Float[Tensor, "B 2 4 4"],
        near: Float[Tensor, "B 2"],
        far: Float[Tensor, "B 2"],
        with_harmonics: bool = True,
        intermediates: dict[str, Tensor] | None = None,
    ) -> MVSplatOutput:
        """Predict depth and Gaussians for the two views of each of ``B`` samples.

        Args:
            images: RGB in [0, 1] (not ImageNet-normalised: the backbone does that itself).
            intrinsics: normalised intrinsics, row 0 divided by W and row 1 by H (pixel (i, j) at
                ((j + 0.5) / W, (i + 0.5) / H)).
            camera_to_world: OpenCV (x right, y down, z forward) camera-to-world transforms.
            near, far: the depth range of the cost volume's candidates and of the final clamp.
            with_harmonics: also compute the SH colours (``[B, 2, H, W, 3, 25]``: large at full size).
            intermediates: if given, filled with the stage-by-stage tensors, ``[B, V, ...]``: ``cnn_features``,
                ``position_embedding`` (one window, ``[C, h/2, w/2]``), ``trans_features``, ``relative_pose``,
                ``intrinsics_lowres_pixels``, ``disp_candidates``, ``cost_volume``, ``refined_cost``,
                ``coarse_disps``, ``pdf_max_lowres``, ``fullres_disps``, ``proj_feature``, ``refine_out``,
                ``raw_gaussians`` (channels first).
        """
        b, v, _, h, w = images.shape
        if v != 2:
            raise ValueError(f"MVSplat's RE10K model takes exactly 2 context views, got {v}")
        check_image_size(h, w)
        features, cnn_features = self.backbone(images, ATTENTION_SPLITS, intermediates)
        prediction = self.depth_predictor(
            features, cnn_features, images, intrinsics, camera_to_world, near, far, intermediates
        )
        gaussians = self.gaussian_adapter(
            camera_to_world, intrinsics, prediction.depths, prediction.densities, prediction.raw_gaussians,
            with_harmonics=with_harmonics,
        )
        return MVSplatOutput(
            depths=prediction.depths,
            means=gaussians.means,
            covariances=gaussians.covariances,
            scales=gaussians.scales,
            rotations=gaussians.rotations,
            harmonics=gaussians.harmonics,
            opacities=gaussians.opacities,
        )

