"""Each context pair's pixel-aligned Gaussians, as ``snd precompute-gaussians`` stores them.

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

The per-Gaussian arrays are compressed with Blosc's LZ4 over shuffled bytes, chosen by measurement
(``benchmarks/compression.py``, table in benchmarks/README.md): against Zarr's default zstd it writes a 576x880 pair
2.3 times faster (68 against 159 ms on one core) and reads it twice as fast, and stores it no larger.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from zarr.codecs import BloscCodec

from ..gaussians import Gaussians
from ..geometry import Camera
from ..scenes.layout import Scene
from ..scenes.sampling import ViewSample
from ..reconstruct import GaussiansCfg
from ..store import Artifact, ArtifactSpec, Store, UnitArrays

STAGE = "gaussians"
SCHEMA_VERSION = 2  # 2: the per-Gaussian arrays in Blosc LZ4 (the same values as 1's zstd)
PER_GAUSSIAN_CODEC = (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),)
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
    """The key holds the reconstructor and its own settings (the registry entry's key rule), never the device."""
    params, inputs = gaussians.key()
    return ArtifactSpec(STAGE, SCHEMA_VERSION, params=params, inputs={"samples": samples_key, **inputs})


def pairs_of(samples: list[ViewSample]) -> dict[str, tuple[str, tuple[int, int], list[int]]]:
    """Unit name -> (scene, context positions, sorted target positions of every sample sharing the pair)."""
    pairs: dict[str, tuple[str, tuple[int, int], set[int]]] = {}
    for sample in samples:
        name = pair_unit_name(sample.scene, sample.context)
        pairs.setdefault(name, (sample.scene, sample.context, set()))[2].update(sample.targets)
    return {name: (scene, context, sorted(targets)) for name, (scene, context, targets) in sorted(pairs.items())}


def pair_unit(scene: Scene, context: tuple[int, int], targets: list[int], gaussians: Gaussians) -> UnitArrays:
    """One context pair's unit: its Gaussians (float16 where the renderer needs no more) and cameras."""
    count = len(gaussians)
    chunk = min(count, 1 << 18)
    per_gaussian = {
        "means": gaussians.means.numpy().astype(np.float32),
        "quats": gaussians.quats.numpy().astype(np.float16),
        "scales": gaussians.scales.numpy().astype(np.float16),
        "opacities": gaussians.opacities.numpy().astype(np.float16),
        "source_view": gaussians.source_view.numpy().astype(np.uint8),
        "source_pixel": gaussians.source_pixel.numpy().astype(np.int32),
    }
    context_camera = scene.camera[list(context)]
    target_camera = scene.camera[targets]
    return UnitArrays(
        arrays={
            **per_gaussian,
            "context_intrinsics": context_camera.intrinsics.numpy(),
            "context_world_to_camera": context_camera.world_to_camera.numpy(),
            "target_positions": np.asarray(targets, dtype=np.int32),
            "target_intrinsics": target_camera.intrinsics.numpy(),
            "target_world_to_camera": target_camera.world_to_camera.numpy(),
        },
        attributes={
            "scene": scene.scene_id,
            "context_positions": list(context),
            "context_frames": [scene.frames[p].name for p in context],
            "target_frames": [scene.frames[p].name for p in targets],
            "height": scene.camera.height,
            "width": scene.camera.width,
            "count": count,
        },
        options={name: {"chunks": (chunk, *values.shape[1:]), "compressors": PER_GAUSSIAN_CODEC}
                 for name, values in per_gaussian.items()},
    )


def write_pair(group, scene: Scene, context: tuple[int, int], targets: list[int], gaussians: Gaussians) -> None:
    pair_unit(scene, context, targets, gaussians).write(group)


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
