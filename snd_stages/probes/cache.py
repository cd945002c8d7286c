"""Probe features cached in the artifact store, so that the backbone runs once per model, frame set and spec.

Running the backbone is the only expensive part of ``snd eval`` that does not depend on the probe settings. Its
output is stored as artifacts of the stage ``features``; a later eval (other probe steps, learning rate, probes)
finds them and never runs the backbone again.

One artifact per (model weights, frame set, feature spec). Its key (:func:`features_artifact_spec`) covers:

- the weights' identity (:attr:`ProbeBackbone.identity`): the sha256 of the checkpoint file, of the embedded
  ONNX graph, or, for random weights, of the initialised tensors; and the backbone's name;
- the frame set's identity (:attr:`FrameSet.key`): its name, frame names, image size and a fingerprint of the
  images' source (the image files' names, sizes and modification times, as
  :func:`snd_stages.scenes.layout.dataset_fingerprint` does; for NYUv2 the ``.mat`` file's);
- the feature spec: absolute block indices, final norm, CLS concatenation, the preprocessing (the backbone's
  normalisation, zero centre-padding to multiples of its patch size: :func:`preprocessing`) and the stored dtype.

Layout: units ``00000``, ``00001``, ... of :data:`FRAMES_PER_UNIT` consecutive frames each, holding ``tokens``
``[n, C, h, w]`` float16 (one Zarr chunk per frame), with the unit's first frame index, frame names, padding and
image size in its attributes. Units are written one by one through :class:`~snd_stages.store.ArtifactWriter`:
a killed run keeps its finished units and the rerun computes only the others; the artifact appears only when
complete, so a partial one is never read. Features are extracted in batches of :data:`EXTRACTION_BATCH` frames
aligned to the units, so a resumed run computes exactly what an uninterrupted one would have.

Reading (:class:`FeatureSet`): a set no larger than ``eval.feature_memory_gb`` is read into memory once, as
float16; a larger one is read from the store for every minibatch. Either way the probes see the same float16
values, so cached and freshly extracted features give identical results.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from rich.progress import Progress
from torch import Tensor

from ..errors import DataError
from ..geometry import image_to_tensor
from ..progress import track
from ..store import Artifact, ArtifactSpec, ArtifactWriter, Store, hash_json
from ..models.backbones import BackboneSpec
from .backbone import Features, FeatureSpec, ProbeBackbone, centre_padding, crop_to_image

STAGE = "features"
SCHEMA_VERSION = 1
FRAMES_PER_UNIT = 32
EXTRACTION_BATCH = 8  # divides FRAMES_PER_UNIT, so that batches never straddle units


def preprocessing(backbone: BackboneSpec) -> str:
    """How images become the backbone's input, in words, for the key (for DINOv2 "ImageNet mean/std, zero
    centre-padding to multiples of 14")."""
    return f"{backbone.normalisation.name} mean/std, zero centre-padding to multiples of {backbone.patch}"


@dataclass(frozen=True)
class FrameSet:
    """Images whose features the probes read: all of one size, loaded lazily.

    Attributes:
        name: the set's role (``train``, ``test``, ``pairs``, ...); it names progress bars and enters the key.
        names: one name per image.
        load: ``index -> [H, W, 3]`` uint8 RGB.
        image_size: (H, W) of every image.
        identity: JSON-able fingerprint of the images' source (file names, sizes and times, ...).
    """

    name: str
    names: tuple[str, ...]
    load: Callable[[int], np.ndarray] = field(compare=False)
    image_size: tuple[int, int]
    identity: Any = field(compare=False)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def key(self) -> str:
        return hash_json({"name": self.name, "names": list(self.names), "image_size": list(self.image_size),
                          "identity": self.identity})[:20]

    def image(self, index: int) -> Tensor:
        """``[3, H, W]`` float in [0, 1]; refuses an image of another size than the set's."""
        image = self.load(index)
        if tuple(image.shape[:2]) != tuple(self.image_size):
            raise DataError(f"{self.names[index]} is {image.shape[0]}x{image.shape[1]}, but the other images of the "
                            f"{self.name} frames are {self.image_size[0]}x{self.image_size[1]}; probes need one size")
        return image_to_tensor(image)


@dataclass(frozen=True)
class CacheUse:
    """How one feature artifact was obtained: ``reused`` (found complete), ``computed``, ``resumed`` (some units
    were left by an interrupted run) or ``in memory`` (no store)."""

    model: str
    frames: str
    spec: str
    key: str | None
    status: str


