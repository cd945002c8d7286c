"""The linear feature path around the renderer: mask-aware upsampling, lifting, semantic blending, downsampling.

Given a sample's fixed Gaussians and masks, every function here is linear in the features it is given, which
is what lets the whole context-tokens -> target-tokens map be precomputed as one sparse operator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from ..gaussians import Gaussians


def mask_aware_upsample(
    features: Float[Tensor, "B C h w"], masks: Int[Tensor, "B H W"]
) -> Float[Tensor, "B C H W"]:
    """Bilinear upsampling that only mixes low-res nodes of the output pixel's own segment.

    Output pixel (r, c) samples low-res position (x, y) = (c (w-1)/(W-1), r (h-1)/(H-1)) (align-corners) with
    the usual four bilinear weights; a neighbour contributes only if its label, read from the full-res mask at
    the node's own align-corners position (rounded half to even), equals the pixel's label. The kept weights
    are renormalised; a pixel none of whose four neighbours match gets 0 (no fallback), as in the method's
    reference implementation.

    Args:
        features: ``[B, C, h, w]`` low-resolution features (e.g. ViT patch tokens).
        masks: ``[B, H, W]`` integer segment labels at the output resolution.
    """
    batch, channels, low_h, low_w = features.shape
    height, width = masks.shape[-2:]
    device = features.device
    # linspace(0, n - 1, N) is the align-corners sampling grid; float64 keeps floor() exact on the nodes.
    xs = torch.linspace(0, low_w - 1, width, dtype=torch.float64, device=device)
    ys = torch.linspace(0, low_h - 1, height, dtype=torch.float64, device=device)
    x0 = xs.floor().long()
    y0 = ys.floor().long()
    x1 = (x0 + 1).clamp(max=low_w - 1)
    y1 = (y0 + 1).clamp(max=low_h - 1)
    dx = (xs - x0).to(features.dtype)[None, :].expand(height, width)
    dy = (ys - y0).to(features.dtype)[:, None].expand(height, width)

    node_rows = torch.linspace(0, height - 1, low_h, dtype=torch.float64, device=device).round().long()
    node_cols = torch.linspace(0, width - 1, low_w, dtype=torch.float64, device=device).round().long()
    node_labels = masks[:, node_rows][:, :, node_cols].reshape(batch, -1)  # [B, h*w]

    # The four neighbours of every output pixel, as flat low-res node indices and bilinear weights: [4, H, W].
    neighbours = torch.stack([
        y0[:, None] * low_w + x0[None, :], y0[:, None] * low_w + x1[None, :],
        y1[:, None] * low_w + x0[None, :], y1[:, None] * low_w + x1[None, :],
    ])
    weights = torch.stack([(1 - dx) * (1 - dy), dx * (1 - dy), (1 - dx) * dy, dx * dy])
    pixels = torch.arange(height * width, device=device).repeat(4)
    output = []
    for index in range(batch):
        same_segment = node_labels[index][neighbours] == masks[index]  # [4, H, W]
        kept = weights * same_segment
        total = kept.sum(0)
        kept = kept / torch.where(total == 0, torch.ones_like(total), total)
        # A sparse [H*W, h*w] operator with four entries a row: one matmul instead of four dense gathers.
        operator = torch.sparse_coo_tensor(
            torch.stack([pixels, neighbours.reshape(-1)]), kept.reshape(-1), (height * width, low_h * low_w),
            check_invariants=False,
        )
        flat = torch.sparse.mm(operator, features[index].reshape(channels, -1).T)  # [H*W, C]
        output.append(flat.T.reshape(channels, height, width))
    return torch.stack(output)


def lift_features(features: Float[Tensor, "V C H W"], gaussians: Gaussians) -> Float[Tensor, "N C"]:
    """Each Gaussian takes the feature of the context pixel it was born from (one-to-one, no interpolation)."""
    views, channels, height, width = features.shape
    flat = features.permute(0, 2, 3, 1).reshape(views * height * width, channels)
    return flat[gaussians.source_view * (height * width) + gaussians.source_pixel]


def segment_means(features: Float[Tensor, "B C H W"], masks: Int[Tensor, "B H W"]) -> Float[Tensor, "B C H W"]:
    """Each pixel's value replaced by the mean over all pixels of its segment (uncovered zeros included)."""
    batch, channels, height, width = features.shape
    means = torch.empty_like(features)
    for index in range(batch):
        labels, inverse = torch.unique(masks[index].reshape(-1), return_inverse=True)
        flat = features[index].reshape(channels, -1)
        sums = flat.new_zeros(channels, len(labels)).index_add_(1, inverse, flat)
        counts = torch.bincount(inverse, minlength=len(labels)).to(flat.dtype)
        means[index] = (sums / counts)[:, inverse].reshape(channels, height, width)
    return means


def blend_with_segments(
    features: Float[Tensor, "B C H W"], masks: Int[Tensor, "B H W"], coefficient: float = 0.5
) -> Float[Tensor, "B C H W"]:
    """Semantic blending: ``coefficient * features + (1 - coefficient) * segment mean``; 1 disables it.

    ``masks`` at another resolution is resized with nearest neighbour to the features' size first.
    """
    if coefficient == 1.0:
        return features
    if masks.shape[-2:] != features.shape[-2:]:
        masks = F.interpolate(masks[:, None].float(), size=features.shape[-2:], mode="nearest")[:, 0].long()
    return coefficient * features + (1.0 - coefficient) * segment_means(features, masks)


def downsample_to_tokens(features: Float[Tensor, "B C H W"], grid: tuple[int, int]) -> Float[Tensor, "B C h w"]:
    """Plain bilinear resize to the student's token grid (align_corners False, no antialiasing)."""
    return F.interpolate(features, size=grid, mode="bilinear", align_corners=False)


def token_coverage(alpha: Float[Tensor, "B H W"], grid: tuple[int, int]) -> Tensor:
    """``[B, h, w]`` bool: tokens whose nearest-sampled render pixel received any Gaussian (alpha > 0)."""
    covered = (alpha > 0).float()[:, None]
    return F.interpolate(covered, size=grid, mode="nearest")[:, 0] > 0.5
