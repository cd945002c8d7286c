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
    output = []
    for index in range(batch):
        operator = upsample_operator(masks[index], low_h, low_w).to(features.dtype)
        flat = torch.sparse.mm(operator, features[index].reshape(channels, -1).T)  # [H*W, C]
        output.append(flat.T.reshape(channels, height, width))
    return torch.stack(output)


def upsample_operator(mask: Int[Tensor, "H W"], low_h: int, low_w: int) -> Float[Tensor, "HW hw"]:
    """The sparse ``[H*W, h*w]`` matrix of :func:`mask_aware_upsample` for one mask: four entries a row.

    With a constant mask it is plain bilinear align-corners upsampling.
    """
    height, width = mask.shape
    neighbours, weights = upsample_taps(mask, low_h, low_w)
    pixels = torch.arange(height * width, device=mask.device).repeat(4)
    return torch.sparse_coo_tensor(
        torch.stack([pixels, neighbours.reshape(-1)]), weights.reshape(-1), (height * width, low_h * low_w),
        check_invariants=False,
    )


def upsample_taps(mask: Int[Tensor, "H W"], low_h: int, low_w: int) -> tuple[Int[Tensor, "4 HW"], Float[Tensor, "4 HW"]]:
    """The four low-res nodes (flat ``row * w + col``) each output pixel reads and their mask-aware weights."""
    height, width = mask.shape
    device = mask.device
    # linspace(0, n - 1, N) is the align-corners sampling grid; float64 keeps floor() exact on the nodes.
    xs = torch.linspace(0, low_w - 1, width, dtype=torch.float64, device=device)
    ys = torch.linspace(0, low_h - 1, height, dtype=torch.float64, device=device)
    x0 = xs.floor().long()
    y0 = ys.floor().long()
    x1 = (x0 + 1).clamp(max=low_w - 1)
    y1 = (y0 + 1).clamp(max=low_h - 1)
    dx = (xs - x0)[None, :].expand(height, width)  # float64 weights; callers cast to their features' dtype
    dy = (ys - y0)[:, None].expand(height, width)

    node_rows = torch.linspace(0, height - 1, low_h, dtype=torch.float64, device=device).round().long()
    node_cols = torch.linspace(0, width - 1, low_w, dtype=torch.float64, device=device).round().long()
    node_labels = mask[node_rows][:, node_cols].reshape(-1)  # [h*w]

    # The four neighbours of every output pixel, as flat low-res node indices and bilinear weights: [4, H, W].
    neighbours = torch.stack([
        y0[:, None] * low_w + x0[None, :], y0[:, None] * low_w + x1[None, :],
        y1[:, None] * low_w + x0[None, :], y1[:, None] * low_w + x1[None, :],
    ])
    weights = torch.stack([(1 - dx) * (1 - dy), dx * (1 - dy), (1 - dx) * dy, dx * dy])
    kept = weights * (node_labels[neighbours] == mask)
    total = kept.sum(0)
    kept = kept / torch.where(total == 0, torch.ones_like(total), total)
    return neighbours.reshape(4, -1), kept.reshape(4, -1)


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


def downsample_operator(height: int, width: int, grid: tuple[int, int]) -> Float[Tensor, "hw HW"]:
    """The sparse ``[h*w, H*W]`` matrix of :func:`downsample_to_tokens` (four entries a row), on the CPU.

    PyTorch's bilinear rule with ``align_corners=False``: source coordinate ``(i + 0.5) * in / out - 0.5``,
    clamped at 0, and the upper neighbour clamped to the last index.
    """

    def taps(size_in: int, size_out: int) -> tuple[Tensor, Tensor, Tensor]:
        scale = size_in / size_out
        source = ((torch.arange(size_out, dtype=torch.float32) + 0.5) * scale - 0.5).clamp(min=0)
        lower = source.long()
        upper = torch.where(lower < size_in - 1, lower + 1, lower)
        return lower, upper, source - lower

    rows_low, rows_high, row_weight = taps(height, grid[0])
    cols_low, cols_high, col_weight = taps(width, grid[1])
    rows = [(rows_low, 1 - row_weight), (rows_high, row_weight)]
    cols = [(cols_low, 1 - col_weight), (cols_high, col_weight)]
    tokens = torch.arange(grid[0] * grid[1]).reshape(grid)
    indices, values = [], []
    for row_index, row_value in rows:
        for col_index, col_value in cols:
            indices.append(torch.stack([tokens.reshape(-1), (row_index[:, None] * width + col_index[None, :]).reshape(-1)]))
            values.append((row_value[:, None] * col_value[None, :]).reshape(-1))
    return torch.sparse_coo_tensor(
        torch.cat(indices, 1), torch.cat(values), (grid[0] * grid[1], height * width), check_invariants=False
    ).coalesce()
