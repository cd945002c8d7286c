"""The frames a probe fits on and is scored on, with their ground truth (depth, normals, semantic classes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .features import FrameSet

MIN_DEPTH = 1e-3  # metres: nearer depth is invalid


@dataclass
class ProbeFrames:
    """Frames with their ground truth. Images are loaded on demand (only feature extraction needs them).

    Attributes:
        names: one per frame.
        load_image: ``index -> [H, W, 3]`` uint8 RGB.
        image_size: (H, W) of every frame.
        identity: fingerprint of the images' source, for feature cache keys.
        depth: ``[N, H, W]`` float32 metres, 0 = invalid.
        normals: ``[N, 3, H, W]`` float16 camera-frame unit normals, or None when no probe needs them.
        semantics: ``[N, H, W]`` uint8 classes (255 = ignore), or None when no probe needs them.
        depth_region: where depth is scored (``[H, W]`` bool, e.g. NYUv2's Eigen crop); None = everywhere.
        fitted_normals: how many frames' normals were fitted to their depth.
    """

    names: list[str]
    load_image: Callable[[int], np.ndarray] = field(repr=False)
    image_size: tuple[int, int]
    identity: object
    depth: torch.Tensor
    normals: torch.Tensor | None = None
    semantics: torch.Tensor | None = None
    depth_region: torch.Tensor | None = None
    fitted_normals: int = 0

    def __len__(self) -> int:
        return len(self.names)

    def frame_set(self, name: str, count: int | None = None) -> FrameSet:
        """The frames (the first ``count`` of them) as a feature cache's frame set."""
        names = tuple(self.names[:count])
        identity = self.identity[: len(names)] if isinstance(self.identity, list) else self.identity
        return FrameSet(name, names, self.load_image, self.image_size, identity)
