"""Point estimates and 95 % intervals of probe metrics over probe seeds and test units, and paired deltas.

A probe's score moves with two things a reader cannot see in one number: the seed its head was fitted with, and
the particular test images (or correspondence pairs) it was scored on. Every metric is therefore kept as
per-unit parts, ``parts[s, u, :]`` for probe seed ``s`` and test unit ``u``, that sum over units and reduce to
the metric, so that any subset of units (and any reweighting of them) has a well-defined score:

- a mean of per-image values (depth and normal errors): parts ``(value, 1)``, reduced by their ratio; an image
  with no valid pixel has parts ``(0, 0)`` (the protocol's nanmean);
- a pooled rate (correspondence recall, pooled over all matches of all pairs): parts ``(hits, matches)``;
- mIoU (confusion summed over the data set, then per-class IoU, nanmean): parts ``(intersection, label
  pixels, predicted pixels)`` per class.

The point estimate is the mean over seeds of each seed's score on all units. The interval is a two-level
percentile bootstrap: each replicate redraws the seeds and the units with replacement and takes the mean over
the drawn seeds of their scores on the drawn units, so it covers the seed-to-seed spread and the test sample
together. Models are compared on the same replicates (same seeds, same units: the probes of every model use the
same seeds and data), so a delta's interval is paired: it does not count twice the variation that both models
share, such as a hard test image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95


def ratio(sums: np.ndarray) -> np.ndarray:
    """``[..., 2]`` (numerator, denominator) sums -> ``[...]`` their ratio, NaN where the denominator is 0."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sums[..., 1] > 0, sums[..., 0] / np.where(sums[..., 1] > 0, sums[..., 1], 1.0), np.nan)


def class_iou(sums: np.ndarray) -> np.ndarray:
    """``[..., 3C]`` (intersection, label pixels, predicted pixels) per class -> ``[..., C]`` IoU per class, NaN for
    a class absent from labels and predictions (empty union)."""
    intersection, labels, predicted = np.split(sums, 3, axis=-1)
    union = labels + predicted - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, intersection / np.where(union > 0, union, 1.0), np.nan)


def mean_iou(sums: np.ndarray) -> np.ndarray:
    """``[..., 3C]`` (intersection, label pixels, predicted pixels) per class -> ``[...]`` mmseg's mIoU.

    A class absent from labels and predictions (empty union) is left out of the mean; NaN if every class is.
    """
    iou = class_iou(sums)
    present = np.isfinite(iou).sum(-1)
    return np.where(present > 0, np.nansum(iou, axis=-1) / np.maximum(present, 1), np.nan)


@dataclass(frozen=True)
class Measurement:
    """One metric of one model as per-unit parts: ``reduce(parts[s].sum(units))`` is seed ``s``'s score.

    Attributes:
        parts: ``[seeds, units, K]`` float64.
        reduce: ``[..., K]`` summed parts -> ``[...]`` scores.
        kind: ``mean`` (parts: value, 1), ``rate`` (hits, totals) or ``miou`` (per-class intersection, label and
            predicted pixels): how :meth:`to_json` names the parts.
    """

    parts: np.ndarray
    reduce: Callable[[np.ndarray], np.ndarray]
    kind: str = "mean"

    @staticmethod
    def of_means(values: np.ndarray) -> "Measurement":
        """The mean over units of per-unit values ``[seeds, units]`` (NaN units left out)."""
        values = np.asarray(values, dtype=np.float64)
        present = ~np.isnan(values)
        return Measurement(np.stack([np.where(present, values, 0.0), present.astype(np.float64)], -1), ratio, "mean")

    @staticmethod
    def of_rates(hits: np.ndarray, totals: np.ndarray) -> "Measurement":
        """The pooled rate ``Σ hits / Σ totals`` of per-unit counts ``[seeds, units]``."""
        return Measurement(np.stack([np.asarray(hits, np.float64), np.asarray(totals, np.float64)], -1), ratio, "rate")

    def to_json(self) -> dict:
        """The per-seed, per-unit parts as nested lists (``[seeds][units]``, per class for mIoU), enough to recompute
        the score, its per-seed values and its interval."""
        if self.kind == "mean":
            values = np.where(self.parts[..., 1] > 0, self.parts[..., 0], np.nan)
            return {"values": _listed(values)}
        if self.kind == "rate":
            return {"hits": _listed(self.parts[..., 0]), "totals": _listed(self.parts[..., 1])}
        intersection, labels, predicted = np.split(self.parts, 3, axis=-1)
        return {"intersection": _listed(intersection), "label_pixels": _listed(labels),
                "predicted_pixels": _listed(predicted)}

    def per_seed(self) -> np.ndarray:
        """``[seeds]``: each seed's score on all units."""
        return self.reduce(self.parts.sum(axis=1))

    def estimate(self) -> float:
        """The mean over seeds of :meth:`per_seed` (NaN seeds left out; NaN if all are)."""
        scores = self.per_seed()
        return float(np.nanmean(scores)) if np.isfinite(scores).any() else float("nan")

    def replicates(self, resampling: "Resampling") -> np.ndarray:
        """``[B]`` bootstrap replicates of :meth:`estimate` under ``resampling``'s draws."""
        if self.parts.shape[:2] != resampling.shape:
            raise ValueError(f"parts of {self.parts.shape[:2]} (seeds, units), resampling of {resampling.shape}")
        sums = np.einsum("bu,suk->bsk", resampling.unit_counts, self.parts)  # [B, seeds, K]
        scores = self.reduce(sums)  # [B, seeds]
        counts = np.where(np.isnan(scores), 0.0, resampling.seed_counts)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(counts.sum(1) > 0, (np.nan_to_num(scores) * counts).sum(1) / counts.sum(1), np.nan)


def _listed(array: np.ndarray) -> list:
    """Nested lists with NaN as None (JSON has no NaN) and whole numbers as ints."""
    if array.ndim == 0:
        value = float(array)
        return None if np.isnan(value) else (int(value) if value.is_integer() and abs(value) < 2**53 else value)
    return [_listed(row) for row in array]


@dataclass(frozen=True)
class Resampling:
    """``B`` joint draws of seeds and units with replacement, as multiplicities.

    Attributes:
        seed_counts: ``[B, seeds]``: how often each seed is drawn (each row sums to ``seeds``).
        unit_counts: ``[B, units]``: how often each unit is drawn (each row sums to ``units``).
    """

    seed_counts: np.ndarray
    unit_counts: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.seed_counts.shape[1], self.unit_counts.shape[1]

    @staticmethod
    def draw(seeds: int, units: int, replicates: int, rng: np.random.Generator) -> "Resampling":
        """Independent uniform draws of ``seeds`` seeds and ``units`` units per replicate."""
        seed_counts = rng.multinomial(seeds, np.full(seeds, 1.0 / seeds), size=replicates).astype(np.float64)
        unit_counts = rng.multinomial(units, np.full(units, 1.0 / units), size=replicates).astype(np.float64)
        return Resampling(seed_counts, unit_counts)


def interval(replicates: np.ndarray, confidence: float = CONFIDENCE) -> list[float | None]:
    """The percentile interval of bootstrap replicates (NaN replicates left out); ``[None, None]`` if all are."""
    finite = replicates[np.isfinite(replicates)]
    if finite.size == 0:
        return [None, None]
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return [float(low), float(high)]


def excludes_zero(bounds: list[float | None]) -> bool:
    low, high = bounds
    return low is not None and (low > 0 or high < 0)
