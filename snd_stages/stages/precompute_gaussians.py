"""``snd precompute-gaussians``: reconstruct each context pair once, store its pixel-aligned Gaussians.

Usage::

    snd precompute-gaussians --config pipeline.yaml
    snd precompute-gaussians --shard 0/2 & snd precompute-gaussians --shard 1/2 &   # one store, no merge

One unit per context pair (``<scene>--<first>-<second>``), shared by every sample with that pair. A unit holds:

=========================  ==============  ===========  =============================================
array                      shape           dtype        meaning
=========================  ==============  ===========  =============================================
means                      [N, 3]          float32      world positions (metres)
quats                      [N, 4]          float16      unit wxyz rotations
scales                     [N, 3]          float16      standard deviations (metres; relative error 5e-4)
opacities                  [N]             float16
source_view                [N]             uint8        context view each Gaussian was born from
source_pixel               [N]             int32        row-major pixel index in that view
context_intrinsics         [2, 3, 3]       float64      K in pixels of height x width
context_world_to_camera    [2, 4, 4]       float64      OpenCV world-to-camera
target_positions           [T]             int32        every target frame of the pair's samples
target_intrinsics          [T, 3, 3]       float64
target_world_to_camera     [T, 4, 4]       float64
=========================  ==============  ===========  =============================================

Positions stay float32 (a float16 mean would move by ~2 mm at 5 m, a visible fraction of a pixel);
orientation, size and opacity tolerate half precision: 33 bytes per Gaussian before compression.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from rich.progress import Progress

from ..config import DataCfg, GaussiansCfg, SamplingCfg, dump_sections, to_dict
from ..errors import DataError
from ..gaussians import Gaussians
from ..geometry import Camera
from ..progress import track
from ..reconstruct import ContextViews, build_reconstructor
from ..scenes.layout import Scene, read_scene
from ..scenes.sampling import ViewSample
from ..store import Artifact, ArtifactSpec, ArtifactWriter, Store, file_sha256
from .common import Shard, StageResult, finish_if_complete, run_stage
from .sample_views import load_samples

STAGE = "gaussians"
SCHEMA_VERSION = 1
BYTES_PER_GAUSSIAN = 12 + 8 + 6 + 2 + 1 + 4  # means, quats, scales, opacities, source_view, source_pixel


def pair_unit_name(scene: str, context: tuple[int, int]) -> str:
    return f"{scene}--{context[0]:05d}-{context[1]:05d}"


@dataclass(frozen=True)
class PairGaussians:
    """One stored context pair, as later stages read it."""

    scene: str
    context_positions: tuple[int, int]
    gaussians: Gaussians
    context_camera: Camera
    target_positions: list[int]
    target_camera: Camera

    def target_index(self, position: int) -> int:
        return self.target_positions.index(position)


def gaussians_spec(gaussians: GaussiansCfg, samples_key: str) -> ArtifactSpec:
    # Where the reconstruction runs does not change what it produces, so the device stays out of the key.
    params = {name: value for name, value in to_dict(gaussians).items() if name != "device"}
    inputs = {"samples": samples_key}
    if gaussians.reconstructor == "mvsplat":  # the checkpoint's contents, not where it lies
        del params["mvsplat_checkpoint"]
        inputs["mvsplat_checkpoint_sha256"] = file_sha256(gaussians.mvsplat_checkpoint, "gaussians.mvsplat_checkpoint")
    return ArtifactSpec(STAGE, SCHEMA_VERSION, params=params, inputs=inputs)


def pairs_of(samples: list[ViewSample]) -> dict[str, tuple[str, tuple[int, int], list[int]]]:
    """Unit name -> (scene, context positions, sorted target positions of every sample sharing the pair)."""
    pairs: dict[str, tuple[str, tuple[int, int], set[int]]] = {}
    for sample in samples:
        name = pair_unit_name(sample.scene, sample.context)
        pairs.setdefault(name, (sample.scene, sample.context, set()))[2].update(sample.targets)
    return {name: (scene, context, sorted(targets)) for name, (scene, context, targets) in sorted(pairs.items())}


def context_views(scene: Scene, positions: tuple[int, int], needs_depth: bool) -> ContextViews:
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
        images=np.stack([scene.load_image(p) for p in positions]),
        camera=scene.camera[list(positions)],
        depth=depth,
        normals=normals,
        names=tuple(scene.frames[p].name for p in positions),
    )


def precompute_gaussians(
    data: DataCfg,
    sampling: SamplingCfg,
    gaussians: GaussiansCfg,
    store: Store,
    force: bool = False,
    shard: Shard = Shard(),
    progress: Progress | None = None,
) -> StageResult:
    """Write (or resume, or skip) the Gaussians of every context pair of the frozen samples."""
    shard.allow_force(force)
    samples_artifact, samples = load_samples(store, data, sampling)
    spec = gaussians_spec(gaussians, samples_artifact.key)
    pairs = pairs_of(samples.samples)
    config_yaml = dump_sections(data=data, sampling=sampling, gaussians=gaussians)

    def build(writer: ArtifactWriter) -> Artifact | None:
        writer.prepare({"reconstructor": gaussians.reconstructor})
        reconstructor = build_reconstructor(gaussians)
        todo = [name for name in shard.select(list(pairs)) if name not in writer.done_units()]
        scenes: dict[str, Scene] = {}
        for name in track(todo, "reconstructing context pairs", progress, unit="pair"):
            scene_id, context, targets = pairs[name]
            if scene_id not in scenes:
                scenes[scene_id] = read_scene(samples.dataset_root, scene_id)
            scene = scenes[scene_id]
            views = context_views(scene, context, reconstructor.requires_depth)
            with torch.no_grad():
                result = reconstructor.reconstruct(views)
            with writer.unit(name) as group:
                write_pair(group, scene, context, targets, result)
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


def write_pair(group, scene: Scene, context: tuple[int, int], targets: list[int], gaussians: Gaussians) -> None:
    count = len(gaussians)
    chunk = min(count, 1 << 18)
    arrays = {
        "means": gaussians.means.numpy().astype(np.float32),
        "quats": gaussians.quats.numpy().astype(np.float16),
        "scales": gaussians.scales.numpy().astype(np.float16),
        "opacities": gaussians.opacities.numpy().astype(np.float16),
        "source_view": gaussians.source_view.numpy().astype(np.uint8),
        "source_pixel": gaussians.source_pixel.numpy().astype(np.int32),
    }
    for name, values in arrays.items():
        group.create_array(name, data=values, chunks=(chunk, *values.shape[1:]))
    context_camera = scene.camera[list(context)]
    target_camera = scene.camera[targets]
    group.create_array("context_intrinsics", data=context_camera.intrinsics.numpy())
    group.create_array("context_world_to_camera", data=context_camera.world_to_camera.numpy())
    group.create_array("target_positions", data=np.asarray(targets, dtype=np.int32))
    group.create_array("target_intrinsics", data=target_camera.intrinsics.numpy())
    group.create_array("target_world_to_camera", data=target_camera.world_to_camera.numpy())
    group.attrs.update(
        {
            "scene": scene.scene_id,
            "context_positions": list(context),
            "context_frames": [scene.frames[p].name for p in context],
            "target_frames": [scene.frames[p].name for p in targets],
            "height": scene.camera.height,
            "width": scene.camera.width,
            "count": count,
        }
    )


def read_pair(group) -> PairGaussians:
    """The inverse of :func:`write_pair` (float fields back to float32)."""
    attributes = dict(group.attrs)
    height, width = attributes["height"], attributes["width"]

    def tensor(name: str, dtype=None) -> torch.Tensor:
        values = torch.from_numpy(np.asarray(group[name][...]))
        return values.to(dtype) if dtype is not None else values

    gaussians = Gaussians(
        means=tensor("means", torch.float32),
        quats=tensor("quats", torch.float32),
        scales=tensor("scales", torch.float32),
        opacities=tensor("opacities", torch.float32),
        source_view=tensor("source_view", torch.int64),
        source_pixel=tensor("source_pixel", torch.int64),
    )
    return PairGaussians(
        scene=attributes["scene"],
        context_positions=tuple(attributes["context_positions"]),
        gaussians=gaussians,
        context_camera=Camera(tensor("context_intrinsics"), tensor("context_world_to_camera"), height, width),
        target_positions=[int(p) for p in group["target_positions"][...]],
        target_camera=Camera(tensor("target_intrinsics"), tensor("target_world_to_camera"), height, width),
    )


def load_gaussians(store: Store, gaussians: GaussiansCfg, samples_key: str) -> Artifact:
    spec = gaussians_spec(gaussians, samples_key)
    return store.open(spec.stage, spec.key, SCHEMA_VERSION)
