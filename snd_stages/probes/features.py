"""The probes' view of a backbone's features: the frames they are taken of, and the features as float16 tokens.

:class:`FrameSet` names a set of same-sized images; :class:`FeatureSet` holds one backbone's features of it under
one :class:`~snd_stages.probes.backbone.FeatureSpec` (in memory, or read from the store on demand);
:func:`extract_features` runs the backbone over a frame set in fixed batches, every spec from one forward pass.
The feature cache (:mod:`snd_stages.artifacts.features`) stores what :func:`extract_features` yields.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from rich.progress import Progress
from torch import Tensor

from ..errors import DataError
from ..geometry import image_to_tensor
from ..progress import track
from ..store import hash_json
from .backbone import Features, FeatureSpec, ProbeBackbone, centre_padding, crop_to_image

# Frames per backbone call. The feature cache's units hold a multiple of it, so that a resumed extraction makes
# exactly the batches (hence the values) of an uninterrupted one.
EXTRACTION_BATCH = 8


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


class ModelFeatures:
    """The same frames' feature sets of several models, drawn from together: row ``r`` of a ``[models * seeds,
    batch]`` index array reads model ``r // seeds``. This is how :func:`~snd_stages.probes.fitting.fit_seeds` fits
    every model's heads in one step (its fits are model-major, ``seeds`` per model); the sets must share their
    token grid, channels, padding and image size (:func:`stackable_groups`)."""

    def __init__(self, sets: Sequence[FeatureSet], seeds: int):
        if len({_stack_signature(feature_set) for feature_set in sets}) != 1:
            raise ValueError("feature sets of different grids, channels or sizes cannot be drawn from together")
        self.sets, self.seeds = list(sets), seeds
        first = self.sets[0]
        self.padding, self.image_size, self.channels, self.padded_size = (first.padding, first.image_size,
                                                                          first.channels, first.padded_size)

    def __len__(self) -> int:
        return len(self.sets[0])

    def batch(self, indices, device: torch.device | str = "cpu") -> Tensor:
        indices = torch.as_tensor(indices)
        per_model = indices.reshape(len(self.sets), self.seeds, *indices.shape[1:])
        return torch.cat([feature_set.batch(rows, device) for feature_set, rows in zip(self.sets, per_model)])

    def crop(self, dense: Tensor) -> Tensor:
        return crop_to_image(dense, self.padding, self.image_size)


def _stack_signature(feature_set: FeatureSet) -> tuple:
    return (len(feature_set), tuple(feature_set.parts[0].shape[1:]), feature_set.padding, feature_set.image_size)


def stackable_groups(sets: Sequence[FeatureSet]) -> list[list[int]]:
    """The indices of ``sets`` grouped by what :class:`ModelFeatures` needs them to share, in first-seen order."""
    groups: dict[tuple, list[int]] = {}
    for index, feature_set in enumerate(sets):
        groups.setdefault(_stack_signature(feature_set), []).append(index)
    return list(groups.values())


def extract_features(backbone: ProbeBackbone, frames: FrameSet, groups: Iterable[tuple[range, Sequence[FeatureSpec]]],
                     progress: Progress | None = None) -> Iterator[dict[FeatureSpec, np.ndarray]]:
    """For each ``(frame range, specs)`` of ``groups``, the float16 ``[n, C, h, w]`` features of those frames under
    each spec: one backbone pass per batch of :data:`EXTRACTION_BATCH` frames serves every spec, and a batch never
    straddles two ranges."""
    groups = [(frames_range, list(specs)) for frames_range, specs in groups]
    flat = ((group, index) for group, (frames_range, _) in enumerate(groups) for index in frames_range)
    total = sum(len(frames_range) for frames_range, _ in groups)
    collected: dict[FeatureSpec, list[np.ndarray]] = {}
    images: list[Tensor] = []
    for group, index in track(flat, f"features · {backbone.label} · {frames.name}", progress, total=total,
                              unit="frame"):
        frames_range, specs = groups[group]
        images.append(frames.image(index))
        last_of_group = index == frames_range[-1]
        if len(images) < EXTRACTION_BATCH and not last_of_group:
            continue
        for spec, features in zip(specs, backbone.features_many(torch.stack(images), specs)):
            collected.setdefault(spec, []).append(features.tokens.to(torch.float16).cpu().numpy())
        images = []
        if last_of_group:
            yield {spec: np.concatenate(pieces) for spec, pieces in collected.items()}
            collected = {}


def features_in_memory(backbone: ProbeBackbone, frames: FrameSet, specs: Sequence[FeatureSpec],
                       progress: Progress | None = None) -> dict[FeatureSpec, FeatureSet]:
    """The features of ``frames`` under every spec, extracted into memory as float16 (what the cache would hold)."""
    specs = list(dict.fromkeys(specs))
    (extracted,) = extract_features(backbone, frames, [(range(len(frames)), specs)], progress)
    padding = centre_padding(*frames.image_size, multiple=backbone.backbone_spec.patch)
    return {spec: FeatureSet([extracted[spec]], padding, frames.image_size) for spec in specs}
