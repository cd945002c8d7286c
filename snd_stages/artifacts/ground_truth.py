"""The probes' ground truth of a frame set, cached in the artifact store, so that depth is decoded and normals
fitted once per frame set.

Besides the backbone, reading the probes' ground truth is the expensive part of ``snd eval``: every frame's depth
is decoded and, where a dataset has no normals (NYUv2, real ScanNet++), normals are fitted to the depth by local
planes (:mod:`snd_stages.scenes.normals`), which takes seconds per large frame on a CPU. The ground truth depends
neither on the models nor on the probe settings, so it is stored as artifacts of the stage ``ground_truth``; a
later eval of the same frames reads it back instead.

One artifact per frame set. Its key (:func:`ground_truth_artifact_spec`) covers:

- the frames (:meth:`GroundTruthRequest.frames_key`): their names, image size and a fingerprint of the ground
  truth's source (for the scene layout the name, size and modification time of every frame's depth, normals and
  semantic files, as :func:`snd_stages.scenes.layout.dataset_fingerprint` fingerprints files, and the intrinsics
  of the frames whose normals are fitted; for NYUv2 the ``.mat`` file's name, size and time and the splits and
  class mapping files' sha256);
- the frame stride, and which ground truths are stored: depth always, normals when the normals probe runs,
  semantic labels with their class count when the segmentation probe runs, and whether a depth region is stored;
- where some normals are fitted, the fitting method's version and parameters
  (:data:`snd_stages.scenes.normals.PLANE_FIT_VERSION`).

Not the device the normals were fitted on: CPU and CUDA fits agree to float rounding (float32 neighbourhood sums,
a float64 eigen-decomposition, stored as float16), so a set fitted on either device serves both.

Layout: units ``00000``, ``00001``, ... of :data:`FRAMES_PER_UNIT` consecutive frames each, holding ``depth``
``[n, H, W]`` float32 metres (0 = invalid), ``normals`` ``[n, 3, H, W]`` float16 (when stored) and ``semantics``
``[n, H, W]`` uint8 (when stored), one Zarr chunk per frame, with the unit's first frame index, frame names and
how many of its frames had their normals fitted in its attributes; and, where depth is scored inside a region
(NYUv2's Eigen crop), the unit ``region`` holding it as ``[H, W]`` bool. Units are written one by one through
:class:`~snd_stages.store.ArtifactWriter`: a killed run keeps its finished units and the rerun computes only the
others; the artifact appears only when complete, so a partial one is never read.

The stored values are exactly those computed in memory without a store (same dtypes, bitwise), so scores do not
depend on whether the ground truth was cached.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from rich.progress import Progress
from torch import Tensor

from ..errors import ArtifactError
from ..progress import track
from ..scenes.normals import DEFAULT_MAX_RELATIVE_JUMP, DEFAULT_MIN_POINTS, DEFAULT_WINDOW, PLANE_FIT_VERSION
from ..store import Artifact, ArtifactSpec, ArtifactWriter, Store, hash_json
from ..throughput import ordered_map
from .protocol import producing

STAGE = "ground_truth"
SCHEMA_VERSION = 1
# A unit is what a killed run loses at most; 16 NYUv2 frames with normals are ~50 MB in memory before writing.
FRAMES_PER_UNIT = 16
REGION_UNIT = "region"


@dataclass(frozen=True)
class GroundTruthRequest:
    """Which ground truth of which frames: everything its values depend on, hence its artifact's key.

    Attributes:
        role: the frame set's role (``train``, ``test``); names the progress bars. Not part of the key: two sets
            of the same frames hold the same ground truth.
        names: one name per frame.
        image_size: (H, W) of every frame.
        stride: every how many frames were taken.
        source: JSON-able fingerprint of the ground truth's source (file names, sizes and times, intrinsics of
            the frames whose normals are fitted, ...).
        normals: whether normals are stored.
        classes: the class count of the stored semantic labels, or None when none are stored.
        fits_normals: whether some frames' normals are fitted to their depth (the fitting method enters the key).
    """

    role: str
    names: tuple[str, ...]
    image_size: tuple[int, int]
    stride: int
    source: Any
    normals: bool
    classes: int | None
    fits_normals: bool

    def __len__(self) -> int:
        return len(self.names)

    def frames_key(self) -> str:
        """A hash of the frames' names, image size and source (a large list, kept out of the manifest)."""
        return hash_json({"names": list(self.names), "image_size": list(self.image_size),
                          "source": self.source})[:20]


