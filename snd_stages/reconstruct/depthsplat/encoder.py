"""The DepthSplat encoder (Xu et al., CVPR 2025): two posed RGB views -> per-pixel depth and 3D Gaussians.

Layout of the module tree (and of the official checkpoint's ``encoder.*`` keys)::

    depth_predictor     DepthPredictor: CNN (backbone), multi-view transformer (transformer), DINOv2
                        (pretrained), cost-volume regressor and depth head, DPT depth-residual head (upsampler)
    feature_upsampler   DPTHead returning full-resolution features
    gaussian_regressor  two 3x3 convolutions on [image, depth, confidence, features]
    gaussian_head       two 3x3 convolutions (replicate padding) -> the raw Gaussian channels
    gaussian_adapter    GaussianAdapter (no parameters)

Conventions at this module's boundary are DepthSplat's, not snd's: intrinsics normalised by the image size,
OpenCV camera-to-world extrinsics, camera-frame xyzw rotations (:func:`..mvsplat.reconstructor.reconstruct_pair`
converts).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from ..mvsplat.encoder import MVSplatOutput
from .depth_predictor import DepthPredictor, DepthSplatCfg
from .dpt import DPTHead
from .gaussian_adapter import GaussianAdapter
from .monocular import VITS
from .settings import MODEL_NAMES

# The released models: the authors' README overrides, each as one configuration. The DPT fusion widths follow
# the ViT size.
MODELS: dict[str, DepthSplatCfg] = {
    # depthsplat-gs-small-re10k-256x256-view2-cfeab6b1
    "small": DepthSplatCfg(),
    # depthsplat-gs-small-re10kdl3dv-448x768-randview4-10-c08188db: features and cost volume at 1/8
    "small_448x768": DepthSplatCfg(downsample_factor=8, scale_max=0.1, size_multiple=64),
    # depthsplat-gs-base-re10k-256x256-view2-ca7b6795: two depth scales, at 1/4 then 1/2
    "base": DepthSplatCfg(vit="vitb", downsample_factor=2, scales=2, depth_fusion_channels=48,
                          feature_fusion_channels=96),
    # depthsplat-gs-large-re10k-256x256-view2-e0f0f27a
    "large": DepthSplatCfg(vit="vitl", downsample_factor=2, scales=2, depth_fusion_channels=64,
                           feature_fusion_channels=128),
    # depthsplat-gs-base-re10kdl3dv-448x768-randview2-6-f8ddd845: two depth scales, at 1/8 then 1/4
    "base_448x768": DepthSplatCfg(vit="vitb", downsample_factor=4, scales=2, depth_fusion_channels=48,
                                  feature_fusion_channels=96, scale_max=0.1, size_multiple=64),
}
assert tuple(MODELS) == MODEL_NAMES, "gaussians.depthsplat.model's choices are the configurations here"


# MVSplat's output fields, with DepthSplat's meaning: ``depths`` are z-depths (the Gaussians sit at them), and
# ``harmonics`` are of degree 2 (``[B, V, H, W, 3, 9]``).
DepthSplatOutput = MVSplatOutput


def check_image_size(cfg: DepthSplatCfg, height: int, width: int) -> None:
    """Raise ``ValueError`` unless ``height`` and ``width`` are positive multiples of ``cfg.size_multiple``."""
    multiple = cfg.size_multiple
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise ValueError(f"this DepthSplat model needs image height and width that are multiples of {multiple}, "
                         f"got {height}x{width}")


class DepthSplatEncoder(nn.Module):
    """DepthSplat's ``EncoderDepthSplat`` in one of :data:`MODELS` (2 context views, 128 inverse-depth candidates,
    SH degree 2)."""

    name = "depthsplat"

    def __init__(self, cfg: DepthSplatCfg = MODELS["small"]) -> None:
        super().__init__()
        self.cfg = cfg
        self.size_multiple = cfg.size_multiple
        vit = VITS[cfg.vit]
        self.depth_predictor = DepthPredictor(cfg)
        self.feature_upsampler = DPTHead(vit.channels, cfg.feature_fusion_channels, vit.projections,
                                         cfg.downsample_factor, predicts_depth=False, scales=cfg.scales)
        self.gaussian_adapter = GaussianAdapter(scale_max=cfg.scale_max, sh_degree=cfg.sh_degree)
        features, channels = cfg.feature_fusion_channels, cfg.regressor_channels
        self.gaussian_regressor = nn.Sequential(
            nn.Conv2d(3 + 1 + 1 + features, channels, 3, padding=1),  # image, depth, confidence, features
            nn.GELU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )
        raw = self.gaussian_adapter.raw_channels
        self.gaussian_head = nn.Sequential(
            nn.Conv2d(channels + 3 + features + 1, raw, 3, padding=1, padding_mode="replicate"),
            nn.GELU(),
            nn.Conv2d(raw, raw, 3, padding=1, padding_mode="replicate"),
        )

    def forward(
        self,
        images: Float[Tensor, "B 2 3 H W"],
        intrinsics: Float[Tensor, "B 2 3 3"],
        camera_to_world: Float[Tensor, "B 2 4 4"],
        near: Float[Tensor, "B 2"],
        far: Float[Tensor, "B 2"],
        with_harmonics: bool = True,
        intermediates: dict[str, Tensor] | None = None,
    ) -> DepthSplatOutput:
        """Predict depth and Gaussians for the two views of each of ``B`` samples.

        Args:
            images: RGB in [0, 1] (not ImageNet-normalised: the encoder does that itself where it needs it).
            intrinsics: normalised intrinsics, row 0 divided by W and row 1 by H.
            camera_to_world: OpenCV (x right, y down, z forward) camera-to-world transforms.
            near, far: the range of the inverse-depth candidates and of the final clamp.
            with_harmonics: also compute the SH colours (``[B, 2, H, W, 3, 9]``).
            intermediates: if given, filled with the stage-by-stage tensors, ``(b v)``-flattened where the
                official code flattens them: ``vit_*``, ``mono_*``, ``cnn_*``, ``position_embedding``,
                ``trans_features``, ``relative_pose``, ``intrinsics_lowres_pixels``, ``disp_candidates``,
                ``cost_volume``, ``refined_cost``, ``coarse_disps``, ``pdf_max_lowres``, ``residual_disp``,
                ``upsampler_path1``, ``features_path4``, ``features``, ``regressor_out``, ``raw_gaussians``.
        """
        b, v, _, h, w = images.shape
        if v != 2:
            raise ValueError(f"DepthSplat's released models take exactly 2 context views here, got {v}")
        check_image_size(self.cfg, h, w)
        prediction = self.depth_predictor(images, intrinsics, camera_to_world, near, far, intermediates)
        features = self.feature_upsampler(
            prediction.mono, prediction.cnn, prediction.multiview, None, intermediates, prefix="features_"
        )
        raw_images = images.reshape(b * v, 3, h, w)
        # Each confidence value covers its whole cell of the feature grid (nearest neighbour).
        confidence = F.interpolate(prediction.confidence, scale_factor=self.cfg.downsample_factor, mode="nearest")
        regressed = self.gaussian_regressor(torch.cat([raw_images, prediction.depths, confidence, features], dim=1))
        raw = self.gaussian_head(torch.cat([regressed, raw_images, features, confidence], dim=1))
        if intermediates is not None:
            intermediates.update(features=features, regressor_out=regressed, raw_gaussians=raw)
        depths = prediction.depths.reshape(b, v, h, w)
        gaussians = self.gaussian_adapter(
            camera_to_world, intrinsics, depths, raw.reshape(b, v, -1, h, w).permute(0, 1, 3, 4, 2), images,
            with_harmonics=with_harmonics,
        )
        return DepthSplatOutput(depths=depths, **vars(gaussians))
