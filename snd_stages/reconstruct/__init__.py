"""Reconstructors: turn two context views into pixel-aligned 3D Gaussians. A registry by name.

A reconstructor is a callable ``(views: ContextViews) -> Gaussians``; ``requires_depth`` says whether it reads
the dataset's depth. New members register in ``RECONSTRUCTORS``.

- ``depth``: one Gaussian per valid pixel from the dataset's metric depth (:mod:`.depth`).
- ``mvsplat``: MVSplat's encoder on the RGB pair with the authors' checkpoint (:mod:`.mvsplat`); it also
  exposes its predicted depth maps (``reconstruct_with_depth``).
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
    """A named reconstructor.

    Attributes:
        name: its key in :data:`RECONSTRUCTORS` (``gaussians.reconstructor``).
        requires_depth: whether it reads the dataset's depth.
        reconstruct: context views -> Gaussians (on the CPU).
        reconstruct_with_depth: for reconstructors that predict depth, context views -> (Gaussians, their own
            ``[V, H, W]`` depth maps in metres, on the CPU), e.g. to evaluate that depth; None otherwise.
    """

    name: str
    requires_depth: bool
    reconstruct: Callable[[ContextViews], Gaussians]
    reconstruct_with_depth: Callable[[ContextViews], tuple[Gaussians, torch.Tensor]] | None = None


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


def _mvsplat_reconstructor(cfg: GaussiansCfg) -> Reconstructor:
    # Imported here: only this reconstructor needs the encoder (and, through it, e3nn).
    from .mvsplat import load_mvsplat_encoder, reconstruct_pair

    if cfg.mvsplat_checkpoint is None:
        raise ConfigError("gaussians.reconstructor = 'mvsplat' needs gaussians.mvsplat_checkpoint (re10k.ckpt)")
    if not cfg.mvsplat_checkpoint.is_file():
        raise ConfigError(
            f"gaussians.mvsplat_checkpoint = {str(cfg.mvsplat_checkpoint)!r} does not exist; point it at the MVSplat "
            "authors' RE10K checkpoint (re10k.ckpt) or a .safetensors copy of it"
        )
    device = resolve_device(cfg.device, "gaussians.device")
    encoder = load_mvsplat_encoder(cfg.mvsplat_checkpoint, device)

    def reconstruct_with_depth(views: ContextViews) -> tuple[Gaussians, torch.Tensor]:
        result = reconstruct_pair(encoder, views.images, views.camera, cfg.near, cfg.far, views.names)
        return result.gaussians, result.depth

    return Reconstructor(
        "mvsplat",
        requires_depth=False,
        reconstruct=lambda views: reconstruct_with_depth(views)[0],
        reconstruct_with_depth=reconstruct_with_depth,
    )


RECONSTRUCTORS: dict[str, Callable[[GaussiansCfg], Reconstructor]] = {
    "depth": _depth_reconstructor,
    "mvsplat": _mvsplat_reconstructor,
}


def build_reconstructor(cfg: GaussiansCfg) -> Reconstructor:
    if cfg.reconstructor not in RECONSTRUCTORS:
        raise ConfigError(f"gaussians.reconstructor = {cfg.reconstructor!r}; choose one of {sorted(RECONSTRUCTORS)}")
    return RECONSTRUCTORS[cfg.reconstructor](cfg)
