"""``gaussians.mvsplat``: the MVSplat reconstructor's checkpoint and the depth range of its cost volume."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...config import require


@dataclass(frozen=True)
class MVSplatSettings:
    """``gaussians.mvsplat``."""

    # the authors' RE10K checkpoint (re10k.ckpt, or a safetensors copy), loaded strictly
    checkpoint: Path | None = None
    # the depth range of the cost volume in metres (the authors' 1 and 100)
    near: float = 1.0
    far: float = 100.0

    def __post_init__(self) -> None:
        require(self.near > 0, "near", self.near, "a positive number (metres)")
        require(self.far > self.near, "far", self.far, f"a number (metres) > near = {self.near}")
