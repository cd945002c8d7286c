"""MVSplat's plane-sweep cost volume between two views, on the 1/4-resolution feature grid.

For every feature pixel of a reference view and every candidate depth, the other view's features are sampled
where that 3D point projects, and correlated with the reference feature. The warp reproduces the official
conventions exactly, including two that differ from snd's (see :func:`warp_features`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

# Projections behind (or almost on) the other camera are divided by this instead of their depth.
MIN_PROJECTION_DEPTH = 1e-3


def disparity_candidates(near: Float[Tensor, " N"], far: Float[Tensor, " N"], count: int) -> Float[Tensor, "N D"]:
    """``count`` inverse depths evenly spaced from 1/far to 1/near (both included)."""
    low = (1.0 / far)[:, None]
    high = (1.0 / near)[:, None]
    # linspace runs on the CPU wherever the rest runs: the reference's steps, bit for bit.
    return low + torch.linspace(0.0, 1.0, count).to(near.device)[None] * (high - low)


def relative_poses(camera_to_world: Float[Tensor, "B 2 4 4"]) -> Float[Tensor, "B 2 4 4"]:
    """Per reference view, the transform from its camera frame to the other view's camera frame.

    View 0 gets ``E_1^-1 E_0``; view 1 gets the numerical inverse of that matrix (not ``E_0^-1 E_1`` computed
    afresh), as the reference does for two views.
    """
    pose = torch.linalg.inv(camera_to_world[:, 1]) @ camera_to_world[:, 0]
    return torch.stack([pose, torch.linalg.inv(pose)], dim=1)


def feature_grid_intrinsics(intrinsics: Float[Tensor, "*batch 3 3"], height: int, width: int) -> Float[Tensor, "*batch 3 3"]:
    """Normalised intrinsics -> pixels of a ``height`` x ``width`` grid (row 0 times width, row 1 times height)."""
    scaled = intrinsics.clone()
    scaled[..., 0, :] *= float(width)
    scaled[..., 1, :] *= float(height)
    return scaled


def warp_features(
    features: Float[Tensor, "N C h w"],
    intrinsics: Float[Tensor, "N 3 3"],
    pose: Float[Tensor, "N 4 4"],
    depths: Float[Tensor, "N D"] | Float[Tensor, "N D h w"],
) -> Float[Tensor, "N C D h w"]:
    """Sample ``features`` (the other view) at every reference pixel's projection at every candidate depth.

    Two conventions of the reference are kept on purpose: a feature pixel (column x, row y) is the point
    (x, y) itself, not its centre (x + 0.5, y + 0.5), with intrinsics that are the normalised ones times the grid
    size; and sampling uses the align-corners convention, which makes integer (x, y) the pixel's own value.
    Outside the map the features are zero.

    Args:
        features: the other view's features.
        intrinsics: the reference view's pixel intrinsics of the feature grid (:func:`feature_grid_intrinsics`).
            The reference projects into the other view with these too, not with the other view's own.
        pose: reference camera -> other camera (:func:`relative_poses`).
        depths: candidate z-depths per batch element, or per pixel (DepthSplat's finer scale searches a window
            around each pixel's coarse estimate).
    """
    n, c, h, w = features.shape
    d = depths.shape[1]
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    grid = torch.stack([cols, rows, torch.ones_like(cols)]).to(features.device, intrinsics.dtype)  # [3, h, w]
    rays = torch.linalg.inv(intrinsics).bmm(grid.reshape(1, 3, -1).expand(n, 3, h * w))  # z = 1 rays, [N, 3, hw]
    points = torch.bmm(pose[:, :3, :3], rays).unsqueeze(2) * depths.reshape(n, 1, d, -1)  # [N, 3, D, hw]
    points = points + pose[:, :3, -1:].unsqueeze(-1)
    projected = torch.bmm(intrinsics, points.reshape(n, 3, -1)).reshape(n, 3, d, h * w)
    pixels = projected[:, :2] / projected[:, 2:].clamp(min=MIN_PROJECTION_DEPTH)  # [N, 2, D, hw]
    x = 2 * pixels[:, 0] / (w - 1) - 1
    y = 2 * pixels[:, 1] / (h - 1) - 1
    sample_grid = torch.stack([x, y], dim=-1).reshape(n, d * h, w, 2)
    warped = F.grid_sample(features, sample_grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return warped.reshape(n, c, d, h, w)


def correlation_volume(
    reference: Float[Tensor, "N C h w"],
    other: Float[Tensor, "N C h w"],
    intrinsics: Float[Tensor, "N 3 3"],
    pose: Float[Tensor, "N 4 4"],
    disparities: Float[Tensor, "N D"] | Float[Tensor, "N D h w"],
    chunk: int = 32,
) -> Float[Tensor, "N D h w"]:
    """``<F_ref(y, x), F_other(warp_d(y, x))> / sqrt(C)`` for every candidate ``d`` (per sample or per pixel).

    Candidates are processed ``chunk`` at a time: the warped features of all candidates at once would take
    ``N C D h w`` floats (4 GiB for a pair at 576x880), and each candidate is independent of the others.
    """
    c = reference.shape[1]
    depths = 1.0 / disparities
    slices = []
    for start in range(0, depths.shape[1], chunk):
        warped = warp_features(other, intrinsics, pose, depths[:, start : start + chunk])
        slices.append((reference.unsqueeze(2) * warped).sum(1) / (c**0.5))
    return torch.cat(slices, dim=1)
