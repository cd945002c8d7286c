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

from ..errors import ConfigError

MaskSource = Literal["gt", "sam", "felzenszwalb", "slic"]


@dataclass(frozen=True)
class SuperpixelOptions:
    felzenszwalb_scale: float = 100.0
    felzenszwalb_sigma: float = 0.8
    felzenszwalb_min_size: int = 50
    slic_segments: int = 150
    slic_compactness: float = 10.0


def felzenszwalb_segments(image: np.ndarray, options: SuperpixelOptions) -> np.ndarray:
    """``[H, W, 3]`` uint8 -> ``[H, W]`` int32 Felzenszwalb-Huttenlocher segments numbered from 1."""
    labels = felzenszwalb(
        image, scale=options.felzenszwalb_scale, sigma=options.felzenszwalb_sigma, min_size=options.felzenszwalb_min_size
    )
    return (labels + 1).astype(np.int32)


def slic_segments(image: np.ndarray, options: SuperpixelOptions) -> np.ndarray:
    """``[H, W, 3]`` uint8 -> ``[H, W]`` int32 SLIC superpixels numbered from 1."""
    labels = slic(image, n_segments=options.slic_segments, compactness=options.slic_compactness, start_label=1)
    return labels.astype(np.int32)


class SamSegmenter:
    """segment-anything's automatic mask generator, loaded from a local checkpoint (never downloaded)."""

    def __init__(self, checkpoint: Path | None, model_type: str = "vit_h", points_per_side: int = 32, device: str = "cpu"):
        if checkpoint is None:
            raise ConfigError(
                "masks.source = 'sam' needs masks.sam_checkpoint: the path of a segment-anything checkpoint such as "
                "sam_vit_h_4b8939.pth (snd never downloads weights); or choose masks.source gt, felzenszwalb or slic"
            )
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise ConfigError(f"masks.sam_checkpoint = {str(checkpoint)!r} does not exist; give the path of a SAM checkpoint")
        try:
            from segment_anything import SamAutomaticMaskGenerator, sam_model_registry
        except ImportError:
            raise ConfigError("masks.source = 'sam' needs the segment-anything package: pip install segment-anything==1.0") from None
        if model_type not in sam_model_registry:
            raise ConfigError(f"masks.sam_model = {model_type!r}; choose one of {sorted(sam_model_registry)}")
        try:
            model = sam_model_registry[model_type](checkpoint=str(checkpoint))
        except RuntimeError as error:
            raise ConfigError(
                f"masks.sam_checkpoint {checkpoint} does not fit masks.sam_model = {model_type!r} ({str(error)[:200]}); "
                "set masks.sam_model to the checkpoint's architecture"
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
