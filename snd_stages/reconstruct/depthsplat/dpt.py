"""DepthSplat's DPT heads (adapted by the authors from Depth Anything V2): DINOv2 token maps fused with the
multi-view branch, refined from 1/16 up to full resolution.

Two heads share this structure: one predicts an inverse-depth residual (``depth_predictor.upsampler``), the
other returns its full-resolution features (``feature_upsampler``), which feed the Gaussian regressor.
Attribute names follow the official module tree (``concat_projects``, ``projects``, ``resize_layers``,
``scratch.layer<k>_rn``, ``scratch.refinenet<k>.{resConfUnit1, resConfUnit2, out_conv}``, ``scratch.output_conv``),
so checkpoint keys map one to one.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

# Widths of UniMatch's CNN stages (1/2, then 1/2 or 1/4, then the projected 1/4 or 1/8 map) and of the
# multi-view transformer's features.
CNN_CHANNELS = (64, 96, 128)
MULTIVIEW_CHANNELS = 128


class ResidualConvUnit(nn.Module):
    """``x + conv(ReLU(conv(ReLU(x))))``, both 3x3 with bias."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Float[Tensor, "N C H W"]) -> Float[Tensor, "N C H W"]:
        return self.conv2(F.relu(self.conv1(F.relu(x)))) + x


class FeatureFusionBlock(nn.Module):
    """Adds the refined skip (if any) to the coarser path, refines, upsamples (bilinear, align-corners), 1x1 conv.

    The coarsest block has no skip, hence no ``resConfUnit1`` (the official tree deletes it).
    """

    def __init__(self, channels: int, with_skip: bool = True) -> None:
        super().__init__()
        if with_skip:
            self.resConfUnit1 = ResidualConvUnit(channels)
        self.resConfUnit2 = ResidualConvUnit(channels)
        self.out_conv = nn.Conv2d(channels, channels, 1)

    def forward(
        self, path: Float[Tensor, "N C h w"], skip: Float[Tensor, "N C h w"] | None, size: tuple[int, int] | None
    ) -> Float[Tensor, "N C H W"]:
        if skip is not None:
            path = path + self.resConfUnit1(skip)
        path = self.resConfUnit2(path)
        resize = {"size": size} if size is not None else {"scale_factor": 2}
        return self.out_conv(F.interpolate(path, **resize, mode="bilinear", align_corners=True))


# What joins each of the first three levels (1/2, 1/4, 1/8), in concatenation order, per (finest depth resolution,
# depth scales): ``cnn<k>`` the CNN's outputs, ``mv<k>`` the transformer's features finest first, ``depth`` the
# inverse depth of the finest scale (depth head only), ``mono`` the level's projected DINOv2 map.
LAYOUTS: dict[tuple[int, int], tuple[tuple[str, ...], ...]] = {
    (4, 1): (("cnn0", "cnn1", "mono"), ("cnn2", "mono", "mv0", "depth"), ("mono",)),
    (8, 1): (("cnn0", "mono"), ("cnn1", "mono"), ("cnn2", "mono", "mv0", "depth")),
    (2, 2): (("cnn0", "cnn1", "mv0", "depth", "mono"), ("cnn2", "mono", "mv1"), ("mono",)),
    (4, 2): (("cnn0", "mono"), ("cnn1", "mono", "mv0", "depth"), ("cnn2", "mono", "mv1")),
}


