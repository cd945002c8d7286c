"""A backbone's patch tokens as a grid, and as the rows a head reads."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import BackboneSpec


def patch_tokens(backbone: nn.Module, spec: BackboneSpec, images: Tensor) -> Tensor:
    """Patch tokens after the final LayerNorm, as a feature map, the way the reference extracts them.

    Images are bilinearly resized to ``(H - H mod p, W - W mod p)`` (p = the patch size; skipped when already
    multiples), normalised and passed through ``forward_features``; the class and register tokens are dropped.

    Args:
        backbone: a timm ViT, or a PeftModel wrapping one (:func:`add_lora`).
        spec: the backbone's registry entry: patch size, normalisation and prefix tokens.
        images: [B, 3, H, W] RGB in [0, 1], H and W at least the patch size.

    Returns:
        [B, C, H // p, W // p] token features. A view of channels-last memory: ``.view`` on it needs
        ``.contiguous()`` first.

    Raises:
        ValueError: ``images`` is not [B, 3, H, W] with sides of at least one patch.
    """
    patch = spec.patch
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] < patch or images.shape[3] < patch:
        raise ValueError(f"images must be [B, 3, H, W] with H >= {patch} and W >= {patch}, got {tuple(images.shape)}")
    height, width = images.shape[-2:]
    grid = spec.token_grid(height, width)
    size = (grid[0] * patch, grid[1] * patch)
    if size != (height, width):
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    tokens = backbone.forward_features(spec.normalise(images))  # [B, prefix + h*w, C], after the final norm
    return tokens[:, spec.prefix_tokens :].unflatten(1, grid).permute(0, 3, 1, 2)


def token_rows(features: Tensor) -> Tensor:
    """[B, C, h, w] -> [B*h*w, C], rows in (b, y, x) order."""
    return features.movedim(1, -1).reshape(-1, features.shape[1])
