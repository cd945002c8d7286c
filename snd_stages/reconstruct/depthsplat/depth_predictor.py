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
    """One released DepthSplat configuration.

    Attributes:
        vit: DINOv2 size, ``vits`` / ``vitb`` / ``vitl``.
        downsample_factor: resolution of the finest depth scale, 1/2, 1/4 or 1/8 of the image
            (``upsample_factor`` in the official configuration).
        scales: depth scales (``num_scales``). With 2, the cost volume first runs at half the finest resolution
            (the CNN's lowest, ``lowest_feature_resolution``) over all candidates, then at the finest over a
            quarter as many, in a window around each pixel's upsampled first estimate.
        depth_fusion_channels, feature_fusion_channels: the two DPT heads' widths (per ViT size).
        scale_max: upper clamp of the Gaussians' scales (3 for RE10K, 0.1 for the RE10K+DL3DV models).
        size_multiple: image height and width must be multiples of this (the data shim's crop).
    """

    vit: str = "vits"
    downsample_factor: int = 4
    scales: int = 1
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

    @property
    def lowest_resolution(self) -> int:
        """The CNN's lowest resolution, that of the first depth scale."""
        return self.downsample_factor * 2 ** (self.scales - 1)


@dataclass
class DepthPrediction:
    """The depth predictor's outputs, ``(b v)``-flattened, plus the features the Gaussian branch reuses.

    Attributes:
        depths: ``[BV, 1, H, W]`` depth, 1 / the clamped refined inverse depth.
        confidence: ``[BV, 1, h, w]`` the finest cost volume's pdf maximum, at its resolution.
        mono: the four DINOv2 maps at 1/8.
        cnn: the CNN's three outputs.
        multiview: ``[BV, C, h, w]`` transformer features per depth scale, finest first.
    """

    depths: Float[Tensor, "BV 1 H W"]
    confidence: Float[Tensor, "BV 1 h w"]
    mono: list[Tensor]
    cnn: tuple[Tensor, Tensor, Tensor]
    multiview: list[Tensor]


def relative_poses_per_view(camera_to_world: Float[Tensor, "B 2 4 4"]) -> Float[Tensor, "B 2 4 4"]:
    """For each reference view i, ``E_j^-1 E_i`` with j the other view: computed afresh for both views (MVSplat's
    :func:`~..mvsplat.cost_volume.relative_poses` inverts view 0's instead)."""
    other = camera_to_world.flip(1)
    return torch.linalg.inv(other) @ camera_to_world


class FeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid for two scales: the map itself, and a x2 transposed convolution to half the
    channels followed by GELU and a 3x3 convolution (``stages.1.{0, 2}``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.stages = nn.ModuleList([
            nn.Sequential(),
            nn.Sequential(nn.ConvTranspose2d(channels, channels // 2, 2, stride=2), nn.GELU(),
                          nn.Conv2d(channels // 2, channels // 2, 3, padding=1)),
        ])

    def forward(self, x: Float[Tensor, "N C h w"]) -> list[Tensor]:
        return [stage(x) for stage in self.stages]


def window_candidates(
    coarse: Float[Tensor, "N 1 h w"], near: Float[Tensor, " N"], far: Float[Tensor, " N"], count: int, scale: int,
    total: int,
) -> Float[Tensor, "N D h w"]:
    """Inverse-depth candidates of a finer scale: ``count`` values spanning ``count`` intervals of the first
    scale's spacing / 2^scale around each pixel's estimate (half below, half minus one above), clamped to the
    depth range."""
    interval = ((1.0 / near - 1.0 / far) / (total - 1) / 2**scale).view(-1, 1, 1, 1)
    low = (coarse - interval * (count // 2)).clamp(min=(1.0 / far).view(-1, 1, 1, 1))
    high = (coarse + interval * (count // 2 - 1)).clamp(max=(1.0 / near).view(-1, 1, 1, 1))
    steps = torch.linspace(0.0, 1.0, count).to(coarse).view(1, count, 1, 1)
    return low + steps * (high - low)


class DepthPredictor(nn.Module):
    def __init__(self, cfg: DepthSplatCfg) -> None:
        super().__init__()
        self.cfg = cfg
        vit = VITS[cfg.vit]
        c = cfg.feature_channels
        # CNN features at 1/4 keep the second stage at 1/2; at 1/8 both later stages halve.
        self.backbone = CNNEncoder(c, stage_strides=(1, 2) if cfg.lowest_resolution == 4 else (2, 2))
        self.transformer = MultiViewTransformer(6, c, 4)
        if cfg.scales > 1:
            self.mv_pyramid = FeaturePyramid(c)
        self.pretrained = create_dinov2(vit)
        if cfg.scales > 1:
            self.mono_pyramid = FeaturePyramid(vit.channels)
        self.regressor = nn.ModuleList()
        self.regressor_residual = nn.ModuleList()
        self.depth_head = nn.ModuleList()
        for scale in range(cfg.scales):
            # Each finer scale: a quarter of the candidates, the CNN's previous stage, half-width features, a
            # half-width U-Net with one more level and attention one level deeper.
            candidates = cfg.depth_candidates // 4**scale
            cost_in = candidates + (c - 32 * scale) + c // 2**scale + vit.channels // 2**scale
            unet = cfg.unet_channels // 2**scale
            self.regressor.append(nn.Sequential(
                nn.Conv2d(cost_in, unet, 3, padding=1),
                nn.GroupNorm(8, unet),
                nn.GELU(),
                UNet(unet, cfg.unet_levels + scale, tuple(rate * 2**scale for rate in cfg.unet_attention),
                     cfg.views, pre_norm=True),
                nn.Conv2d(unet, unet, 3, padding=1),
            ))
            self.regressor_residual.append(nn.Conv2d(cost_in, unet, 1))
            self.depth_head.append(nn.Sequential(
                nn.Conv2d(unet, 2 * unet, 3, padding=1, padding_mode="replicate"),
                nn.GELU(),
                nn.Conv2d(2 * unet, candidates, 3, padding=1, padding_mode="replicate"),
            ))
        self.upsampler = DPTHead(vit.channels, cfg.depth_fusion_channels, vit.projections, cfg.downsample_factor,
                                 predicts_depth=True, scales=cfg.scales)

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
            intermediates: filled with the first scale's stage-by-stage tensors (``(b v)``-flattened) if given.
        """
        cfg = self.cfg
        b, v, _, height, width = images.shape
        flat = lambda x: x.reshape(b * v, *x.shape[2:])  # noqa: E731
        unflat = lambda x: x.reshape(b, v, *x.shape[1:])  # noqa: E731

        normalised = imagenet_normalise(flat(images))
        cnn = self.backbone.stages(normalised)
        trans = flat(attend_across_views(self.transformer, unflat(cnn[2]), ATTENTION_SPLITS, intermediates))
        mono = monocular_maps(self.pretrained, VITS[cfg.vit], normalised, intermediates)
        # DINOv2's maps are at 1/8; a cost volume at 1/4 gets the last one upsampled.
        mono_features = mono[3] if cfg.lowest_resolution == 8 else F.interpolate(
            mono[3], scale_factor=2, mode="bilinear", align_corners=True
        )
        # Per depth scale, coarsest first: CNN, transformer and DINOv2 features.
        cnn_per_scale = [cnn[2], cnn[1]][: cfg.scales]
        trans_per_scale = self.mv_pyramid(trans) if cfg.scales > 1 else [trans]
        mono_per_scale = self.mono_pyramid(mono_features) if cfg.scales > 1 else [mono_features]

        poses = relative_poses_per_view(camera_to_world)
        far_flat, near_flat = flat(far), flat(near)
        coarse = confidence = None
        for scale in range(cfg.scales):
            factor = cfg.downsample_factor * 2 ** (cfg.scales - 1 - scale)
            features = trans_per_scale[scale]
            # Normalised -> image pixels -> feature-grid pixels, in two steps as the reference scales them.
            grid_intrinsics = feature_grid_intrinsics(intrinsics, height, width)
            grid_intrinsics[..., :2, :] = grid_intrinsics[..., :2, :] / factor
            count = cfg.depth_candidates // 4**scale
            if scale == 0:
                disparities = disparity_candidates(near_flat, far_flat, count).type_as(images)
            else:
                coarse = F.interpolate(coarse, scale_factor=2, mode="bilinear", align_corners=True)
                disparities = window_candidates(coarse, near_flat, far_flat, count, scale, cfg.depth_candidates)
            reference = features
            other = flat(unflat(features).flip(1))
            correlation = correlation_volume(reference, other, flat(grid_intrinsics), flat(poses), disparities)
            cost_in = torch.cat([correlation, cnn_per_scale[scale], reference, mono_per_scale[scale]], dim=1)
            refined = self.regressor[scale](cost_in) + self.regressor_residual[scale](cost_in)
            pdf = F.softmax(self.depth_head[scale](refined), dim=1)  # [BV, D, h, w]
            per_pixel = disparities if disparities.dim() == 4 else disparities[:, :, None, None]
            coarse = (per_pixel * pdf).sum(dim=1, keepdim=True)
            confidence = pdf.max(dim=1, keepdim=True)[0]
            if intermediates is not None and scale == 0:
                intermediates.update(
                    relative_pose=poses, intrinsics_lowres_pixels=grid_intrinsics, disp_candidates=disparities,
                    cost_volume=correlation, refined_cost=refined, coarse_disps=coarse, pdf_max_lowres=confidence,
                )
        assert coarse is not None and confidence is not None

        multiview = trans_per_scale[::-1]  # finest first
        residual = self.upsampler(mono, cnn, multiview, coarse, intermediates, prefix="upsampler_")
        coarse_full = F.interpolate(coarse, scale_factor=cfg.downsample_factor, mode="bilinear", align_corners=True)
        disparity = (coarse_full + residual).clamp(
            1.0 / far_flat[:, None, None, None], 1.0 / near_flat[:, None, None, None]
        )
        if intermediates is not None:
            intermediates.update(
                cnn_half64=cnn[0], cnn_half96=cnn[1], cnn_features=cnn[2], mono_features=mono_features,
                residual_disp=residual,
            )
            intermediates.update({f"mono_intermediate_{index}": x for index, x in enumerate(mono)})
        return DepthPrediction(depths=1.0 / disparity, confidence=confidence, mono=mono, cnn=cnn, multiview=multiview)
