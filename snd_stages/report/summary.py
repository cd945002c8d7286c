"""Every model's metrics summarised for the report: point estimates, per-seed scores, intervals, paired deltas."""

from __future__ import annotations

import math

import numpy as np

from ..config import EvalCfg
from .statistics import CONFIDENCE, Measurement, Resampling, class_iou, excludes_zero, interval

# Fewer distillation samples than this (steps x batch) are not expected to change a probe's score. On the GPU
# demo (192x256, ViT-S/14), 8,000 samples moved nothing; with 64,000 every probe improved beyond its interval,
# and the held-out correspondence recall had made most of its gain by 32,000.
SAMPLES_FOR_AN_EFFECT = 32_000


def samples_seen(manifest: dict | None) -> int | None:
    """Distillation samples (steps x batch) of a finished run, from its manifest; None where it does not say (a
    checkpoint has none)."""
    try:
        return int(manifest["steps"]) * int(manifest["params"]["batch_size"])
    except (ValueError, KeyError, TypeError):
        return None


def short_run_notes(results: dict) -> list[str]:
    """A plain warning for each model trained too briefly to be expected to differ from the baseline."""
    notes = []
    for label, model in list(results["models"].items())[1:]:
        seen = model.get("samples_seen")
        if seen is not None and seen < SAMPLES_FOR_AN_EFFECT:
            notes.append(f"{label} saw {seen:,} distillation samples (steps x batch): too few to expect any change "
                         f"from the baseline (on the GPU demo, gains showed after some {SAMPLES_FOR_AN_EFFECT:,}; a CPU "
                         "run is a smoke test of the pipeline, not of the method). Its deltas are noise.")
    return notes


def summarise(results: dict, measurements: dict[str, dict[str, dict[str, Measurement]]], cfg: EvalCfg) -> None:
    """Point estimates, per-seed scores, 95 % intervals and per-unit parts of every model's metrics, and each
    model's paired deltas against ``results["reference"]`` (the baseline unless ``eval.reference`` names a run),
    into ``results`` (:mod:`snd_stages.report.statistics`).

    One resampling per probe is drawn from ``eval.seed`` and shared by every model, which makes the deltas paired.
    """
    labels = list(measurements)
    rng = np.random.default_rng(cfg.seed)
    resamplings = {}
    for probe, metrics in measurements[labels[0]].items():
        seeds, units = next(iter(metrics.values())).parts.shape[:2]
        resamplings[probe] = Resampling.draw(seeds, units, cfg.bootstrap_replicates, rng)
    replicates = {}
    for label in labels:
        model = results["models"][label]
        model.update({"intervals": {}, "per_seed": {}, "per_unit": {}})
        for probe, metrics in measurements[label].items():
            for metric, m in metrics.items():
                replicates[(label, probe, metric)] = m.replicates(resamplings[probe])
            model[probe] = {metric: _finite(m.estimate()) for metric, m in metrics.items()}
            model["intervals"][probe] = {metric: interval(replicates[(label, probe, metric)], CONFIDENCE)
                                         for metric in metrics}
            model["per_seed"][probe] = {metric: [_finite(v) for v in m.per_seed()] for metric, m in metrics.items()}
            model["per_unit"][probe] = {metric: m.to_json() for metric, m in metrics.items()}
            if probe == "segmentation":
                model[probe]["per_class_iou"] = _per_class_iou(metrics["miou"])
    reference = results.get("reference", labels[0])
    results["deltas"] = {}
    for label in labels:
        if label == reference:
            continue
        deltas = results["deltas"][label] = {}
        for probe, metrics in measurements[label].items():
            if probe not in measurements[reference]:
                continue
            deltas[probe] = {}
            for metric in metrics:
                difference = replicates[(label, probe, metric)] - replicates[(reference, probe, metric)]
                bounds = interval(difference, CONFIDENCE)
                value = results["models"][label][probe][metric]
                base = results["models"][reference][probe][metric]
                deltas[probe][metric] = {"delta": None if value is None or base is None else value - base,
                                         "interval": bounds, "excludes_zero": excludes_zero(bounds)}
    results["statistics"] = {
        "seeds": list(cfg.seeds), "bootstrap_replicates": cfg.bootstrap_replicates, "confidence": CONFIDENCE,
        "method": "mean over probe seeds of each seed's score on all test units; percentile intervals from a "
                  "two-level bootstrap redrawing seeds and test units (images, or pairs for correspondence) with "
                  "replacement; deltas paired on the same draws",
    }


def _finite(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _per_class_iou(miou: Measurement) -> list[float | None]:
    """Each class's IoU on all test images, averaged over seeds (None for a class absent everywhere)."""
    iou = class_iou(miou.parts.sum(axis=1))  # [seeds, classes]
    return [_finite(float(np.nanmean(column))) if np.isfinite(column).any() else None for column in iou.T]
