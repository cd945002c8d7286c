"""Reconstructors: turn two context views into pixel-aligned 3D Gaussians. A registry by name.

A reconstructor is a callable ``(views: ContextViews) -> Gaussians``; ``requires_depth`` says whether it reads
the dataset's depth. Each entry of :data:`RECONSTRUCTORS` owns its settings (a sub-section of ``gaussians`` named
after it, whose dataclass lives beside it), builds the reconstructor from them, and says what of them enters the
Gaussians' key. Adding one: its module with its settings dataclass, and one entry here (which names the settings:
``gaussians.<name>`` follows from it).

- ``depth``: one Gaussian per valid pixel from the dataset's metric depth (:mod:`.depth`).
- ``mvsplat``: MVSplat's encoder on the RGB pair with the authors' checkpoint (:mod:`.mvsplat`); it also
  exposes its predicted depth maps (``reconstruct_with_depth``).
- ``depthsplat``: DepthSplat's encoder (cost volume fused with DINOv2) on the RGB pair with the authors'
  checkpoint (:mod:`.depthsplat`); it exposes its predicted depth maps too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch

from ..config import require, require_choice, to_dict, with_sub_sections
from ..errors import ConfigError, DataError
from ..gaussians import Gaussians
from ..geometry import Camera
from ..runtime import resolve_device
from ..store import checkpoint_by_content
from .depth import DepthSettings, reconstruct_from_depth
from .depthsplat.settings import DepthSplatSettings
from .mvsplat.settings import MVSplatSettings


@dataclass(frozen=True)
class ContextViews:
    """The two context views of a sample, as a reconstructor sees them.

    Attributes:
        images: ``[V, H, W, 3]`` uint8 RGB, or None for a reconstructor that does not look at them.
        camera: ``[V]`` cameras.
        depth: ``[V, H, W]`` metres (0 = invalid), or None where the dataset has none.
        normals: ``[V, H, W, 3]`` camera-frame normals, or None.
        names: file names, for error messages.
    """

    images: np.ndarray | None
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
        requires_images: whether it looks at the views' colours (the depth one does not: decoding them is a third
            of reading a demo pair's inputs).
        reconstruct: context views -> Gaussians (on the CPU).
        reconstruct_with_depth: for reconstructors that predict depth, context views -> (Gaussians, their own
            ``[V, H, W]`` depth maps in metres, on the CPU), e.g. to evaluate that depth; None otherwise.
        reconstruct_together: for reconstructors that can take several pairs in one call, exactly what
            ``reconstruct`` gives each (on a GPU, one call's launches and synchronisations shared by the pairs);
            None otherwise.
    """

    name: str
    requires_depth: bool
    requires_images: bool
    reconstruct: Callable[[ContextViews], Gaussians]
    reconstruct_with_depth: Callable[[ContextViews], tuple[Gaussians, torch.Tensor]] | None = None
    reconstruct_together: Callable[[list[ContextViews]], list[Gaussians]] | None = None

    def reconstruct_all(self, pairs: list[ContextViews]) -> list[Gaussians]:
        """The Gaussians of each of ``pairs``: in one call where the reconstructor can, else one call each."""
        if self.reconstruct_together is not None and len(pairs) > 1:
            return self.reconstruct_together(pairs)
        return [self.reconstruct(views) for views in pairs]


def _depth_reconstructor(settings: DepthSettings, device: torch.device) -> Reconstructor:
    def reconstruct(views: ContextViews) -> Gaussians:
        return reconstruct_together([views])[0]

    def reconstruct_together(pairs: list[ContextViews]) -> list[Gaussians]:
        # Every pixel's Gaussian depends on its own view alone, so the views of all the pairs are reconstructed as one
        # set and split again: the same values as one pair at a time (tests/test_reconstruct_depth.py).
        assert all(views.depth is not None for views in pairs)
        if len({(views.depth.shape, views.normals is None) for views in pairs}) > 1:  # not one set: one at a time
            return [gaussians for views in pairs for gaussians in reconstruct_together([views])]
        for views in pairs:
            for depth, name in zip(views.depth, views.names):
                if not (depth > 0).any():
                    raise DataError(f"frame {name} has no valid depth (all zeros); the depth reconstructor needs it")
                if not np.isfinite(depth).all():
                    raise DataError(f"depth of frame {name} contains NaN or inf")
        normals = None
        if settings.normals == "dataset" and pairs[0].normals is not None:
            normals = torch.from_numpy(np.concatenate([views.normals for views in pairs])).to(device)
        depth = torch.from_numpy(np.concatenate([views.depth for views in pairs])).to(device)
        camera = Camera.cat([views.camera for views in pairs]).to(device)
        together = reconstruct_from_depth(depth, camera, settings, normals).to("cpu")
        return together.split_by_view(views_per_set=pairs[0].depth.shape[0], sets=len(pairs))

    return Reconstructor("depth", requires_depth=True, requires_images=False, reconstruct=reconstruct,
                         reconstruct_together=reconstruct_together)


def _require_checkpoint(name: str, path: Path, what: str) -> None:
    if not path.is_file():
        raise ConfigError(f"gaussians.{name}.checkpoint = {str(path)!r} does not exist; point it at {what}")


