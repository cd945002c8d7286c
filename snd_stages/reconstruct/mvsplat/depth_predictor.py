"""MVSplat's depth predictor: cost volume -> U-Net -> softmax depth, refined at full resolution, plus the
per-pixel Gaussian parameter head.

Attribute names follow the official ``DepthPredictorMultiView`` (``corr_refine_net``, ``regressor_residual``,
``depth_head_lowres``, ``upsampler``, ``proj_feature``, ``refine_unet``, ``to_gaussians``, ``to_disparity``), so
checkpoint keys map one to one. The official module orders its batch as (view, batch); this one keeps (batch,
view), which changes nothing but the order of independent rows (attention folds the views explicitly).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from .cost_volume import correlation_volume, disparity_candidates, feature_grid_intrinsics, relative_poses
from .unet import UNet


@dataclass(frozen=True)
class DepthPredictorCfg:
    """The RE10K configuration of the official ``costvolume`` encoder (``config/experiment/re10k.yaml``)."""

    feature_channels: int = 128
    upscale_factor: int = 4  # the backbone's stride
    depth_candidates: int = 128
    cost_unet_channels: int = 128
    cost_unet_levels: int = 3
    cost_unet_attention: tuple[int, ...] = (4,)
    depth_unet_channels: int = 32
    depth_unet_levels: int = 5
    depth_unet_attention: tuple[int, ...] = (16,)
    raw_gaussian_channels: int = 84  # 2 offsets + 3 scales + 4 quaternion + 3 x 25 SH
    views: int = 2


@dataclass
class DepthPrediction:
    """Per-pixel outputs of the depth predictor, ``[B, V, ...]``.

    Attributes:
        depths: ``[B, V, H, W]`` depth, 1 / the clamped refined disparity.
        densities: ``[B, V, H, W]`` in (0, 1), the opacity before its mapping.
        raw_gaussians: ``[B, V, H, W, 84]`` raw Gaussian parameters (see :mod:`.gaussian_adapter`).
    """

    depths: Float[Tensor, "B V H W"]
    densities: Float[Tensor, "B V H W"]
    raw_gaussians: Float[Tensor, "B V H W C"]


class DepthPredictor(nn.Module):
    def __init__(self, cfg: DepthPredictorCfg = DepthPredictorCfg()) -> None:
        super().__init__()
        self.cfg = cfg
        c, d = cfg.feature_channels, cfg.depth_candidates
        cost_in = d + c  # correlations and the reference features
        self.corr_refine_net = nn.Sequential(
            nn.Conv2d(cost_in, cfg.cost_unet_channels, 3, padding=1),
            nn.GroupNorm(8, cfg.cost_unet_channels),
            nn.GELU(),
            UNet(cfg.cost_unet_channels, cfg.cost_unet_levels, cfg.cost_unet_attention, cfg.views),
            nn.Conv2d(cfg.cost_unet_channels, d, 3, padding=1),
        )
        self.regressor_residual = nn.Conv2d(cost_in, d, 1)
        self.depth_head_lowres = nn.Sequential(
            nn.Conv2d(d, 2 * d, 3, padding=1), nn.GELU(), nn.Conv2d(2 * d, d, 3, padding=1)
        )
        # Order as in the reference: convolution at 1/4, then bilinear upsampling, then GELU.
        self.upsampler = nn.Sequential(
            nn.Conv2d(2 * c, c, 3, padding=1),
            nn.Upsample(scale_factor=cfg.upscale_factor, mode="bilinear", align_corners=True),
            nn.GELU(),
        )
        self.proj_feature = nn.Conv2d(c, cfg.depth_unet_channels, 3, padding=1)
        refine_in = 3 + cfg.depth_unet_channels + 1 + 1  # image, projected features, disparity, confidence
        self.refine_unet = nn.Sequential(
            nn.Conv2d(refine_in, cfg.depth_unet_channels, 3, padding=1),
            nn.GroupNorm(4, cfg.depth_unet_channels),
            nn.GELU(),
            UNet(cfg.depth_unet_channels, cfg.depth_unet_levels, cfg.depth_unet_attention, cfg.views),
        )
        gaussians_in = cfg.depth_unet_channels + 3 + c
        self.to_gaussians = nn.Sequential(
            nn.Conv2d(gaussians_in, 2 * cfg.raw_gaussian_channels, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(2 * cfg.raw_gaussian_channels, cfg.raw_gaussian_channels, 3, padding=1),
        )
        self.to_disparity = nn.Sequential(
            nn.Conv2d(cfg.depth_unet_channels, 2 * cfg.depth_unet_channels, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(2 * cfg.depth_unet_channels, 2, 3, padding=1),  # disparity residual, density logit
        )

    def forward(
        self,
        features: Float[Tensor, "B V C h w"],
        cnn_features: Float[Tensor, "B V C h w"],
        images: Float[Tensor, "B V 3 H W"],
        intrinsics: Float[Tensor, "B V 3 3"],
        camera_to_world: Float[Tensor, "B V 4 4"],
        near: Float[Tensor, "B V"],
        far: Float[Tensor, "B V"],
        intermediates: dict[str, Tensor] | None = None,
    ) -> DepthPrediction:
        """Args:
            features: transformer features; cnn_features: the CNN's (both at 1/4 resolution).
            images: raw RGB in [0, 1] (the refinement and the Gaussian head see them unnormalised).
            intrinsics: normalised (row 0 / W, row 1 / H); camera_to_world: OpenCV axes.
            near, far: depth range of the candidates and of the final clamp.
            intermediates: filled with the stage-by-stage tensors (``[B, V, ...]``) if given.
        """
        b, v, c, h, w = features.shape
        assert v == self.cfg.views == 2, f"MVSplat's cost volume is built for 2 views, got {v}"
        flat = lambda x: x.reshape(b * v, *x.shape[2:])  # noqa: E731
        unflat = lambda x: x.reshape(b, v, *x.shape[1:])  # noqa: E731

        reference = flat(features)
        other = flat(features.flip(1))
        poses = relative_poses(camera_to_world)  # [B, 2, 4, 4]
        grid_intrinsics = feature_grid_intrinsics(intrinsics, h, w)
        disparities = disparity_candidates(flat(near), flat(far), self.cfg.depth_candidates).type_as(features)

        correlation = correlation_volume(reference, other, flat(grid_intrinsics), flat(poses), disparities)
        cost_in = torch.cat([correlation, reference], dim=1)
        refined = self.corr_refine_net(cost_in) + self.regressor_residual(cost_in)

        pdf = F.softmax(self.depth_head_lowres(refined), dim=1)  # [BV, D, h, w]
        coarse_disparity = (disparities[:, :, None, None] * pdf).sum(dim=1, keepdim=True)
        confidence = pdf.max(dim=1, keepdim=True)[0]
        confidence_full = F.interpolate(confidence, scale_factor=self.cfg.upscale_factor)  # nearest
        disparity_full = F.interpolate(
            coarse_disparity, scale_factor=self.cfg.upscale_factor, mode="bilinear", align_corners=True
        )

        raw_images = flat(images)
        upsampled = self.upsampler(torch.cat([reference, flat(cnn_features)], dim=1))  # [BV, C, H, W]
        projected = self.proj_feature(upsampled)
        refine_out = self.refine_unet(torch.cat([raw_images, projected, disparity_full, confidence_full], dim=1))
        raw_gaussians = self.to_gaussians(torch.cat([refine_out, raw_images, upsampled], dim=1))

        delta_disparity, density_logit = self.to_disparity(refine_out).split(1, dim=1)
        disparity = (disparity_full + delta_disparity).clamp(
            1.0 / flat(far)[:, None, None, None], 1.0 / flat(near)[:, None, None, None]
        )
        if intermediates is not None:
            intermediates.update(
                relative_pose=poses,
                intrinsics_lowres_pixels=grid_intrinsics,
                disp_candidates=unflat(disparities),
                cost_volume=unflat(correlation),
                refined_cost=unflat(refined),
                coarse_disps=unflat(coarse_disparity),
                pdf_max_lowres=unflat(confidence),
                fullres_disps=unflat(disparity_full),
                proj_feature=unflat(projected),
                refine_out=unflat(refine_out),
                raw_gaussians=unflat(raw_gaussians),
            )
        return DepthPrediction(
            depths=unflat(1.0 / disparity)[:, :, 0],
            densities=unflat(torch.sigmoid(density_logit))[:, :, 0],
            raw_gaussians=unflat(raw_gaussians).permute(0, 1, 3, 4, 2),
        )
