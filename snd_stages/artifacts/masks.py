"""Each used frame's segment labels, as ``snd precompute-masks`` stores them.

One unit per scene: ``labels`` ``[F, H, W]`` int32 for the scene's used frames (positions in ``positions``),
at the images' resolution. The source and its parameters are recorded in the unit's attributes and the key.
"""

from __future__ import annotations

import numpy as np
import torch

from ..masks import MasksCfg
from ..store import Artifact, ArtifactSpec, Store
from .samples import SampleSet

STAGE = "masks"
SCHEMA_VERSION = 1


def used_positions(samples: SampleSet) -> dict[str, list[int]]:
    """Per scene, every frame position that appears as a context or target frame, sorted."""
    used: dict[str, set[int]] = {}
    for sample in samples.samples:
        used.setdefault(sample.scene, set()).update(sample.context, sample.targets)
    return {scene: sorted(positions) for scene, positions in sorted(used.items())}


def masks_spec(masks: MasksCfg, samples_key: str) -> ArtifactSpec:
    """The key holds the source and its own settings (the registry entry's key rule)."""
    params, inputs = masks.key()
    return ArtifactSpec(STAGE, SCHEMA_VERSION, params=params, inputs={"samples": samples_key, **inputs})


def write_scene_masks(writer, scene_id: str, positions: list[int], frame_names: list[str], labels: np.ndarray,
                      source: str) -> None:
    """Write one scene's unit: ``labels`` ``[F, H, W]`` int32 of the frames at ``positions``."""
    with writer.unit(scene_id) as group:
        group.create_array("labels", data=labels, chunks=(1, *labels.shape[1:]))
        group.create_array("positions", data=np.asarray(positions, dtype=np.int32))
        group.update_attributes({"scene": scene_id, "source": source, "frame_names": frame_names})


def load_masks(store: Store, masks: MasksCfg, samples_key: str) -> Artifact:
    spec = masks_spec(masks, samples_key)
    return store.open(spec.stage, spec.key, SCHEMA_VERSION)


class MaskReader:
    """Reads one frame's labels from a masks artifact, keeping each scene's unit open."""

    def __init__(self, masks: Artifact):
        self.masks = masks
        self._units: dict[str, tuple[dict[int, int], object]] = {}

    def __call__(self, scene_id: str, position: int) -> torch.Tensor:
        """``[H, W]`` int64 labels of frame ``position`` of ``scene_id``."""
        return torch.from_numpy(self.stored(scene_id, position)).long()

    def stored(self, scene_id: str, position: int) -> np.ndarray:
        """``[H, W]`` labels of frame ``position`` of ``scene_id`` as stored (int32)."""
        if scene_id not in self._units:
            unit = self.masks.unit(scene_id)
            rows = {int(p): row for row, p in enumerate(unit["positions"][...])}
            self._units[scene_id] = (rows, unit["labels"])
        rows, labels = self._units[scene_id]
        return np.asarray(labels[rows[position]])