@dataclass(frozen=True)
class FrameTruth:
    """One frame's ground truth as computed from its source.

    Attributes:
        depth: ``[H, W]`` float32 metres, 0 = invalid.
        normals: ``[3, H, W]`` float16 camera-frame unit normals, or None when not requested.
        semantics: ``[H, W]`` uint8 classes (255 = ignore), or None when not requested.
        fitted: whether the normals were fitted to the depth.
    """

    depth: Tensor
    normals: Tensor | None = None
    semantics: Tensor | None = None
    fitted: bool = False


@dataclass(frozen=True)
class GroundTruth:
    """The ground truth of a frame set, stacked.

    Attributes:
        depth: ``[N, H, W]`` float32.
        normals: ``[N, 3, H, W]`` float16, or None.
        semantics: ``[N, H, W]`` uint8, or None.
        region: ``[H, W]`` bool where depth is scored, or None (everywhere).
        fitted_normals: how many frames' normals were fitted to their depth.
        status: ``reused`` (found complete in the store), ``computed``, ``resumed`` (some units were left by an
            interrupted run) or ``in memory`` (no store).
        key: the artifact's key, or None without a store.
    """

    depth: Tensor
    normals: Tensor | None
    semantics: Tensor | None
    region: Tensor | None
    fitted_normals: int
    status: str
    key: str | None = None


def normals_fitting_identity() -> dict[str, Any]:
    """The fitting method and the parameters the probes fit normals with (the defaults of the fit)."""
    return {"method": PLANE_FIT_VERSION, "window": DEFAULT_WINDOW, "max_relative_jump": DEFAULT_MAX_RELATIVE_JUMP,
            "min_points": DEFAULT_MIN_POINTS}


def ground_truth_artifact_spec(request: GroundTruthRequest, region: bool) -> ArtifactSpec:
    """The artifact of ``request``'s ground truth; ``region``: whether a depth region is stored with it."""
    params = {
        "image_size": list(request.image_size),
        "stride": request.stride,
        "depth": "float32 metres, 0 = invalid",
        "normals": "float16 camera-frame unit normals" if request.normals else None,
        "normals_fitting": normals_fitting_identity() if request.normals and request.fits_normals else None,
        "semantics": {"dtype": "uint8", "classes": request.classes} if request.classes is not None else None,
        "depth_region": region,
        "frames_per_unit": FRAMES_PER_UNIT,
    }
    return ArtifactSpec(STAGE, SCHEMA_VERSION, params=params, inputs={"frames": request.frames_key()})


def load_ground_truth(
    request: GroundTruthRequest,
    compute: Callable[[int], FrameTruth],
    store: Store | None = None,
    config_yaml: str = "",
    region: np.ndarray | Tensor | None = None,
    progress: Progress | None = None,
    compute_device: str = "cpu",
) -> GroundTruth:
    """The ground truth of ``request``'s frames: read from ``store`` where cached, else computed frame by frame,
    several frames at once where the machine has room (:func:`~snd_stages.throughput.ordered_map`: decoding depth
    and label images; fitting normals on ``compute_device``), in frame order.

    Args:
        request: the frames and what ground truth they need.
        compute: ``index -> FrameTruth`` of the ``index``-th frame, from its source.
        store: where the ground truth is cached; None computes it in memory only.
        config_yaml: the resolved config, stored with a new artifact.
        region: ``[H, W]`` bool where depth is scored, stored with the ground truth; None = everywhere.
        progress: where to show progress.
    """
    description = f"ground truth · {request.role}"
    if store is None:
        frames = list(track(ordered_map(compute, range(len(request)), compute_device=compute_device), description,
                            progress, total=len(request), unit="frame"))
        region_tensor = None if region is None else torch.as_tensor(np.asarray(region, dtype=bool))
        return _stack(frames, region_tensor, "in memory")

    units = [range(start, min(start + FRAMES_PER_UNIT, len(request)))
             for start in range(0, len(request), FRAMES_PER_UNIT)]
    unit_names = [f"{index:05d}" for index in range(len(units))]
    expected = unit_names + ([REGION_UNIT] if region is not None else [])
    with producing(store, ground_truth_artifact_spec(request, region is not None), config_yaml) as production:
        if production.reused:
            return _read(production.artifact, request, "reused", f"{description} (cached)", progress)
        writer = production.writer
        writer.prepare({"frames": request.role, "image_size": list(request.image_size), "stride": request.stride,
                        "normals": request.normals, "classes": request.classes})
        done = writer.done_units()
        if region is not None and REGION_UNIT not in done:
            with writer.unit(REGION_UNIT) as group:
                group.create_array("region", data=np.asarray(region, dtype=bool))
        todo = [unit for unit, name in enumerate(unit_names) if name not in done]
        frame_indices = [index for unit in todo for index in units[unit]]
        computed = zip(frame_indices, ordered_map(compute, frame_indices, compute_device=compute_device))
        pieces: list[FrameTruth] = []
        for index, piece in track(computed, description, progress, total=len(frame_indices), unit="frame"):
            pieces.append(piece)
            unit = index // FRAMES_PER_UNIT
            if index == units[unit][-1]:
                _write_unit(writer, unit_names[unit], units[unit], pieces, request)
                pieces = []
        artifact = writer.finish(
            expected_units=expected,
            counts=lambda: {
                "frames": len(request),
                "units": len(expected),
                "fitted_normals": sum(int(writer.unit_attributes(name)["fitted_normals"]) for name in unit_names),
            },
        )
    # Read back what was stored rather than keep the computed frames: one path for fresh, resumed and reused sets.
    return _read(artifact, request, production.status)


