"""``snd precompute-gaussians``: reconstruct each context pair once, store its pixel-aligned Gaussians.

Usage::

    snd precompute-gaussians --config pipeline.yaml
    snd precompute-gaussians --shard 0/2 & snd precompute-gaussians --shard 1/2 &   # one store, no merge

Writes the Gaussians artifact (:mod:`snd_stages.artifacts.gaussians`): one unit per context pair, shared by every
sample with that pair.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress

from ..artifacts.gaussians import BYTES_PER_GAUSSIAN, gaussians_spec, pair_unit, pairs_of
from ..artifacts.protocol import Shard, StageResult, finish_if_complete, produce_units, run_stage
from ..artifacts.samples import load_samples
from ..config import DataCfg, SamplingCfg, dump_sections
from ..reconstruct import GaussiansCfg
from ..errors import DataError
from ..gaussians import Gaussians
from ..progress import track
from ..reconstruct import ContextViews, build_reconstructor
from ..runtime import resolve_device
from ..scenes.layout import Scene, read_scene
from ..store import Artifact, ArtifactWriter, Store
from ..throughput import overlapped, phase, unit_processes, units_per_call


def context_views(scene: Scene, positions: tuple[int, int], needs_depth: bool,
                  needs_images: bool = True) -> ContextViews:
    """The views at ``positions`` of ``scene``: their depth (and normals, where the scene has them) if
    ``needs_depth``, their colours if ``needs_images``."""
    depth = normals = None
    if needs_depth:
        if not scene.has("depth"):
            raise DataError(
                f"scene {scene.directory} has no depth/ folder but gaussians.reconstructor needs metric depth; "
                "render depth for the scene (FiT3D's step 3) or use an RGB-only reconstructor"
            )
        depth = np.stack([scene.load_depth(p) for p in positions])
        if scene.has("normals"):
            normals = np.stack([scene.load_normals(p) for p in positions])
    return ContextViews(
        images=np.stack([scene.load_image(p) for p in positions]) if needs_images else None,
        camera=scene.camera[list(positions)],
        depth=depth,
        normals=normals,
        names=tuple(scene.frames[p].name for p in positions),
    )


def write_pairs(gaussians: GaussiansCfg, dataset_root: Path, pairs: dict[str, tuple[str, tuple[int, int], tuple]],
                writer: ArtifactWriter, names: list[str], progress: Progress | None = None,
                description: str = "reconstructing context pairs") -> None:
    """Reconstruct and write the pairs ``names`` (of ``pairs``: name -> scene, context, targets); in any process."""
    if not names:  # a resumed run with nothing left: no model to load
        return
    reconstructor = build_reconstructor(gaussians)
    scene_of = functools.lru_cache(maxsize=None)(functools.partial(read_scene, dataset_root))

    def read(name: str) -> ContextViews:
        scene_id, context, _ = pairs[name]
        return context_views(scene_of(scene_id), context, reconstructor.requires_depth, reconstructor.requires_images)

    device = resolve_device(gaussians.device, "gaussians.device").type
    per_call = 1
    if reconstructor.reconstruct_together is not None:
        camera = scene_of(pairs[names[0]][0]).camera
        per_call = units_per_call(device, 2 * camera.height * camera.width, MOST_PAIRS_PER_CALL)

    def compute(batch: list[str], inputs: list[ContextViews]) -> list[Gaussians]:
        with torch.no_grad():
            return reconstructor.reconstruct_all(inputs)

    def write(name: str, pair_gaussians: Gaussians) -> None:
        scene_id, context, targets = pairs[name]
        writer.write_unit(name, pair_unit(scene_of(scene_id), context, targets, pair_gaussians))

    # Packing and writing a pair (three Zarr arrays) costs more than reconstructing it on a GPU: both run in the
    # writing threads, behind the reconstruction.
    units = overlapped(names, read, compute, write, per_call, compute_device=device)
    for _ in track(units, description, progress, total=len(names), unit="pair"):
        pass


# Context pairs reconstructed per call at most, where the reconstructor takes several at once (the depth one; how many
# fit: throughput.units_per_call).
MOST_PAIRS_PER_CALL = 16


def precompute_gaussians(
    data: DataCfg,
    sampling: SamplingCfg,
    gaussians: GaussiansCfg,
    store: Store,
    force: bool = False,
    shard: Shard = Shard(),
    progress: Progress | None = None,
    workers: int = 0,
) -> StageResult:
    """Write (or resume, or skip) the Gaussians of every context pair of the frozen samples, in ``workers``
    processes (0: as many as the machine keeps busy, see :func:`~snd_stages.throughput.unit_processes`)."""
    shard.allow_force(force)
    samples_artifact, samples = load_samples(store, data, sampling)
    spec = gaussians_spec(gaussians, samples_artifact.key)
    pairs = pairs_of(samples.samples)
    config_yaml = dump_sections(data=data, sampling=sampling, gaussians=gaussians)

    def build(writer: ArtifactWriter) -> Artifact | None:
        writer.prepare({"reconstructor": gaussians.reconstructor})
        todo = [name for name in shard.select(list(pairs)) if name not in writer.done_units()]
        device = resolve_device(gaussians.device, "gaussians.device").type
        processes = unit_processes(workers, len(todo), device, shard.count)
        produce_units(write_pairs, (gaussians, samples.dataset_root, pairs, writer), writer, todo, processes, progress,
                      "reconstructing context pairs", unit="pair")
        with phase("publish"):
            return finish_if_complete(
                writer,
                list(pairs),
                lambda: {
                    "pairs": len(pairs),
                    "gaussians": sum(writer.unit_attributes(name)["count"] for name in writer.done_units()),
                    "bytes_per_gaussian": BYTES_PER_GAUSSIAN,
                },
            )

    return run_stage(store, spec, config_yaml, force, build, expected_units=len(pairs), shard=shard)
