"""DepthSplat's monocular branch: DINOv2 (built by timm, without downloading anything) and its four token maps.

The ViT itself is timm's DINOv2 architecture, whose parameter names are DINOv2's own (``cls_token``,
``pos_embed``, ``patch_embed.proj``, ``blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2,
ls2.gamma}``, ``norm``), so the checkpoint's ``depth_predictor.pretrained.*`` keys load one to one. Its forward
pass is written here rather than taken from timm, because DepthSplat's numerics depend on DINOv2's own
position-embedding resize (see :func:`dinov2_position_embedding`), which timm's dynamic-size path does not do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

# DINOv2 was trained at 518 px: its position table is a 37 x 37 grid of 14-px patches (plus the class entry).
DINOV2_IMAGE_SIZE = 518
# DINOv2's resize offset: the table is resized by a scale factor (n + 0.1) / 37, not to a target size, to avoid
# a floating-point error in the output size. It changes the embedding by up to twice its RMS.
POSITION_INTERPOLATE_OFFSET = 0.1


@dataclass(frozen=True)
class ViTSpec:
    """A DINOv2 size as DepthSplat uses it.

    Attributes:
        timm_name: timm's architecture (built with random weights; the checkpoint provides them).
        channels: token width.
        layers: the blocks whose (final-normed) outputs feed the DPT heads.
        projections: the DPT heads' per-level projection widths.
    """

    timm_name: str
    channels: int
    layers: tuple[int, int, int, int]
    projections: tuple[int, int, int, int]


VITS = {
    "vits": ViTSpec("vit_small_patch14_dinov2", 384, (2, 5, 8, 11), (48, 96, 192, 384)),
    "vitb": ViTSpec("vit_base_patch14_dinov2", 768, (2, 5, 8, 11), (96, 192, 384, 768)),
    "vitl": ViTSpec("vit_large_patch14_dinov2", 1024, (4, 11, 17, 23), (128, 256, 512, 1024)),
}


def create_dinov2(spec: ViTSpec) -> nn.Module:
    """timm's DINOv2 of ``spec`` with random weights (LayerScale, no registers, no head, LayerNorm eps 1e-6)."""
    return timm.create_model(spec.timm_name, pretrained=False, img_size=DINOV2_IMAGE_SIZE, num_classes=0)


def dinov2_position_embedding(pos_embed: Float[Tensor, "1 T C"], rows: int, cols: int) -> Float[Tensor, "1 T2 C"]:
    """DINOv2's position table for a ``rows x cols`` patch grid, class entry first.

    The 37 x 37 grid is resized with PyTorch's bicubic kernel (no anti-aliasing) by the scale factor
    ``(n + 0.1) / 37`` per axis, as DINOv2's ``interpolate_pos_encoding`` does: the output still has ``n`` entries,
    but the sampling positions are ``(dst + 0.5) * 37 / (n + 0.1) - 0.5``, not ``* 37 / n``. DINOv2 returns the
    table unchanged for its own square 37 x 37 grid.
    """
    side = math.isqrt(pos_embed.shape[1] - 1)
    if rows == cols == side:
        return pos_embed
    class_entry, grid = pos_embed[:, :1], pos_embed[:, 1:]
    channels = grid.shape[-1]
    grid = grid.float().reshape(1, side, side, channels).permute(0, 3, 1, 2)
    scale = ((rows + POSITION_INTERPOLATE_OFFSET) / side, (cols + POSITION_INTERPOLATE_OFFSET) / side)
    grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=False)
    assert grid.shape[-2:] == (rows, cols), (grid.shape, rows, cols)
    grid = grid.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, rows * cols, channels)
    return torch.cat([class_entry, grid], dim=1)


def monocular_maps(
    vit: nn.Module,
    spec: ViTSpec,
    normalised: Float[Tensor, "N 3 H W"],
    intermediates: dict[str, Tensor] | None = None,
) -> list[Float[Tensor, "N C H/8 W/8"]]:
    """The four DINOv2 token maps DepthSplat fuses, each resized to 1/8 of the image.

    Args:
        vit: :func:`create_dinov2`'s model, with the checkpoint's weights.
        normalised: ImageNet-normalised images. They are resized (bilinear, align-corners) to the largest
            multiple of 14 at or below their size; every patch token then covers 14 x 14 of that.
        intermediates: if given, gets ``vit_input``, ``vit_pos_embed``, ``vit_embed`` and ``vit_tokens_l<k>``
            (the class token included, after the final norm) for each block ``k`` of ``spec.layers``.
    """
    n, _, height, width = normalised.shape
    patch = vit.patch_embed.proj.kernel_size[0]
    rows, cols = height // patch, width // patch
    vit_input = F.interpolate(normalised, size=(rows * patch, cols * patch), mode="bilinear", align_corners=True)
    tokens = vit.patch_embed.proj(vit_input).flatten(2).transpose(1, 2)
    position = dinov2_position_embedding(vit.pos_embed, rows, cols)
    tokens = torch.cat([vit.cls_token.expand(n, -1, -1), tokens], dim=1) + position
    if intermediates is not None:
        intermediates.update(vit_input=vit_input, vit_pos_embed=position, vit_embed=tokens)
    outputs = []
    for index, block in enumerate(vit.blocks):
        tokens = block(tokens)
        if index in spec.layers:
            normed = vit.norm(tokens)
            if intermediates is not None:
                intermediates[f"vit_tokens_l{index}"] = normed
            outputs.append(normed)
        if index == max(spec.layers):
            break
    maps = []
    for normed in outputs:
        grid = normed[:, 1:].transpose(1, 2).reshape(n, -1, rows, cols)  # the class token is dropped
        maps.append(F.interpolate(grid, size=(height // 8, width // 8), mode="bilinear", align_corners=True))
    return maps
