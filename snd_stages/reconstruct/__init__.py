"""Reconstructors: turn two context views into pixel-aligned 3D Gaussians. A registry by name.

A reconstructor is a callable ``(views: ContextViews) -> Gaussians``; ``requires_depth`` says whether it reads
the dataset's depth. New members register in ``RECONSTRUCTORS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..config import GaussiansCfg
from ..errors import ConfigError, DataError
from ..gaussians import Gaussians
from ..geometry import Camera
from ..runtime import resolve_device
from .depth import DepthReconstructorOptions, reconstruct_from_depth


@dataclass(frozen=True)
class ContextViews:
    """The two context views of a sample, as a reconstructor sees them.

    Attributes:
        images: ``[V, H, W, 3]`` uint8 RGB.
        camera: ``[V]`` cameras.
        depth: ``[V, H, W]`` metres (0 = invalid), or None where the dataset has none.
        normals: ``[V, H, W, 3]`` camera-frame normals, or None.
        names: file names, for error messages.
    """

    images: np.ndarray
    camera: Camera
    depth: np.ndarray | None
    normals: np.ndarray | None
    names: tuple[str, ...]


@dataclass(frozen=True)
class Reconstructor:
    name: str
    requires_depth: bool
    reconstruct: Callable[[ContextViews], Gaussians]


def _depth_reconstructor(cfg: GaussiansCfg) -> Reconstructor:
    options = DepthReconstructorOptions(
        covariance=cfg.covariance,
        footprint_scale=cfg.footprint_scale,
        disk_thickness=cfg.disk_thickness,
        opacity=cfg.opacity,
        invalid_depth=cfg.invalid_depth,
    )
    device = resolve_device(cfg.device, "gaussians.device")

    def reconstruct(views: ContextViews) -> Gaussians:
        assert views.depth is not None
        for depth, name in zip(views.depth, views.names):
            if not (depth > 0).any():
                raise DataError(f"frame {name} has no valid depth (all zeros); the depth reconstructor needs it")
            if not np.isfinite(depth).all():
                raise DataError(f"depth of frame {name} contains NaN or inf")
        normals = None
        if cfg.normals == "dataset" and views.normals is not None:
            normals = torch.from_numpy(views.normals).to(device)
        depth = torch.from_numpy(views.depth).to(device)
        return reconstruct_from_depth(depth, views.camera.to(device), options, normals).to("cpu")

    return Reconstructor("depth", requires_depth=True, reconstruct=reconstruct)


RECONSTRUCTORS: dict[str, Callable[[GaussiansCfg], Reconstructor]] = {"depth": _depth_reconstructor}


def build_reconstructor(cfg: GaussiansCfg) -> Reconstructor:
    if cfg.reconstructor not in RECONSTRUCTORS:
        raise ConfigError(f"gaussians.reconstructor = {cfg.reconstructor!r}; choose one of {sorted(RECONSTRUCTORS)}")
    return RECONSTRUCTORS[cfg.reconstructor](cfg)
