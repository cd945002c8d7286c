"""Segment label maps per frame, from one of several sources. A registry by name.

Each entry of :data:`MASK_SOURCES` owns its settings (a sub-section of ``masks`` named after it, whose dataclass
lives in :mod:`.sources`; ``gt`` has none), makes the segmenter from them, and says what of them enters the masks'
key. Adding a source: its function and settings dataclass in a module, and one entry here (which names the
settings: ``masks.<name>`` follows from it).

- ``gt``: the dataset's instance masks (``instance_segmentation/``), the reference method's default.
- ``felzenszwalb`` / ``slic``: scikit-image superpixels; need nothing but the image.
- ``sam``: segment-anything's automatic mask generator with the user's checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..config import require_choice, to_dict, with_sub_sections
from ..errors import DataError
from ..scenes.layout import Scene
from ..store import checkpoint_by_content
from .sources import (
    FelzenszwalbSettings,
    SamSegmenter,
    SamSettings,
    SlicSettings,
    felzenszwalb_segments,
    slic_segments,
)

# (scene, frame position) -> [H, W] int32 labels
Segmenter = Callable[[Scene, int], np.ndarray]


def _ground_truth(settings: None) -> Segmenter:
    def segment(scene: Scene, position: int) -> np.ndarray:
        if not scene.has("instance_segmentation"):
            raise DataError(
                f"masks.source = 'gt' but scene {scene.directory} has no instance_segmentation/ folder; "
                "use masks.source felzenszwalb, slic or sam for data without instance masks"
            )
        return scene.load_instances(position).astype(np.int32)

    return segment


def _sam(settings: SamSettings) -> Segmenter:
    sam = SamSegmenter(settings.checkpoint, settings.model, settings.points_per_side)
    return lambda scene, position: sam(scene.load_image(position))


def _settings_key(settings: Any) -> tuple[dict, dict]:
    """Every setting enters the masks' key as it is (none for a source without settings)."""
    return (to_dict(settings) if settings is not None else {}), {}


def _sam_key(settings: SamSettings) -> tuple[dict, dict]:
    # No checkpoint yet: the segmenter refuses to start, with what to do.
    return checkpoint_by_content(to_dict(settings), "checkpoint", "sam_checkpoint_sha256", "masks.sam.checkpoint")


@dataclass(frozen=True)
class MaskSourceEntry:
    """A registered mask source.

    Attributes:
        settings: its settings' dataclass, the sub-section ``masks.<name>`` of :class:`MasksCfg`; None for a source
            without any.
        segmenter: its settings (None for a source without any) -> the segmenter.
        key: its settings -> (what enters the masks' key as parameters, as input identities).
        frames_at_once: whether its segmenter may run on several frames at once (in threads); not for a model
            holding a GPU's memory.
    """

    settings: type | None
    segmenter: Callable[[Any], Segmenter]
    key: Callable[[Any], tuple[dict, dict]] = _settings_key
    frames_at_once: bool = True


MASK_SOURCES: dict[str, MaskSourceEntry] = {
    "gt": MaskSourceEntry(None, _ground_truth),
    "felzenszwalb": MaskSourceEntry(FelzenszwalbSettings, lambda settings: lambda scene, position: felzenszwalb_segments(
        scene.load_image(position), settings)),
    "slic": MaskSourceEntry(SlicSettings, lambda settings: lambda scene, position: slic_segments(
        scene.load_image(position), settings)),
    "sam": MaskSourceEntry(SamSettings, _sam, key=_sam_key, frames_at_once=False),
}


@dataclass(frozen=True)
class _MasksSection:
    source: str = "gt"

    def __post_init__(self) -> None:
        require_choice("masks.source", self.source, MASK_SOURCES)

    @property
    def settings(self) -> Any:
        """The chosen source's settings (its sub-section), or None for a source without any."""
        return getattr(self, self.source, None)

    def key(self) -> tuple[dict, dict]:
        """What enters the masks' key: the source's name and its settings' parameters, and their input identities."""
        params, inputs = MASK_SOURCES[self.source].key(self.settings)
        return {"source": self.source, **({self.source: params} if params else {})}, inputs

    def segmenter(self) -> Segmenter:
        return MASK_SOURCES[self.source].segmenter(self.settings)

    @property
    def frames_at_once(self) -> bool:
        return MASK_SOURCES[self.source].frames_at_once


MasksCfg = with_sub_sections(
    _MasksSection, "MasksCfg",
    {name: entry.settings for name, entry in MASK_SOURCES.items() if entry.settings is not None},
    """``snd precompute-masks``: where each frame's segment label map comes from, and each registered source's
    settings as a sub-section named after it (only the chosen one's are used, and enter the key).""")
