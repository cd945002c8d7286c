"""Each context pair's pixel-aligned Gaussians, as ``snd precompute-gaussians`` stores them.

One unit per context pair (``<scene>--<first>-<second>``), shared by every sample with that pair. A unit holds
three arrays, one row per field (each field's values lie together, as compression wants them):

=========================  ==============  ===========  =============================================
array                      shape           dtype        rows
=========================  ==============  ===========  =============================================
means                      [N, 3]          float32      world positions (metres)
shape                      [8, N]          float16      unit wxyz rotation (4), standard deviations
                                                        (3; metres, relative error 5e-4), opacity (1)
source                     [2, N]          int32        the context view each Gaussian was born from,
                                                        its row-major pixel index in that view
=========================  ==============  ===========  =============================================

and in its attributes, besides the scene, frames and size: ``target_positions`` (every target frame of the pair's
samples) and the cameras, ``context_intrinsics`` [2, 3, 3], ``context_world_to_camera`` [2, 4, 4],
``target_intrinsics`` [T, 3, 3] and ``target_world_to_camera`` [T, 4, 4] (float64: JSON keeps every bit; K in pixels
of height x width, OpenCV world-to-camera).

Positions stay float32 (a float16 mean would move by ~2 mm at 5 m, a visible fraction of a pixel);
orientation, size and opacity tolerate half precision: 36 bytes per Gaussian before compression.

The arrays are compressed with Blosc's LZ4 over shuffled bytes, chosen by measurement (``benchmarks/compression.py``,
table in benchmarks/README.md): against Zarr's default zstd it writes a 576x880 pair 2.3 times faster (68 against
159 ms on one core) and reads it twice as fast, and stores it no larger. Three arrays, not one per field and camera
(eleven until schema 3), because a unit's cost was mostly Zarr's fixed cost per array.
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
# 2: the per-Gaussian arrays in Blosc LZ4 (the same values as 1's zstd); 3: three arrays and the cameras in the
# attributes (the same values as 2's eleven arrays)
SCHEMA_VERSION = 3
PER_GAUSSIAN_CODEC = (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),)
BYTES_PER_GAUSSIAN = 12 + 8 * 2 + 2 * 4  # means, shape (quats, scales, opacities), source (view, pixel)
# The rows of ``shape``.
QUATS, SCALES, OPACITIES = slice(0, 4), slice(4, 7), 7


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
    shape = torch.cat([gaussians.quats, gaussians.scales, gaussians.opacities[:, None]], dim=1)
    arrays = {
        "means": gaussians.means.numpy().astype(np.float32),
        "shape": np.ascontiguousarray(shape.numpy().astype(np.float16).T),
        "source": np.stack([gaussians.source_view.numpy(), gaussians.source_pixel.numpy()]).astype(np.int32),
    }
    context_camera = scene.camera[list(context)]
    target_camera = scene.camera[targets]
    return UnitArrays(
        arrays=arrays,
        attributes={
            "scene": scene.scene_id,
            "context_positions": list(context),
            "context_frames": [scene.frames[p].name for p in context],
            "target_frames": [scene.frames[p].name for p in targets],
            "height": scene.camera.height,
            "width": scene.camera.width,
            "count": count,
            "target_positions": [int(p) for p in targets],
            "context_intrinsics": context_camera.intrinsics.double().tolist(),
            "context_world_to_camera": context_camera.world_to_camera.double().tolist(),
            "target_intrinsics": target_camera.intrinsics.double().tolist(),
            "target_world_to_camera": target_camera.world_to_camera.double().tolist(),
        },
        options={"means": {"chunks": (chunk, 3), "compressors": PER_GAUSSIAN_CODEC},
                 "shape": {"chunks": (8, chunk), "compressors": PER_GAUSSIAN_CODEC},
                 "source": {"chunks": (2, chunk), "compressors": PER_GAUSSIAN_CODEC}},
    )


def write_pair(group, scene: Scene, context: tuple[int, int], targets: list[int], gaussians: Gaussians) -> None:
    pair_unit(scene, context, targets, gaussians).write(group)


def read_pair(group) -> PairGaussians:
    """The inverse of :func:`write_pair` (float fields back to float32)."""
    attributes = dict(group.attrs)
    height, width = attributes["height"], attributes["width"]
    shape, source = np.asarray(group["shape"][...]), np.asarray(group["source"][...])

    def columns(rows: np.ndarray, dtype) -> torch.Tensor:  # [k, N] -> [N, k] (or [N] from one row), one pass
        return torch.from_numpy(np.ascontiguousarray(rows.T, dtype=dtype))

    gaussians = Gaussians(
        means=torch.from_numpy(np.asarray(group["means"][...])),
        quats=columns(shape[QUATS], np.float32),
        scales=columns(shape[SCALES], np.float32),
        opacities=columns(shape[OPACITIES], np.float32),
        source_view=columns(source[0], np.int64),
        source_pixel=columns(source[1], np.int64),
    )

    def camera(prefix: str) -> Camera:
        return Camera(torch.tensor(attributes[f"{prefix}_intrinsics"], dtype=torch.float64),
                      torch.tensor(attributes[f"{prefix}_world_to_camera"], dtype=torch.float64), height, width)

    return PairGaussians(
        scene=attributes["scene"],
        context_positions=tuple(attributes["context_positions"]),
        gaussians=gaussians,
        context_camera=camera("context"),
        target_positions=list(attributes["target_positions"]),
        target_camera=camera("target"),
    )


def load_gaussians(store: Store, gaussians: GaussiansCfg, samples_key: str) -> Artifact:
    spec = gaussians_spec(gaussians, samples_key)
    return store.open(spec.stage, spec.key, SCHEMA_VERSION)
