"""``snd precompute-operators``: each training sample's teacher path as one sparse operator (the fast path).

Usage::

    snd precompute-operators --config pipeline.yaml
    snd precompute-operators --shard 0/2 & snd precompute-operators --shard 1/2 &   # one store, no merge

Given a sample's stored Gaussians, masks and target camera, the teacher's mask-aware upsampling, lifting,
splatting, blending and downsampling form a fixed linear map from its context tokens to its target tokens
(``splat/operator.py``). It is composed once here, from the renderer's own compositing weights (gsplat on CUDA,
the torch twin on CPU), and ``snd train`` (``train.teacher_splatting: operator``) applies it as three sparse
matmuls instead of rendering. One unit per (context pair, target frame):

=========================  ========  ==============================================================
array                      dtype     meaning
=========================  ========  ==============================================================
local_crow / _col / _values  int32 / uint16 / float32   CSR ``[T, S]``: rendered features, downsampled
segment_means_*            as above  CSR ``[K, S]``: mean of the rendered features over each target segment
segment_spread_*           as above  CSR ``[T, K]``: each token's share of each segment mean
*_shape                    int64     the matrices' shapes
coverage                   bool      ``[th, tw]`` tokens some Gaussian reached
context_grid               int64     ``(h, w)`` the teacher's token grid of a context view
=========================  ========  ==============================================================

The key holds what changes the map: the Gaussians and masks artifacts, the samples, the ViT patch size and
``train.mask_aware_upsampling`` / ``train.reference_quirks``. The blending coefficient is applied at training
time, so changing it needs no new operators.
"""

from __future__ import annotations

import numpy as np
import torch
from rich.progress import Progress

from ..config import DataCfg, GaussiansCfg, MasksCfg, SamplingCfg, TrainCfg, dump_sections
from ..models.backbones import backbone_spec
from ..progress import track
from ..runtime import resolve_device
from ..splat.operator import SplatOperator, build_splat_operator
from ..splat.quirks import render_inputs
from ..store import Artifact, ArtifactSpec, ArtifactWriter, Store
from .common import Shard, StageResult, finish_if_complete, run_stage
from .precompute_gaussians import load_gaussians, pair_unit_name, read_pair
from .precompute_masks import MaskReader, load_masks
from .sample_views import load_samples

STAGE = "operators"
SCHEMA_VERSION = 1


def operator_unit_name(scene: str, context: tuple[int, int], target: int) -> str:
    return f"{pair_unit_name(scene, context)}--{target:05d}"


def operators_spec(train: TrainCfg, samples_key: str, gaussians_key: str, masks_key: str) -> ArtifactSpec:
    params = {"patch": backbone_spec(train.backbone).patch, "mask_aware_upsampling": train.mask_aware_upsampling,
              "reference_quirks": train.reference_quirks}
    return ArtifactSpec(STAGE, SCHEMA_VERSION, params=params,
                        inputs={"samples": samples_key, "gaussians": gaussians_key, "masks": masks_key})


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
) -> StageResult:
    """Write (or resume, or skip) the sparse teacher operator of every (context pair, target) of the samples."""
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
        read_mask = MaskReader(masks_artifact)
        todo = [name for name in shard.select(list(units)) if name not in writer.done_units()]
        pair_name, pair = None, None
        for name in track(todo, "composing teacher operators", progress, unit="sample"):
            scene_id, context, target = units[name]
            if pair_unit_name(scene_id, context) != pair_name:  # units are sorted, so a pair's targets are adjacent
                pair_name = pair_unit_name(scene_id, context)
                pair = read_pair(gaussians_artifact.unit(pair_name))
                pair_gaussians = pair.gaussians.to(device)
                context_masks = torch.stack([read_mask(scene_id, p) for p in context]).to(device)
            index = pair.target_index(target)
            rendered_gaussians, camera = render_inputs(pair_gaussians, pair.target_camera[index : index + 1],
                                                       train.reference_quirks)
            operator = build_splat_operator(
                rendered_gaussians, camera, context_masks, read_mask(scene_id, target).to(device),
                context_grid=backbone.token_grid(*context_masks.shape[-2:]),
                target_grid=backbone.token_grid(camera.height, camera.width),
                mask_aware_upsampling=train.mask_aware_upsampling,
            )
            with writer.unit(name) as group:
                arrays = operator.to_arrays()
                for array_name, values in arrays.items():
                    group.create_array(array_name, data=values)
                group.attrs.update({"scene": scene_id, "context_positions": list(context), "target_position": target,
                                    "nonzeros": operator.nonzeros(),
                                    "bytes": int(sum(values.nbytes for values in arrays.values()))})
        def counts() -> dict:
            stored = [writer.unit_attributes(name)["bytes"] for name in writer.done_units()]
            return {"samples": len(units), "bytes_per_sample": int(np.mean(stored)) if stored else 0}

        return finish_if_complete(writer, list(units), counts)

    return run_stage(store, spec, config_yaml, force, build, expected_units=len(units), shard=shard)


def load_operators(store: Store, train: TrainCfg, samples_key: str, gaussians_key: str, masks_key: str) -> Artifact:
    spec = operators_spec(train, samples_key, gaussians_key, masks_key)
    return store.open(spec.stage, spec.key, SCHEMA_VERSION)


def read_operator(group) -> SplatOperator:
    return SplatOperator.from_arrays(group)
