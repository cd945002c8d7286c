"""``gaussians.depthsplat``: the DepthSplat reconstructor's checkpoint, its configuration and its depth range."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from ...config import require

# The released models (:data:`.encoder.MODELS`): ``small``, ``base`` and ``large`` are the RE10K 256x256 models
# (frames in multiples of 16), ``small_448x768`` and ``base_448x768`` the RE10K+DL3DV 448x768 ones (multiples
# of 64).
ModelName = Literal["small", "small_448x768", "base", "large", "base_448x768"]
MODEL_NAMES: tuple[str, ...] = get_args(ModelName)


@dataclass(frozen=True)
class DepthSplatSettings:
    """``gaussians.depthsplat``."""

    # the authors' checkpoint (depthsplat-gs-small-....pth, or a safetensors copy), loaded strictly
    checkpoint: Path | None = None
    # auto: the configuration the checkpoint's shapes match | small | base | large | small_448x768 | base_448x768
    model: Literal["auto", "small", "small_448x768", "base", "large", "base_448x768"] = "auto"
    # the depth range of the cost volume in metres (the authors': 0.5 and 100 for RE10K, 0.5 and 200 for DL3DV)
    near: float = 0.5
    far: float = 100.0

    def __post_init__(self) -> None:
        require(self.near > 0, "near", self.near, "a positive number (metres)")
        require(self.far > self.near, "far", self.far, f"a number (metres) > near = {self.near}")
