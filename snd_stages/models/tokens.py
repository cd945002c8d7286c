"""A backbone's patch tokens as a grid, and as the rows a head reads."""

from __future__ import annotations

import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn


def patch_tokens(backbone: nn.Module, images: Tensor) -> Tensor:
    """Patch tokens after the final LayerNorm, as a feature map, the way the reference extracts them.

    Images are bilinearly resized to ``(H - H mod p, W - W mod p)`` (p = patch size, 14; skipped when already
    multiples), ImageNet-normalised and passed through ``forward_features``; the class and register tokens are
    dropped.

    Args:
        backbone: a timm ViT, or a PeftModel wrapping one (:func:`add_lora`).
        images: [B, 3, H, W] RGB in [0, 1], H and W at least the patch size.

    Returns:
        [B, C, H // p, W // p] token features. A view of channels-last memory: ``.view`` on it needs
        ``.contiguous()`` first.

    Raises:
        ValueError: ``images`` is not [B, 3, H, W] with sides of at least one patch.
    """
    patch_height, patch_width = backbone.patch_embed.patch_size
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] < patch_height or images.shape[3] < patch_width:
        raise ValueError(
            f"images must be [B, 3, H, W] with H >= {patch_height} and W >= {patch_width}, got {tuple(images.shape)}"
        )
    height, width = images.shape[-2:]
    grid = (height // patch_height, width // patch_width)
    size = (grid[0] * patch_height, grid[1] * patch_width)
    if size != (height, width):
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    mean = images.new_tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    tokens = backbone.forward_features((images - mean) / std)  # [B, prefix + h*w, C], after the final norm
    return tokens[:, backbone.num_prefix_tokens :].unflatten(1, grid).permute(0, 3, 1, 2)


def token_rows(features: Tensor) -> Tensor:
    """[B, C, h, w] -> [B*h*w, C], rows in (b, y, x) order."""
    return features.movedim(1, -1).reshape(-1, features.shape[1])