def _stack(frames: list[FrameTruth], region: Tensor | None, status: str, key: str | None = None) -> GroundTruth:
    normals = [frame.normals for frame in frames if frame.normals is not None]
    semantics = [frame.semantics for frame in frames if frame.semantics is not None]
    return GroundTruth(torch.stack([frame.depth for frame in frames]), torch.stack(normals) if normals else None,
                       torch.stack(semantics) if semantics else None, region,
                       sum(frame.fitted for frame in frames), status, key)


def _write_unit(writer: ArtifactWriter, name: str, frame_range: range, pieces: list[FrameTruth],
                request: GroundTruthRequest) -> None:
    with writer.unit(name) as group:
        depth = torch.stack([piece.depth for piece in pieces]).numpy()
        group.create_array("depth", data=depth, chunks=(1, *depth.shape[1:]))
        if request.normals:
            normals = torch.stack([piece.normals for piece in pieces]).numpy()
            group.create_array("normals", data=normals, chunks=(1, *normals.shape[1:]))
        if request.classes is not None:
            semantics = torch.stack([piece.semantics for piece in pieces]).numpy()
            group.create_array("semantics", data=semantics, chunks=(1, *semantics.shape[1:]))
        group.update_attributes({"start": frame_range.start, "names": [request.names[i] for i in frame_range],
                            "fitted_normals": sum(piece.fitted for piece in pieces)})


def _read(artifact: Artifact, request: GroundTruthRequest, status: str, description: str | None = None,
          progress: Progress | None = None) -> GroundTruth:
    """Read a complete ground-truth artifact into memory, into arrays of the dtypes :func:`_stack` gives."""
    units = [name for name in artifact.units() if name != REGION_UNIT]
    count, (height, width) = len(request), request.image_size
    depth = np.empty((count, height, width), dtype=np.float32)
    normals = np.empty((count, 3, height, width), dtype=np.float16) if request.normals else None
    semantics = np.empty((count, height, width), dtype=np.uint8) if request.classes is not None else None
    names: list[str] = []
    fitted = 0
    for name in track(units, description, progress, unit="unit") if description else units:
        group = artifact.unit(name)
        start = int(group.attrs["start"])
        unit_names = list(group.attrs["names"])
        if start != len(names) or start + len(unit_names) > count:
            break  # reported below: the units do not tile the frames
        stop = start + len(unit_names)
        depth[start:stop] = group["depth"][...]
        if normals is not None:
            normals[start:stop] = group["normals"][...]
        if semantics is not None:
            semantics[start:stop] = group["semantics"][...]
        names += unit_names
        fitted += int(group.attrs["fitted_normals"])
    if names != list(request.names):
        # The key covers the frame names, so only an artifact altered after it was published gets here.
        raise ArtifactError(f"artifact {artifact.path} holds the ground truth of other frames than its key names "
                            f"({len(names)} frames, expected {count}); delete it and rerun snd eval")
    region = None
    if REGION_UNIT in artifact.units():
        region = torch.from_numpy(np.asarray(artifact.unit(REGION_UNIT)["region"][...], dtype=bool))
    return GroundTruth(torch.from_numpy(depth), None if normals is None else torch.from_numpy(normals),
                       None if semantics is None else torch.from_numpy(semantics), region, fitted, status, artifact.key)