class DPTHead(nn.Module):
    """The DPT head of DepthSplat.

    Its four levels sit at 1/2, 1/4, 1/8 and 1/16 of the image; the DINOv2 maps (all at 1/8) are projected and
    resampled to them (transposed convolutions x4 and x2, identity, a stride-2 convolution). Where the
    multi-view branch lives decides what joins which level (:data:`LAYOUTS`); e.g. with single-scale features
    at 1/4, level 1 gets both 1/2 CNN maps, level 2 the 1/4 CNN map, the transformer features and (depth head)
    the coarse inverse depth, and level 3 only a 1x1 projection.

    Args:
        vit_channels: DINOv2's token width.
        fusion_channels: width of the refinement path.
        projections: widths of the four levels.
        downsample_factor: 2, 4 or 8, the resolution of the finest depth scale.
        scales: depth scales (1, or 2 for the base and large models).
        predicts_depth: the depth-residual head (takes the coarse inverse depth, ends in ``output_conv``);
            otherwise it returns its full-resolution features.
    """

    def __init__(
        self,
        vit_channels: int,
        fusion_channels: int,
        projections: tuple[int, int, int, int],
        downsample_factor: int,
        predicts_depth: bool,
        scales: int = 1,
    ) -> None:
        super().__init__()
        self.layout = tuple(
            tuple(name for name in level if predicts_depth or name != "depth")
            for level in LAYOUTS[downsample_factor, scales]
        )
        self.predicts_depth = predicts_depth
        # The transformer's features are 128 wide at the coarsest scale, half that at the finer one.
        widths = {"cnn0": CNN_CHANNELS[0], "cnn1": CNN_CHANNELS[1], "cnn2": CNN_CHANNELS[2], "depth": 1,
                  "mv0": MULTIVIEW_CHANNELS // scales, "mv1": MULTIVIEW_CHANNELS}
        self.concat_projects = nn.ModuleList([
            nn.Conv2d(sum(width if name == "mono" else widths[name] for name in level), width, 1)
            for level, width in zip(self.layout, projections)
        ])
        self.projects = nn.ModuleList([nn.Conv2d(vit_channels, width, 1) for width in projections])
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(projections[0], projections[0], 4, stride=4),
            nn.ConvTranspose2d(projections[1], projections[1], 2, stride=2),
            nn.Identity(),
            nn.Conv2d(projections[3], projections[3], 3, stride=2, padding=1),
        ])
        self.scratch = nn.Module()
        for level, width in enumerate(projections, start=1):
            setattr(self.scratch, f"layer{level}_rn", nn.Conv2d(width, fusion_channels, 3, padding=1, bias=False))
            setattr(self.scratch, f"refinenet{level}", FeatureFusionBlock(fusion_channels, with_skip=level != 4))
        if predicts_depth:
            self.scratch.output_conv = nn.Sequential(
                nn.Conv2d(fusion_channels, fusion_channels // 2, 3, padding=1, padding_mode="replicate"),
                nn.GELU(),
                nn.Conv2d(fusion_channels // 2, 16, 3, padding=1, padding_mode="replicate"),
                nn.GELU(),
                nn.Conv2d(16, 1, 1),
            )

    def forward(
        self,
        mono: list[Float[Tensor, "N C h8 w8"]],
        cnn: tuple[Tensor, Tensor, Tensor],
        multiview: list[Tensor],
        coarse_disparity: Float[Tensor, "N 1 h w"] | None = None,
        intermediates: dict[str, Tensor] | None = None,
        prefix: str = "",
    ) -> Float[Tensor, "N C H W"]:
        """Args:
            mono: the four DINOv2 maps at 1/8.
            cnn: the CNN's three outputs (:meth:`~..mvsplat.backbone.CNNEncoder.stages`).
            multiview: the transformer's features per depth scale, finest first.
            coarse_disparity: the finest scale's inverse depth (the depth head only).
            intermediates: gets ``<prefix>path4`` and ``<prefix>path1`` if given.

        Returns:
            the inverse-depth residual ``[N, 1, H, W]`` (depth head) or the features ``[N, fusion, H, W]``.
        """
        assert (coarse_disparity is not None) == self.predicts_depth
        levels = [resize(project(x)) for x, project, resize in zip(mono, self.projects, self.resize_layers)]
        inputs = {"cnn0": cnn[0], "cnn1": cnn[1], "cnn2": cnn[2], "depth": coarse_disparity,
                  **{f"mv{index}": x for index, x in enumerate(multiview)}}
        for index, (names, project) in enumerate(zip(self.layout, self.concat_projects)):
            levels[index] = project(torch.cat([levels[index] if name == "mono" else inputs[name] for name in names], 1))
        scratch = self.scratch
        refined = [getattr(scratch, f"layer{level}_rn")(x) for level, x in enumerate(levels, start=1)]
        path4 = scratch.refinenet4(refined[3], None, refined[2].shape[-2:])
        path3 = scratch.refinenet3(path4, refined[2], refined[1].shape[-2:])
        path2 = scratch.refinenet2(path3, refined[1], refined[0].shape[-2:])
        path1 = scratch.refinenet1(path2, refined[0], None)
        if intermediates is not None:
            intermediates.update({f"{prefix}path4": path4, f"{prefix}path1": path1})
        return scratch.output_conv(path1) if self.predicts_depth else path1
