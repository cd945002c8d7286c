"""``pipeline.yaml`` as a whole: one section per stage, the components' settings as sub-sections of theirs.

The sections of the stages live in :mod:`snd_stages.config`; ``gaussians`` and ``masks`` live beside their
registries (:class:`snd_stages.reconstruct.GaussiansCfg`, :class:`snd_stages.masks.MasksCfg`), whose entries own
their settings: ``gaussians.depth.*``, ``gaussians.mvsplat.*``, ``masks.felzenszwalb.*``, ``masks.slic.*``,
``masks.sam.*``. Unknown keys, wrong types and out-of-range values raise :class:`~snd_stages.errors.ConfigError`
naming the key, the value and what is allowed. Command-line overrides use the same dotted keys::

    snd precompute-gaussians --set gaussians.depth.footprint_scale=1.0
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .config import DataCfg, DemoCfg, EvalCfg, PrepareScannetppCfg, SamplingCfg, StoreCfg, TrainCfg, read_config, require_choice
from .masks import MasksCfg
from .models.backbones import registered_backbones
from .probes.registry import PROBES
from .reconstruct import GaussiansCfg


@dataclass(frozen=True)
class PipelineCfg:
    data: DataCfg = field(default_factory=DataCfg)
    demo: DemoCfg = field(default_factory=DemoCfg)
    prepare_scannetpp: PrepareScannetppCfg = field(default_factory=PrepareScannetppCfg)
    sampling: SamplingCfg = field(default_factory=SamplingCfg)
    gaussians: GaussiansCfg = field(default_factory=GaussiansCfg)
    masks: MasksCfg = field(default_factory=MasksCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    store: StoreCfg = field(default_factory=StoreCfg)

    def __post_init__(self) -> None:
        # The names that registries own, checked against them: each registry is the one list of its names.
        require_choice("train.backbone", self.train.backbone, [spec.name for spec in registered_backbones()])
        for probe in self.eval.probes:
            require_choice("eval.probes", probe, PROBES)


# Keys of the earlier flat layout -> their sub-section now: such a key is refused with its new name.
MOVED_KEYS = {
    **{f"gaussians.{name}": f"gaussians.depth.{name}"
       for name in ("covariance", "footprint_scale", "disk_thickness", "opacity", "invalid_depth", "normals")},
    "gaussians.mvsplat_checkpoint": "gaussians.mvsplat.checkpoint",
    "gaussians.near": "gaussians.mvsplat.near",
    "gaussians.far": "gaussians.mvsplat.far",
    **{f"masks.felzenszwalb_{name}": f"masks.felzenszwalb.{name}" for name in ("scale", "sigma", "min_size")},
    **{f"masks.slic_{name}": f"masks.slic.{name}" for name in ("segments", "compactness")},
    **{f"masks.sam_{name}": f"masks.sam.{name}" for name in ("checkpoint", "model", "points_per_side")},
}


def load_config(path: Path | None, overrides: list[str] | tuple[str, ...] = (), allowed_sections=None,
                profile: str | None = None) -> PipelineCfg:
    """``pipeline.yaml`` at ``path`` (defaults where None), with a profile and then ``section.key=value`` overrides
    applied (:func:`snd_stages.config.read_config`)."""
    return read_config(PipelineCfg, path, overrides, allowed_sections, profile, MOVED_KEYS)
