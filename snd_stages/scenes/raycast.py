"""Rays of a pinhole camera for open3d's ray caster (CPU, Embree): what the demo scenes and ScanNet++'s mesh
renders share."""

from __future__ import annotations

import numpy as np


def pixel_rays(intrinsics: np.ndarray, height: int, width: int, offsets=((0.0, 0.0),)) -> np.ndarray:
    """``[len(offsets) * H * W, 3]`` float32 camera-frame rays with z = 1 (so a hit distance is the z-depth).

    Pixel (i, j) is centred at (j + 0.5, i + 0.5) (:mod:`snd_stages.geometry`); each (dx, dy) of ``offsets`` gives
    one ray per pixel at that offset from the centre, all pixels of the first offset first.
    """
    rows, cols = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    offsets = np.asarray(offsets, dtype=np.float64)
    pixels = np.stack([(cols.ravel() + offsets[:, :1]).ravel(), (rows.ravel() + offsets[:, 1:]).ravel()], -1)
    homogeneous = np.concatenate([pixels, np.ones_like(pixels[:, :1])], -1)
    return (homogeneous @ np.linalg.inv(intrinsics).T).astype(np.float32)
