"""``snd precompute-operators``: each training sample's teacher path as one sparse operator (the fast path).

Usage::

    snd precompute-operators --config pipeline.yaml
    snd precompute-operators --shard 0/2 & snd precompute-operators --shard 1/2 &   # one store, no merge

Given a sample's stored Gaussians, masks and target camera, the teacher's mask-aware upsampling, lifting,
splatting, blending and downsampling form a fixed linear map from its context tokens to its target tokens
(``splat/operator.py``). It is composed once here, from the renderer's own compositing weights (gsplat on CUDA,
the torch twin on CPU), and ``snd train`` (``train.teacher_splatting: operator``) applies it as three sparse
matmuls instead of rendering. Writes the operators artifact (:mod:`snd_stages.artifacts.operators`): one unit per
(context pair, target frame).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from rich.progress import Progress

from ..artifacts.gaussians import PairGaussians, load_gaussians, pair_unit_name, read_pair
from ..artifacts.masks import MaskReader, load_masks
from ..artifacts.operators import operators_spec, operator_unit, operator_unit_name
from ..artifacts.protocol import Shard, StageResult, finish_if_complete, produce_units, run_stage
from ..artifacts.samples import load_samples
from ..config import DataCfg, SamplingCfg, TrainCfg, dump_sections
from ..masks import MasksCfg
from ..models.backbones import backbone_spec
from ..reconstruct import GaussiansCfg
from ..progress import track
from ..runtime import resolve_device
from ..splat.operator import OperatorInputs, SplatOperator, build_splat_operators
from ..splat.quirks import render_inputs
from ..store import Artifact, ArtifactWriter, Store
from ..throughput import overlapped, phase, unit_processes, units_per_call


def write_operators(gaussians_artifact: Artifact, masks_artifact: Artifact, train: TrainCfg,
                    units: dict[str, tuple[str, tuple[int, int], int]], writer: ArtifactWriter, names: list[str],
                    progress: Progress | None = None, description: str = "composing teacher operators") -> None:
    """Compose and write the operators of the samples ``names`` (of ``units``: name -> scene, context, target); in
    any process."""
    if not names:
        return
    device = resolve_device(train.device, "train.device")
    backbone = backbone_spec(train.backbone)
    read_mask = MaskReader(masks_artifact)

    # Units are sorted, so a pair's targets are adjacent: its Gaussians and context masks are read once (the reading
    # threads run a few units ahead, hence a few pairs cached) and moved to the device once.
    @functools.lru_cache(maxsize=8)
    def pair_inputs(scene_id: str, context: tuple[int, int]) -> tuple[PairGaussians, torch.Tensor]:
        pair = read_pair(gaussians_artifact.load_unit(pair_unit_name(scene_id, context)))
        return pair, torch.stack([read_mask(scene_id, p) for p in context])

    def read(name: str) -> tuple[PairGaussians, torch.Tensor, torch.Tensor]:  # one unit
        scene_id, context, target = units[name]
        return (*pair_inputs(scene_id, context), read_mask(scene_id, target))

    per_call = units_per_call(device.type, render_pixels(gaussians_artifact, units[names[0]]), MOST_UNITS_PER_CALL)
    on_device: dict[str, object] = {}

    def compute(batch: list[str],
                inputs: list[tuple[PairGaussians, torch.Tensor, torch.Tensor]]) -> list[SplatOperator]:
        samples = []
        for name, (pair, context_masks, target_mask) in zip(batch, inputs):
            if on_device.get("pair") is not pair:
                on_device.update(pair=pair, gaussians=pair.gaussians.to(device), masks=context_masks.to(device))
            index = pair.target_index(units[name][2])
            rendered_gaussians, camera = render_inputs(on_device["gaussians"], pair.target_camera[index : index + 1],
                                                       train.reference_quirks)
            samples.append(OperatorInputs(rendered_gaussians, camera, on_device["masks"], target_mask.to(device)))
        operators = []
        for group in _same_size_runs(samples):  # composed together: one call per size in the batch
            height, width = group[0].context_masks.shape[-2:]
            camera = group[0].target_camera
            operators += build_splat_operators(
                group, context_grid=backbone.token_grid(height, width),
                target_grid=backbone.token_grid(camera.height, camera.width),
                mask_aware_upsampling=train.mask_aware_upsampling, output_device="cpu")
        return operators

    def write(name: str, operator: SplatOperator) -> None:
        writer.write_unit(name, operator_unit(operator, *units[name]))

    # Packing and writing a unit is small but Python (Zarr): both run in the writing threads, behind the composition.
    composed = overlapped(names, read, compute, write, per_call, compute_device=device.type)
    for _ in track(composed, description, progress, total=len(names), unit="sample"):
        pass


def precompute_operators(
    data: DataCfg,
    sampling: SamplingCfg,
    gaussians: GaussiansCfg,
    masks: MasksCfg,
    train: TrainCfg,
    store: Store,
    force: bool = False,
    shard: Shard = Shard(),
    progress: Progress | None = None,
    workers: int = 0,
) -> StageResult:
    """Write (or resume, or skip) the sparse teacher operator of every (context pair, target) of the samples, in
    ``workers`` processes (0: as many as the machine keeps busy, see :func:`~snd_stages.throughput.unit_processes`)."""
    shard.allow_force(force)
    samples_artifact, samples = load_samples(store, data, sampling)
    gaussians_artifact = load_gaussians(store, gaussians, samples_artifact.key)
    masks_artifact = load_masks(store, masks, samples_artifact.key)
    spec = operators_spec(train, samples_artifact.key, gaussians_artifact.key, masks_artifact.key)
    units = {}
    for sample in samples.samples:
        for target in sample.targets:
            units[operator_unit_name(sample.scene, sample.context, target)] = (sample.scene, sample.context, target)
    units = dict(sorted(units.items()))
    config_yaml = dump_sections(data=data, sampling=sampling, gaussians=gaussians, masks=masks, train=train)
    device = resolve_device(train.device, "train.device")
    backbone = backbone_spec(train.backbone)

    def build(writer: ArtifactWriter) -> Artifact | None:
        writer.prepare({"patch": backbone.patch})
        todo = [name for name in shard.select(list(units)) if name not in writer.done_units()]
        processes = unit_processes(workers, len(todo), device.type, shard.count)
        produce_units(write_operators, (gaussians_artifact, masks_artifact, train, units, writer), writer, todo,
                      processes, progress, "composing teacher operators", unit="sample")

        def counts() -> dict:
            stored = [writer.unit_attributes(name)["bytes"] for name in writer.done_units()]
            return {"samples": len(units), "bytes_per_sample": int(np.mean(stored)) if stored else 0}

        with phase("publish"):
            return finish_if_complete(writer, list(units), counts)

    return run_stage(store, spec, config_yaml, force, build, expected_units=len(units), shard=shard)


# Samples composed per call at most (how many fit: throughput.units_per_call).
MOST_UNITS_PER_CALL = 32


def render_pixels(gaussians_artifact: Artifact, unit: tuple[str, tuple[int, int], int]) -> int:
    """The pixels a unit's operator renders: its context pair's frame size."""
    scene_id, context, _ = unit
    attributes = gaussians_artifact.unit(pair_unit_name(scene_id, context)).attrs
    return attributes["height"] * attributes["width"]


def _same_size_runs(samples: list[OperatorInputs]) -> list[list[OperatorInputs]]:
    """Consecutive runs of samples sharing their context and target sizes (a dataset's frames usually all do)."""
    runs: list[list[OperatorInputs]] = []
    for sample in samples:
        size = (tuple(sample.context_masks.shape), tuple(sample.target_mask.shape))
        if runs and (tuple(runs[-1][0].context_masks.shape), tuple(runs[-1][0].target_mask.shape)) == size:
            runs[-1].append(sample)
        else:
            runs.append([sample])
    return runs