class FeatureSet:
    """Float16 features of one frame set under one spec: ``[N, C, h, w]`` on the padded token grid.

    Args:
        parts: one ``[n, C, h, w]`` float16 array per unit (numpy, or a Zarr array read on demand), in frame order.
        padding: (top, bottom, left, right) of the centre padding.
        image_size: (H, W) of the unpadded images.
    """

    def __init__(self, parts: Sequence[Any], padding: tuple[int, int, int, int], image_size: tuple[int, int]):
        parts = list(parts)
        self.memory = None
        self._resident: dict[str, Tensor] = {}  # ``memory`` copied to other devices
        if parts and all(isinstance(part, np.ndarray) for part in parts):
            parts = [np.concatenate(parts) if len(parts) > 1 else parts[0]]
            self.memory = torch.from_numpy(parts[0])
        self.parts = parts
        self.padding = tuple(padding)
        self.image_size = tuple(image_size)
        self.starts = np.cumsum([0] + [part.shape[0] for part in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def channels(self) -> int:
        return int(self.parts[0].shape[1])

    @property
    def padded_size(self) -> tuple[int, int]:
        top, bottom, left, right = self.padding
        return self.image_size[0] + top + bottom, self.image_size[1] + left + right

    def batch(self, indices, device: torch.device | str = "cpu") -> Tensor:
        """``[*indices.shape, C, h, w]`` float32 features of the frames ``indices`` (any shape and order, repeats
        allowed) on ``device``.

        A set held in memory is copied to ``device`` once and gathered there: a probe fit draws thousands of
        minibatches from it.
        """
        shape = torch.as_tensor(indices).shape
        indices = np.asarray(torch.as_tensor(indices).cpu(), dtype=np.int64).reshape(-1)
        if self.memory is not None:
            memory = self._memory_on(torch.device(device))
            tokens = memory[torch.from_numpy(indices).to(memory.device)]
        else:
            unique, inverse = np.unique(indices, return_inverse=True)
            unit_of = np.searchsorted(self.starts, unique, side="right") - 1
            pieces = []
            for unit in np.unique(unit_of):
                offsets = unique[unit_of == unit] - self.starts[unit]
                pieces.append(np.asarray(self.parts[unit].oindex[offsets]))
            tokens = torch.from_numpy(np.concatenate(pieces))[torch.from_numpy(inverse.reshape(-1))]
        return tokens.to(device).float().reshape(*shape, *tokens.shape[1:])

    def _memory_on(self, device: torch.device) -> Tensor:
        if device.type == "cpu":
            return self.memory
        key = str(device)
        if key not in self._resident:
            self._resident[key] = self.memory.to(device)
        return self._resident[key]

    def crop(self, dense: Tensor) -> Tensor:
        """``[B, K, h', w']`` prediction on the padded grid -> ``[B, K, H, W]`` on the image (bilinear)."""
        return crop_to_image(dense, self.padding, self.image_size)

    def view(self, index: int, device: torch.device | str = "cpu") -> Features:
        """One frame's features as :class:`Features` (``[1, C, h, w]`` float32)."""
        return Features(self.batch([index], device), self.padding, self.image_size)

    @staticmethod
    def from_artifact(artifact: Artifact, memory_bytes: float) -> "FeatureSet":
        """Read a complete features artifact: into memory if it is at most ``memory_bytes``, else on demand."""
        names = artifact.units()
        arrays = [artifact.unit(name)["tokens"] for name in names]
        first = dict(artifact.unit(names[0]).attrs)
        if sum(array.nbytes for array in arrays) <= memory_bytes:
            joined = np.empty((sum(array.shape[0] for array in arrays), *arrays[0].shape[1:]), dtype=np.float16)
            start = 0
            for array in arrays:
                joined[start : start + array.shape[0]] = array[...]
                start += array.shape[0]
            arrays = [joined]
        return FeatureSet(arrays, tuple(first["padding"]), tuple(first["image_size"]))


def features_artifact_spec(backbone: ProbeBackbone, frames: FrameSet, spec: FeatureSpec) -> ArtifactSpec:
    resolved = spec.resolved(backbone.depth)
    params = {
        "backbone": backbone.name,
        "blocks": list(resolved.blocks),
        "final_norm": resolved.final_norm,
        "with_cls": resolved.with_cls,
        "image_size": list(frames.image_size),
        "preprocessing": preprocessing(backbone.backbone_spec),
        "dtype": "float16",
        "frames_per_unit": FRAMES_PER_UNIT,
        "extraction_batch": EXTRACTION_BATCH,
    }
    return ArtifactSpec(STAGE, SCHEMA_VERSION, params=params,
                        inputs={"weights": backbone.identity, "frames": frames.key})


def probe_features(
    backbone: ProbeBackbone,
    frames: FrameSet,
    specs: Sequence[FeatureSpec],
    store: Store | None,
    config_yaml: str,
    memory_bytes: float,
    progress: Progress | None = None,
) -> tuple[dict[FeatureSpec, FeatureSet], list[CacheUse]]:
    """Features of ``frames`` under every spec in ``specs``: read from ``store`` where cached, else extracted.

    Missing specs are extracted together, one backbone pass per batch for all of them, and written unit by unit
    (resuming the units an interrupted run left). Without a store they are only kept in memory (float16, as the
    store would hold them).

    Returns:
        the feature sets by spec, and how each was obtained.
    """
    specs = list(dict.fromkeys(specs))
    units = [range(start, min(start + FRAMES_PER_UNIT, len(frames))) for start in range(0, len(frames), FRAMES_PER_UNIT)]
    unit_names = [f"{index:05d}" for index in range(len(units))]
    padding = centre_padding(*frames.image_size, multiple=backbone.backbone_spec.patch)
    artifact_specs = {spec: features_artifact_spec(backbone, frames, spec) for spec in specs}
    ready: dict[FeatureSpec, Artifact] = {}
    writers: dict[FeatureSpec, ArtifactWriter] = {}
    status: dict[FeatureSpec, str] = {}
    missing: dict[FeatureSpec, set[str]] = {}
    for spec in specs:
        artifact_spec = artifact_specs[spec]
        if store is None:
            missing[spec] = set(unit_names)
            status[spec] = "in memory"
        elif store.exists(artifact_spec):
            ready[spec] = store.open(STAGE, artifact_spec.key, SCHEMA_VERSION)
            status[spec] = "reused"
        else:
            writer = store.writer(artifact_spec, config_yaml)
            writer.prepare({"backbone": backbone.name, "weights": backbone.weights, "frames": frames.name,
                            "features": spec.describe(), "padding": list(padding), "image_size": list(frames.image_size)})
            done = writer.done_units()
            writers[spec] = writer
            missing[spec] = set(unit_names) - done
            status[spec] = "resumed" if done else "computed"

    in_memory: dict[FeatureSpec, list[np.ndarray]] = {spec: [] for spec in specs if store is None}
    todo = [(unit, [spec for spec in missing if unit_names[unit] in missing[spec]]) for unit in range(len(units))]
    todo = [(unit, wanted) for unit, wanted in todo if wanted]
    if todo:
        count = sum(len(units[unit]) for unit, _ in todo)
        frame_indices = (index for unit, _ in todo for index in units[unit])
        wanted_of = dict(todo)
        collected: dict[FeatureSpec, list[np.ndarray]] = {}
        images: list[Tensor] = []
        bar = track(frame_indices, f"features · {backbone.label} · {frames.name}", progress, total=count, unit="frame")
        for index in bar:
            unit = index // FRAMES_PER_UNIT
            images.append(frames.image(index))
            last_of_unit = index == units[unit][-1]
            if len(images) < EXTRACTION_BATCH and not last_of_unit:
                continue
            outputs = backbone.features_many(torch.stack(images), wanted_of[unit])
            images = []
            for spec, features in zip(wanted_of[unit], outputs):
                collected.setdefault(spec, []).append(features.tokens.to(torch.float16).cpu().numpy())
            if last_of_unit:
                for spec, pieces in collected.items():
                    tokens = np.concatenate(pieces)
                    if spec in in_memory:
                        in_memory[spec].append(tokens)
                    else:
                        _write_unit(writers[spec], unit_names[unit], tokens, units[unit], frames, padding)
                collected = {}

    sets: dict[FeatureSpec, FeatureSet] = {}
    for spec in specs:
        if spec in writers:
            ready[spec] = writers[spec].finish(expected_units=unit_names,
                                               counts={"frames": len(frames), "units": len(unit_names)})
        if spec in ready:
            sets[spec] = FeatureSet.from_artifact(ready[spec], memory_bytes)
        else:
            sets[spec] = FeatureSet(in_memory[spec], padding, frames.image_size)
    uses = [CacheUse(backbone.label, frames.name, spec.describe(), ready[spec].key if spec in ready else None,
                     status[spec]) for spec in specs]
    return sets, uses


def _write_unit(writer: ArtifactWriter, name: str, tokens: np.ndarray, frame_range: range, frames: FrameSet,
                padding: tuple[int, int, int, int]) -> None:
    with writer.unit(name) as group:
        group.create_array("tokens", data=tokens, chunks=(1, *tokens.shape[1:]))
        group.attrs.update({"start": frame_range.start, "names": [frames.names[i] for i in frame_range],
                            "padding": list(padding), "image_size": list(frames.image_size)})
