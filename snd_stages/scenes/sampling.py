"""View sampling: (scene, two context frames, target frames) samples, seeded and reproducible.

Frame positions index a scene's filename-sorted frame list. For each sample the context gap is drawn uniformly
from ``sampling.frame_gap`` = [min, max] (capped by the scene length), the first context frame uniformly among
the positions that leave room for it, and the targets uniformly without replacement from the frames between the
two context frames (inclusive of the context frames unless ``exclude_context_targets``), or, with
``targets: context`` (the paper's ablation E), from the two context frames themselves.

Each scene has its own random stream seeded by (seed, scene id), so adding or removing a scene never changes the
samples of the others.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from ..config import SamplingCfg

# Cap on redraws when ``require_consecutive_file_numbers`` rejects pairs that straddle a hole in the sequence.
_MAX_DRAWS_PER_SAMPLE = 100


@dataclass(frozen=True)
class ViewSample:
    """One training sample: positions in the scene's sorted frame list."""

    scene: str
    context: tuple[int, int]
    targets: tuple[int, ...]

    def to_json(self) -> dict:
        return {"scene": self.scene, "context": list(self.context), "targets": list(self.targets)}

    @staticmethod
    def from_json(entry: dict) -> "ViewSample":
        return ViewSample(entry["scene"], tuple(entry["context"]), tuple(entry["targets"]))


def sample_scene(scene: str, frame_numbers: list[int], cfg: SamplingCfg) -> list[ViewSample]:
    """``cfg.samples_per_scene`` samples of one scene; [] if the scene is shorter than the smallest gap.

    Args:
        scene: scene id (seeds this scene's random stream together with ``cfg.seed``).
        frame_numbers: the number in each frame's file name, in sorted order (for the consecutive-number rule).
    """
    count = len(frame_numbers)
    low, high = cfg.frame_gap
    high = min(high, count - 1)
    if high < low:
        return []
    rng = np.random.default_rng([cfg.seed, zlib.crc32(scene.encode())])
    samples = []
    for _ in range(cfg.samples_per_scene):
        for _ in range(_MAX_DRAWS_PER_SAMPLE):
            gap = int(rng.integers(low, high + 1))
            first = int(rng.integers(0, count - gap))
            second = first + gap
            if not cfg.require_consecutive_file_numbers or frame_numbers[second] - frame_numbers[first] == gap:
                break
        else:
            continue  # this scene has too many holes to honour the rule; fewer samples rather than wrong ones
        if cfg.targets == "context":
            candidates = np.array([first, second])
        else:
            candidates = np.arange(first, second + 1)
            if cfg.exclude_context_targets:
                candidates = candidates[1:-1]
        targets = np.sort(rng.choice(candidates, size=cfg.targets_per_sample, replace=False))
        samples.append(ViewSample(scene, (first, second), tuple(int(t) for t in targets)))
    return samples
