"""DepthSplat's depth predictor: a multi-view cost volume fused with DINOv2 features, refined by a DPT head.

Parts shared with MVSplat are MVSplat's own modules: UniMatch's CNN and the multi-view transformer
(:mod:`..mvsplat.backbone`), the plane-sweep correlation (:mod:`..mvsplat.cost_volume`) and the U-Net with
cross-view attention (:mod:`..mvsplat.unet`, here in its pre-norm form). Attribute names follow the official
``DepthPredictorMultiView`` (``backbone``, ``transformer``, ``pretrained``, ``regressor``, ``regressor_residual``,
``depth_head``, ``upsampler``), so checkpoint keys map one to one; ``regressor``, ``regressor_residual`` and
``depth_head`` are lists over the depth scales (one in the single-scale models).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from ..mvsplat.backbone import CNNEncoder, MultiViewTransformer, attend_across_views, imagenet_normalise
from ..mvsplat.cost_volume import correlation_volume, disparity_candidates, feature_grid_intrinsics
from ..mvsplat.unet import UNet
from .dpt import DPTHead
from .monocular import VITS, create_dinov2, monocular_maps

# Attention windows per side of the multi-view feature map (hard-coded in the official encoder).
ATTENTION_SPLITS = 2


@dataclass(frozen=True)
class DepthSplatCfg:
    """One released DepthSplat configuration (single depth scale).

    Attributes:
        vit: DINOv2 size, ``vits`` / ``vitb`` / ``vitl``.
        downsample_factor: resolution of the CNN features and the cost volume, 1/4 or 1/8 of the image
            (``upsample_factor`` = ``lowest_feature_resolution`` in the official configuration).
        depth_fusion_channels, feature_fusion_channels: the two DPT heads' widths (per ViT size).
        scale_max: upper clamp of the Gaussians' scales (3 for RE10K, 0.1 for the RE10K+DL3DV models).
        size_multiple: image height and width must be multiples of this (the data shim's crop).
    """

    vit: str = "vits"
    downsample_factor: int = 4
    depth_fusion_channels: int = 32
    feature_fusion_channels: int = 64
    scale_max: float = 3.0
    size_multiple: int = 16
    feature_channels: int = 128
    depth_candidates: int = 128
    unet_channels: int = 128
    unet_levels: int = 3
    unet_attention: tuple[int, ...] = (4,)
    regressor_channels: int = 64
    sh_degree: int = 2
    views: int = 2


@dataclass
class DepthPrediction:
    """The depth predictor's outputs, ``(b v)``-flattened, plus the features the Gaussian branch reuses.

    Attributes:
        depths: ``[BV, 1, H, W]`` depth, 1 / the clamped refined inverse depth.
        confidence: ``[BV, 1, h, w]`` the cost volume's pdf maximum, at the multi-view resolution.
        mono: the four DINOv2 maps at 1/8.
        cnn: the CNN's three outputs.
        multiview: ``[BV, 128, h, w]`` transformer features.
    """

    depths: Float[Tensor, "BV 1 H W"]
    confidence: Float[Tensor, "BV 1 h w"]
    mono: list[Tensor]
    cnn: tuple[Tensor, Tensor, Tensor]
    multiview: Float[Tensor, "BV C h w"]


def relative_poses_per_view(camera_to_world: Float[Tensor, "B 2 4 4"]) -> Float[Tensor, "B 2 4 4"]:
    """For each reference view i, ``E_j^-1 E_i`` with j the other view: computed afresh for both views (MVSplat's
    :func:`~..mvsplat.cost_volume.relative_poses` inverts view 0's instead)."""
    other = camera_to_world.flip(1)
    return torch.linalg.inv(other) @ camera_to_world


class DepthPredictor(nn.Module):
    def __init__(self, cfg: DepthSplatCfg) -> None:
        super().__init__()
        self.cfg = cfg
        vit = VITS[cfg.vit]
        c, d = cfg.feature_channels, cfg.depth_candidates
        # CNN features at 1/4 keep the second stage at 1/2; at 1/8 both later stages halve.
        self.backbone = CNNEncoder(c, stage_strides=(1, 2) if cfg.downsample_factor == 4 else (2, 2))
        self.transformer = MultiViewTransformer(6, c, 4)
        self.pretrained = create_dinov2(vit)
        cost_in = d + c + c + vit.channels  # correlations, CNN, transformer and DINOv2 features
        unet = cfg.unet_channels
        self.regressor = nn.ModuleList([nn.Sequential(
            nn.Conv2d(cost_in, unet, 3, padding=1),
            nn.GroupNorm(8, unet),
            nn.GELU(),
            UNet(unet, cfg.unet_levels, cfg.unet_attention, cfg.views, pre_norm=True),
            nn.Conv2d(unet, unet, 3, padding=1),
        )])
        self.regressor_residual = nn.ModuleList([nn.Conv2d(cost_in, unet, 1)])
        self.depth_head = nn.ModuleList([nn.Sequential(
            nn.Conv2d(unet, 2 * unet, 3, padding=1, padding_mode="replicate"),
            nn.GELU(),
            nn.Conv2d(2 * unet, d, 3, padding=1, padding_mode="replicate"),
        )])
        self.upsampler = DPTHead(vit.channels, cfg.depth_fusion_channels, vit.projections, cfg.downsample_factor,
                                 predicts_depth=True)

    def forward(
        self,
        images: Float[Tensor, "B V 3 H W"],
        intrinsics: Float[Tensor, "B V 3 3"],
        camera_to_world: Float[Tensor, "B V 4 4"],
        near: Float[Tensor, "B V"],
        far: Float[Tensor, "B V"],
        intermediates: dict[str, Tensor] | None = None,
    ) -> DepthPrediction:
        """Args:
            images: raw RGB in [0, 1]; intrinsics: normalised; camera_to_world: OpenCV axes.
            near, far: range of the inverse-depth candidates and of the final clamp.
            intermediates: filled with the stage-by-stage tensors (``(b v)``-flattened) if given.
        """
        cfg = self.cfg
        b, v, _, height, width = images.shape
        factor = cfg.downsample_factor
        flat = lambda x: x.reshape(b * v, *x.shape[2:])  # noqa: E731
        unflat = lambda x: x.reshape(b, v, *x.shape[1:])  # noqa: E731

        normalised = imagenet_normalise(flat(images))
        cnn = self.backbone.stages(normalised)
        trans = attend_across_views(self.transformer, unflat(cnn[2]), ATTENTION_SPLITS, intermediates)
        mono = monocular_maps(self.pretrained, VITS[cfg.vit], normalised, intermediates)
        # DINOv2's maps are at 1/8; the cost volume at 1/4 gets the last one upsampled.
        mono_features = mono[3] if factor == 8 else F.interpolate(
            mono[3], scale_factor=2, mode="bilinear", align_corners=True
        )

        h, w = cnn[2].shape[-2:]
        poses = relative_poses_per_view(camera_to_world)
        # Normalised -> image pixels -> feature-grid pixels, in two steps as the reference scales them.
        grid_intrinsics = feature_grid_intrinsics(intrinsics, height, width)
        grid_intrinsics[..., :2, :] = grid_intrinsics[..., :2, :] / factor
        disparities = disparity_candidates(flat(near), flat(far), cfg.depth_candidates).type_as(images)
        reference = flat(trans)
        correlation = correlation_volume(
            reference, flat(trans.flip(1)), flat(grid_intrinsics), flat(poses), disparities
        )
        cost_in = torch.cat([correlation, cnn[2], reference, mono_features], dim=1)
        refined = self.regressor[0](cost_in) + self.regressor_residual[0](cost_in)
        pdf = F.softmax(self.depth_head[0](refined), dim=1)  # [BV, D, h, w]
        coarse = (disparities[:, :, None, None] * pdf).sum(dim=1, keepdim=True)
        confidence = pdf.max(dim=1, keepdim=True)[0]

        residual = self.upsampler(mono, cnn, reference, coarse, intermediates, prefix="upsampler_")
        coarse_full = F.interpolate(coarse, scale_factor=factor, mode="bilinear", align_corners=True)
        disparity = (coarse_full + residual).clamp(
            1.0 / flat(far)[:, None, None, None], 1.0 / flat(near)[:, None, None, None]
        )
        if intermediates is not None:
            intermediates.update(
                cnn_half64=cnn[0], cnn_half96=cnn[1], cnn_features=cnn[2], mono_features=mono_features,
                relative_pose=poses, intrinsics_lowres_pixels=grid_intrinsics, disp_candidates=disparities,
                cost_volume=correlation, refined_cost=refined, coarse_disps=coarse, pdf_max_lowres=confidence,
                residual_disp=residual,
            )
            intermediates.update({f"mono_intermediate_{index}": x for index, x in enumerate(mono)})
        return DepthPrediction(depths=1.0 / disparity, confidence=confidence, mono=mono, cnn=cnn, multiview=reference)
