"""The probes ``snd eval`` can run, each declared once: what it reads, how it runs, what it reports.

Adding a probe is one module beside this one (its fit, score and figure) and one entry in :data:`PROBES`; the eval
stage loops over the entries that ``eval.probes`` names, and the report's rows, its summary and its figures come
from them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.progress import Progress

from ..config import EvalCfg
from ..report.statistics import Measurement
from ..scenes.correspondence import CorrespondencePair
from .backbone import DENSE_FEATURES, DEPTH_FEATURES, MULTI_BLOCK_FEATURES, SEGMENTATION_FEATURES, FeatureSpec
from .features import FeatureSet
from .correspondence import correspondence_probe
from .dense import depth_probe, normals_probe, segmentation_probe
from .figures import correspondence_figure, depth_figure, normals_figure
from .frames import ProbeFrames


@dataclass(frozen=True)
class ProbeInputs:
    """What one probe is given: every model's features, so that it can fit the models' heads together.

    Attributes:
        models: the models' labels, in order.
        train, test: the frame probes' fitting and test frames, with each model's features for this probe (None for
            pair probes).
        pair_features: the pair probes' features of every pair's two views, one set per model (empty for frame
            probes).
        pairs: the correspondence pairs.
        classes: semantic classes (segmentation).
        label: what the progress bars call this probe.
    """

    cfg: EvalCfg
    device: Any
    label: str
    progress: Progress | None
    models: Sequence[str] = ()
    train: tuple[Sequence[FeatureSet], ProbeFrames] | None = None
    test: tuple[Sequence[FeatureSet], ProbeFrames] | None = None
    pair_features: Sequence[FeatureSet] = ()
    pairs: Sequence[CorrespondencePair] = ()
    classes: int = 0


@dataclass(frozen=True)
class Metric:
    """A reported metric: its key, whether higher is better, and how the report prints it."""

    name: str
    higher_is_better: bool
    format: str


@dataclass(frozen=True)
class Probe:
    """One probe.

    Attributes:
        name: its ``eval.probes`` name and report key.
        features: the tokens it reads (of the test frames, or of the pairs' views when ``reads_pairs``).
        reads_pairs: a correspondence probe (pairs of views), not a frame probe.
        metrics: the report's rows for it, in order.
        headline: the metric of its column in the report's summary table.
        run: ``inputs -> for each model, (per-unit measurements by metric, the first seed's predictions for the
            figures or None)``.
        figure: ``(report folder, test frames, {model: its predictions}) -> the picture's path``, or None.
    """

    name: str
    features: FeatureSpec
    metrics: tuple[Metric, ...]
    headline: str
    run: Callable[[ProbeInputs], list[tuple[dict[str, Measurement], Any]]]
    figure: Callable[[Path, ProbeFrames, dict[str, Any]], Path] | None = None
    reads_pairs: bool = False


def _depth(dense: bool) -> Callable[[ProbeInputs], list[tuple[dict[str, Measurement], Any]]]:
    def run(inputs: ProbeInputs):
        return depth_probe(inputs.train, inputs.test, inputs.cfg, inputs.device, inputs.cfg.seeds, dense=dense,
                           description=inputs.label, progress=inputs.progress)
    return run


def _normals(inputs: ProbeInputs):
    return normals_probe(inputs.train, inputs.test, inputs.cfg, inputs.device, inputs.cfg.seeds,
                         description=inputs.label, progress=inputs.progress)


def _segmentation(inputs: ProbeInputs):
    return [(scores, None) for scores in segmentation_probe(
        inputs.train, inputs.test, inputs.classes, inputs.cfg, inputs.device, inputs.cfg.seeds,
        description=inputs.label, progress=inputs.progress)]


def _correspondence(inputs: ProbeInputs):  # nothing is fitted: each model on its own
    return [correspondence_probe(features, list(inputs.pairs), inputs.cfg, inputs.device, f"{inputs.label} · {model}",
                                 inputs.progress) for features, model in zip(inputs.pair_features, inputs.models)]


_DEPTH_METRICS = (Metric("rmse", False, "{:.4f}"), Metric("abs_rel", False, "{:.4f}"), Metric("delta1", True, "{:.3f}"))

PROBES: dict[str, Probe] = {probe.name: probe for probe in (
    Probe("depth", DEPTH_FEATURES, _DEPTH_METRICS, "rmse", _depth(dense=False), depth_figure),
    Probe("depth_dense", MULTI_BLOCK_FEATURES, _DEPTH_METRICS, "rmse", _depth(dense=True)),
    Probe("normals", DENSE_FEATURES, (Metric("rmse", False, "{:.2f}"), Metric("mean", False, "{:.2f}"),
                                      Metric("within_11_25", True, "{:.1f}"), Metric("within_22_5", True, "{:.1f}"),
                                      Metric("within_30", True, "{:.1f}")), "rmse", _normals, normals_figure),
    Probe("segmentation", SEGMENTATION_FEATURES, (Metric("miou", True, "{:.4f}"),), "miou", _segmentation),
    Probe("correspondence", DENSE_FEATURES, (Metric("recall_5px", True, "{:.3f}"), Metric("recall_10px", True, "{:.3f}"),
                                             Metric("recall_20px", True, "{:.3f}")), "recall_10px", _correspondence,
          correspondence_figure, reads_pairs=True),
)}