def _pair_reconstructor(name: str, encoder: Any, near: float, far: float) -> Reconstructor:
    """A reconstructor running a feed-forward pair encoder (MVSplat's boundary, :func:`.mvsplat.reconstruct_pair`)."""
    from .mvsplat import reconstruct_pair

    def reconstruct_with_depth(views: ContextViews) -> tuple[Gaussians, torch.Tensor]:
        result = reconstruct_pair(encoder, views.images, views.camera, near, far, views.names)
        return result.gaussians, result.depth

    return Reconstructor(
        name,
        requires_depth=False,
        requires_images=True,
        reconstruct=lambda views: reconstruct_with_depth(views)[0],
        reconstruct_with_depth=reconstruct_with_depth,
    )


def _mvsplat_reconstructor(settings: MVSplatSettings, device: torch.device) -> Reconstructor:
    # Imported here: only this reconstructor needs the encoder (and, through it, e3nn).
    from .mvsplat import load_mvsplat_encoder

    _require_checkpoint("mvsplat", settings.checkpoint,
                        "the MVSplat authors' RE10K checkpoint (re10k.ckpt) or a .safetensors copy of it")
    encoder = load_mvsplat_encoder(settings.checkpoint, device)
    return _pair_reconstructor("mvsplat", encoder, settings.near, settings.far)


def _depthsplat_reconstructor(settings: DepthSplatSettings, device: torch.device) -> Reconstructor:
    # Imported here: only this reconstructor needs the encoder (and, through it, timm's DINOv2 and e3nn).
    from .depthsplat import load_depthsplat_encoder

    _require_checkpoint("depthsplat", settings.checkpoint,
                        "one of the DepthSplat authors' checkpoints (.pth) or a .safetensors copy of it")
    encoder = load_depthsplat_encoder(settings.checkpoint, device, settings.model)
    return _pair_reconstructor("depthsplat", encoder, settings.near, settings.far)


def _settings_key(settings: Any) -> tuple[dict, dict]:
    """Every setting enters the Gaussians' key as it is."""
    return to_dict(settings), {}


def _checkpoint_key(name: str) -> Callable[[Any], tuple[dict, dict]]:
    """The settings' parameters, with the checkpoint entering the key by its contents."""
    return lambda settings: checkpoint_by_content(
        to_dict(settings), "checkpoint", f"{name}_checkpoint_sha256", f"gaussians.{name}.checkpoint"
    )


@dataclass(frozen=True)
class ReconstructorEntry:
    """A registered reconstructor.

    Attributes:
        settings: its settings' dataclass, the sub-section ``gaussians.<name>`` of :class:`GaussiansCfg`.
        build: (its settings, device) -> the reconstructor.
        key: its settings -> (what enters the Gaussians' key as parameters, as input identities).
        needs: a check of its settings before any work: None, or (the missing setting, what it must be).
    """

    settings: type
    build: Callable[[Any, torch.device], Reconstructor]
    key: Callable[[Any], tuple[dict, dict]] = _settings_key
    needs: Callable[[Any], tuple[str, str] | None] = lambda settings: None


RECONSTRUCTORS: dict[str, ReconstructorEntry] = {
    "depth": ReconstructorEntry(DepthSettings, _depth_reconstructor),
    "mvsplat": ReconstructorEntry(
        MVSplatSettings, _mvsplat_reconstructor, key=_checkpoint_key("mvsplat"),
        needs=lambda settings: None if settings.checkpoint is not None else (
            "checkpoint", "the path to MVSplat's RE10K checkpoint (re10k.ckpt from the authors' release, or a "
                          ".safetensors copy)")),
    "depthsplat": ReconstructorEntry(
        DepthSplatSettings, _depthsplat_reconstructor, key=_checkpoint_key("depthsplat"),
        needs=lambda settings: None if settings.checkpoint is not None else (
            "checkpoint", "the path to one of DepthSplat's checkpoints (the authors' .pth, or a .safetensors "
                          "copy)")),
}


@dataclass(frozen=True)
class _GaussiansSection:
    # depth: from the dataset's metric depth; mvsplat / depthsplat: MVSplat's / DepthSplat's encoder on the RGB
    # pair (each needs its checkpoint)
    reconstructor: str = "depth"
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda when available

    def __post_init__(self) -> None:
        require_choice("gaussians.reconstructor", self.reconstructor, RECONSTRUCTORS)
        missing = RECONSTRUCTORS[self.reconstructor].needs(self.settings)
        if missing is not None:
            setting, expected = missing
            require(False, f"gaussians.{self.reconstructor}.{setting}", getattr(self.settings, setting),
                    f"{expected} when gaussians.reconstructor = {self.reconstructor!r}")

    @property
    def settings(self) -> Any:
        """The chosen reconstructor's settings (its sub-section)."""
        return getattr(self, self.reconstructor)

    def key(self) -> tuple[dict, dict]:
        """What enters the Gaussians' key: the reconstructor's name and its settings' parameters, and their input
        identities (e.g. a checkpoint's sha256). Not the device: it does not change what is produced."""
        params, inputs = RECONSTRUCTORS[self.reconstructor].key(self.settings)
        return {"reconstructor": self.reconstructor, self.reconstructor: params}, inputs


GaussiansCfg = with_sub_sections(
    _GaussiansSection, "GaussiansCfg", {name: entry.settings for name, entry in RECONSTRUCTORS.items()},
    """``snd precompute-gaussians``: which reconstructor turns each context pair into pixel-aligned Gaussians, and
    each registered reconstructor's settings as a sub-section named after it (only the chosen one's are used, and
    enter the key).""")


def build_reconstructor(cfg: GaussiansCfg) -> Reconstructor:
    device = resolve_device(cfg.device, "gaussians.device")
    return RECONSTRUCTORS[cfg.reconstructor].build(cfg.settings, device)
