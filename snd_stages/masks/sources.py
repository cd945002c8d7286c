"""Segment label maps for mask-aware lifting and semantic blending, from one of four sources.

- ``gt``: the dataset's instance masks (``instance_segmentation/``), the reference method's default.
- ``felzenszwalb`` / ``slic``: scikit-image superpixels; need nothing but the image, so they work offline on
  any data.
- ``sam``: the ``segment-anything`` automatic mask generator with a checkpoint file the user provides.

Every source returns an ``[H, W]`` int32 map at the image's resolution in which equal values mean "same
segment". Label 0 is an ordinary segment id for ``gt`` (ScanNet++'s unlabelled pixels form one segment, as in
the reference code); the other sources number their segments from 1 and leave no pixel at 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from skimage.measure import label as connected_components
from skimage.segmentation import felzenszwalb, slic

from ..config import require
from ..errors import ConfigError

@dataclass(frozen=True)
class FelzenszwalbSettings:
    """``masks.felzenszwalb``: scikit-image's Felzenszwalb-Huttenlocher segmentation."""

    scale: float = 100.0  # larger: larger segments
    sigma: float = 0.8  # the Gaussian blur's width in pixels before segmenting (0 = none)
    min_size: int = 50  # smallest segment in pixels

    def __post_init__(self) -> None:
        require(self.scale > 0, "scale", self.scale, "a positive number")
        require(self.sigma >= 0, "sigma", self.sigma, "a number >= 0 (the Gaussian blur's width in pixels; 0 = no blur)")
        require(self.min_size >= 1, "min_size", self.min_size, "an integer >= 1")


@dataclass(frozen=True)
class SlicSettings:
    """``masks.slic``: scikit-image's SLIC superpixels."""

    segments: int = 150  # about how many superpixels per image
    compactness: float = 10.0  # larger: squarer superpixels, less bound to colour edges

    def __post_init__(self) -> None:
        require(self.segments >= 2, "segments", self.segments, "an integer >= 2")
        require(self.compactness > 0, "compactness", self.compactness, "a positive number")


@dataclass(frozen=True)
class SamSettings:
    """``masks.sam``: segment-anything's automatic mask generator, from a checkpoint the user provides."""

    checkpoint: Path | None = None
    model: Literal["vit_h", "vit_l", "vit_b"] = "vit_h"
    points_per_side: int = 32

    def __post_init__(self) -> None:
        require(self.points_per_side >= 1, "points_per_side", self.points_per_side, "an integer >= 1")


def felzenszwalb_segments(image: np.ndarray, settings: FelzenszwalbSettings) -> np.ndarray:
    """``[H, W, 3]`` uint8 -> ``[H, W]`` int32 Felzenszwalb-Huttenlocher segments numbered from 1."""
    labels = felzenszwalb(image, scale=settings.scale, sigma=settings.sigma, min_size=settings.min_size)
    return (labels + 1).astype(np.int32)


def slic_segments(image: np.ndarray, settings: SlicSettings) -> np.ndarray:
    """``[H, W, 3]`` uint8 -> ``[H, W]`` int32 SLIC superpixels numbered from 1."""
    labels = slic(image, n_segments=settings.segments, compactness=settings.compactness, start_label=1)
    return labels.astype(np.int32)


class SamSegmenter:
    """segment-anything's automatic mask generator, loaded from a local checkpoint (never downloaded)."""

    def __init__(self, checkpoint: Path | None, model_type: str = "vit_h", points_per_side: int = 32, device: str = "cpu"):
        if checkpoint is None:
            raise ConfigError(
                "masks.source = 'sam' needs masks.sam.checkpoint: the path of a segment-anything checkpoint such as "
                "sam_vit_h_4b8939.pth (snd never downloads weights); or choose masks.source gt, felzenszwalb or slic"
            )
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise ConfigError(f"masks.sam.checkpoint = {str(checkpoint)!r} does not exist; give the path of a SAM checkpoint")
        try:
            from segment_anything import SamAutomaticMaskGenerator, sam_model_registry
        except ImportError:
            raise ConfigError("masks.source = 'sam' needs the segment-anything package: pip install segment-anything==1.0") from None
        if model_type not in sam_model_registry:
            raise ConfigError(f"masks.sam.model = {model_type!r}; choose one of {sorted(sam_model_registry)}")
        try:
            model = sam_model_registry[model_type](checkpoint=str(checkpoint))
        except RuntimeError as error:
            raise ConfigError(
                f"masks.sam.checkpoint {checkpoint} does not fit masks.sam.model = {model_type!r} ({str(error)[:200]}); "
                "set masks.sam.model to the checkpoint's architecture"
            ) from None
        self.generator = SamAutomaticMaskGenerator(model.to(device), points_per_side=points_per_side)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """``[H, W, 3]`` uint8 -> ``[H, W]`` int32: masks painted largest first (smaller ones on top), and every
        connected region no mask covers becomes a segment of its own."""
        masks = sorted(self.generator.generate(image), key=lambda m: m["area"], reverse=True)
        labels = np.zeros(image.shape[:2], dtype=np.int32)
        for index, mask in enumerate(masks, start=1):
            labels[mask["segmentation"]] = index
        holes = connected_components(labels == 0, connectivity=1)
        labels[labels == 0] = holes[labels == 0] + len(masks)
        return labels
