"""``snd check-geometry``: a real check of cameras, poses and Gaussians by re-rendering colours.

Usage::

    snd check-geometry --config pipeline.yaml --pairs 4 --out data/reports

Every Gaussian gets the colour of the context pixel it was born from (the same lifting that carries teacher
features) and is splatted to each target camera of the pair. Where the render is covered, it must reproduce the
real target image: a flipped axis, a transposed pose or an ignored principal point shows up at once as a low
PSNR. Reports PSNR and coverage per target and writes a PNG (target | render | error | coverage) per pair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.progress import Progress

from ..artifacts.gaussians import PairGaussians, load_gaussians, read_pair
from ..artifacts.samples import load_samples
from ..config import DataCfg, SamplingCfg
from ..reconstruct import GaussiansCfg
from ..errors import ArtifactError, ConfigError
from ..gaussians import export_point_cloud_ply
from ..geometry import Camera, image_to_tensor
from ..progress import track
from ..scenes.layout import read_scene
from ..splat.features import lift_features
from ..splat.render import render_features
from ..store import Store

# A pixel counts as covered when the splatted surface is (nearly) opaque there.
COVERED_ALPHA = 0.5


@dataclass(frozen=True)
class TargetCheck:
    pair: str
    target_frame: str
    psnr: float
    coverage: float


@dataclass(frozen=True)
class GeometryReport:
    checks: list[TargetCheck]
    pictures: list[Path]

    @property
    def mean_psnr(self) -> float:
        return float(np.mean([c.psnr for c in self.checks]))

    @property
    def mean_coverage(self) -> float:
        return float(np.mean([c.coverage for c in self.checks]))


def render_source_colours(pair: PairGaussians, context_images: torch.Tensor, camera: Camera, device="cpu"):
    """Splat each Gaussian with its source pixel's colour to ``camera``.

    Args:
        context_images: ``[2, 3, H, W]`` float in [0, 1], the pair's context images.
        camera: ``[T]`` target cameras.

    Returns:
        (``[T, H, W, 3]`` colours, ``[T, H, W]`` alpha)
    """
    colours = lift_features(context_images, pair.gaussians)
    gaussians = pair.gaussians.to(device)
    rendered = render_features(gaussians, colours.to(device), camera.to(device=device, dtype=torch.float32))
    return rendered.features.cpu(), rendered.alpha.cpu()


def psnr_where_covered(rendered: torch.Tensor, target: torch.Tensor, alpha: torch.Tensor) -> tuple[float, float]:
    """PSNR (dB) of ``rendered`` vs ``target`` (both [H, W, 3] in [0, 1]) over covered pixels, and the coverage."""
    covered = alpha > COVERED_ALPHA
    coverage = float(covered.float().mean())
    if not covered.any():
        return 0.0, coverage
    mse = float(((rendered - target) ** 2)[covered].mean())
    return 10.0 * math.log10(1.0 / max(mse, 1e-12)), coverage


def check_geometry(
    data: DataCfg,
    sampling: SamplingCfg,
    gaussians_cfg: GaussiansCfg,
    store: Store,
    max_pairs: int = 4,
    out_dir: Path | None = None,
    device: str = "cpu",
    progress: Progress | None = None,
) -> GeometryReport:
    """Re-render the first ``max_pairs`` context pairs' colours at their targets and compare with the images."""
    if max_pairs < 1:
        raise ConfigError(f"--pairs {max_pairs}: check at least 1 context pair")
    samples_artifact, samples = load_samples(store, data, sampling)
    artifact = load_gaussians(store, gaussians_cfg, samples_artifact.key)
    checks, pictures = [], []
    for name in track(artifact.units()[:max_pairs], "re-rendering colours", progress, unit="pair"):
        pair = read_pair(artifact.load_unit(name))
        scene = read_scene(samples.dataset_root, pair.scene)
        context = torch.stack([image_to_tensor(scene.load_image(p)) for p in pair.context_positions])
        rendered, alpha = render_source_colours(pair, context, pair.target_camera, device)
        rows = []
        for index, position in enumerate(pair.target_positions):
            target = image_to_tensor(scene.load_image(position)).permute(1, 2, 0)
            psnr, coverage = psnr_where_covered(rendered[index], target, alpha[index])
            checks.append(TargetCheck(name, scene.frames[position].name, psnr, coverage))
            rows.append(_picture_row(target, rendered[index], alpha[index]))
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            path = out_dir / f"geometry-{name}.png"
            Image.fromarray(np.concatenate(rows, axis=0)).save(path)
            pictures.append(path)
    return GeometryReport(checks, pictures)


def export_pair_ply(
    data: DataCfg, sampling: SamplingCfg, gaussians_cfg: GaussiansCfg, store: Store, pair_name: str | None, path: Path
) -> str:
    """Write one stored pair's Gaussians, coloured by their source pixels, as a PLY point cloud; returns the pair."""
    samples_artifact, samples = load_samples(store, data, sampling)
    artifact = load_gaussians(store, gaussians_cfg, samples_artifact.key)
    names = artifact.units()
    pair_name = pair_name or names[0]
    if pair_name not in names:
        raise ArtifactError(f"no pair {pair_name!r} in {artifact.path}; pairs look like {names[0]!r}")
    pair = read_pair(artifact.load_unit(pair_name))
    scene = read_scene(samples.dataset_root, pair.scene)
    context = torch.stack([image_to_tensor(scene.load_image(p)) for p in pair.context_positions])
    export_point_cloud_ply(pair.gaussians, lift_features(context, pair.gaussians), path)
    return pair_name


def _picture_row(target: torch.Tensor, rendered: torch.Tensor, alpha: torch.Tensor) -> np.ndarray:
    """target | render | error (x4, covered pixels) | coverage, as uint8 RGB."""
    covered = (alpha > COVERED_ALPHA)[..., None]
    error = ((rendered - target).abs() * 4).clamp(0, 1) * covered
    coverage = alpha[..., None].expand(-1, -1, 3)
    row = torch.cat([target, rendered.clamp(0, 1), error, coverage], dim=1)
    return (row * 255).round().to(torch.uint8).numpy()
