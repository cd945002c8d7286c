"""Bilinear and bicubic resizing as two small matrix products, so the probes' gradients are deterministic.

``F.interpolate``'s CUDA backward for the linear and cubic modes scatters with atomic additions, whose order (and
so whose rounding) changes from run to run; one probe fit of several thousand steps turns that rounding into
visibly different scores. Both modes are separable: resizing an ``[h, w]`` map is ``A_h · X · A_wᵀ`` with one
fixed interpolation matrix per axis, and a matrix product's backward is another matrix product, which repeats
exactly. The matrices are ``F.interpolate``'s own weights (it is applied to the identity), so :func:`resize`
agrees with it to float rounding (tested).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor


@functools.lru_cache(maxsize=64)
def _interpolation_matrix(size_in: int, size_out: int, mode: str, align_corners: bool | None) -> Tensor:
    # Each input position as its own channel, on an axis of width 1 (which stays 1): the output column of
    # channel j is what input position j contributes to every output position.
    identity = torch.eye(size_in, dtype=torch.float64).reshape(1, size_in, size_in, 1)
    weights = F.interpolate(identity, size=(size_out, 1), mode=mode, align_corners=align_corners)
    return weights[0, :, :, 0].T.contiguous()  # [size_out, size_in]


def interpolation_matrix(size_in: int, size_out: int, mode: str = "bilinear", align_corners: bool | None = False,
                         device=None, dtype=torch.float32) -> Tensor:
    """``[size_out, size_in]`` weights of ``F.interpolate``'s ``mode`` along one axis (shared: do not modify)."""
    return _interpolation_matrix_on(size_in, size_out, mode, align_corners, torch.device(device or "cpu"), dtype)


@functools.lru_cache(maxsize=64)
def _interpolation_matrix_on(size_in: int, size_out: int, mode: str, align_corners: bool | None,
                             device: torch.device, dtype: torch.dtype) -> Tensor:
    # kept on the device: a probe fit resizes several times per step, and a copy from the host each time would
    # wait for the GPU
    return _interpolation_matrix(size_in, size_out, mode, align_corners).to(device=device, dtype=dtype)


def resize(maps: Tensor, size: tuple[int, int], mode: str = "bilinear", align_corners: bool | None = False) -> Tensor:
    """``[B, C, h, w]`` -> ``[B, C, H, W]`` as ``F.interpolate(maps, size, mode, align_corners)`` would give it.

    Args:
        maps: ``[B, C, h, w]`` floating-point maps.
        size: (H, W).
        mode: ``bilinear`` or ``bicubic``.
        align_corners: as for ``F.interpolate``.
    """
    if mode not in ("bilinear", "bicubic"):
        raise ValueError(f"resize takes mode 'bilinear' or 'bicubic', not {mode!r}")
    height, width = maps.shape[-2:]
    if (height, width) == tuple(size):
        return maps
    rows = interpolation_matrix(height, size[0], mode, align_corners, maps.device, maps.dtype)
    columns = interpolation_matrix(width, size[1], mode, align_corners, maps.device, maps.dtype)
    return rows @ maps @ columns.T


def upsample(maps: Tensor, factor: int, mode: str = "bilinear") -> Tensor:
    """``[B, C, h, w]`` -> ``[B, C, factor·h, factor·w]``, as ``F.interpolate(scale_factor=factor)`` (no corners)."""
    if factor == 1:
        return maps
    return resize(maps, (maps.shape[-2] * factor, maps.shape[-1] * factor), mode, align_corners=False)
