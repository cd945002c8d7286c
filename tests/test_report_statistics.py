"""Bootstrap intervals and paired deltas of probe metrics: values on hand-made cases, coverage on simulated ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from snd_stages.probes.metrics import segmentation_scores
from snd_stages.report.statistics import Measurement, Resampling, excludes_zero, interval, mean_iou


def test_a_mean_metric_is_the_mean_over_seeds_of_each_seeds_nanmean_over_images():
    values = np.array([[1.0, 2.0, np.nan, 3.0], [2.0, 2.0, 2.0, np.nan]])
    measurement = Measurement.of_means(values)
    np.testing.assert_allclose(measurement.per_seed(), [2.0, 2.0])
    assert measurement.estimate() == pytest.approx(2.0)
    assert measurement.to_json() == {"values": [[1, 2, None, 3], [2, 2, 2, None]]}


def test_a_rate_is_pooled_over_units_not_averaged():
    measurement = Measurement.of_rates([[9, 1]], [[10, 90]])
    assert measurement.estimate() == pytest.approx(10 / 100)  # not (0.9 + 0.011) / 2


def test_mean_iou_of_summed_areas_is_mmseg_miou_of_the_summed_confusion():
    generator = torch.Generator().manual_seed(0)
    confusions = torch.randint(0, 50, (5, 4, 4), generator=generator).double()
    confusions[:, 3, :] = 0  # class 3 never in the labels ...
    confusions[:, :, 3] = 0  # ... nor predicted: left out of the mean
    intersection = confusions.diagonal(dim1=1, dim2=2)
    parts = torch.cat([intersection, confusions.sum(2), confusions.sum(1)], dim=-1).numpy()[None]
    measurement = Measurement(parts, mean_iou, "miou")
    assert measurement.estimate() == pytest.approx(segmentation_scores(confusions.sum(0))["miou"], rel=1e-12)


def test_replicates_with_no_redraw_are_the_estimate():
    values = np.random.default_rng(1).normal(size=(3, 7))
    measurement = Measurement.of_means(values)
    identity = Resampling(np.ones((4, 3)), np.ones((4, 7)))
    np.testing.assert_allclose(measurement.replicates(identity), measurement.estimate())


def test_the_interval_covers_the_true_mean_about_95_percent_of_the_time():
    # Scores = true mean + a per-seed offset (probe fitting) + per-image noise: the interval has to cover both.
    rng = np.random.default_rng(2)
    covered = 0
    trials = 200
    for _ in range(trials):
        seed_offsets = rng.normal(0.0, 0.05, size=(5, 1))
        values = 1.0 + seed_offsets + rng.normal(0.0, 0.3, size=(5, 40))
        measurement = Measurement.of_means(values)
        low, high = interval(measurement.replicates(Resampling.draw(5, 40, 1000, rng)))
        covered += low <= 1.0 <= high
    # A percentile bootstrap with 5 seeds runs a little under its nominal level; far outside [0.85, 1] is a bug.
    assert 0.85 <= covered / trials <= 1.0


def test_a_paired_delta_sees_a_small_shift_that_separate_intervals_cannot():
    rng = np.random.default_rng(3)
    hardness = rng.normal(0.0, 1.0, size=(1, 60))  # images differ a lot, identically for both models
    baseline = Measurement.of_means(np.repeat(5.0 + hardness, 3, axis=0) + rng.normal(0, 0.01, (3, 60)))
    better = Measurement.of_means(np.repeat(4.9 + hardness, 3, axis=0) + rng.normal(0, 0.01, (3, 60)))
    draws = Resampling.draw(3, 60, 2000, rng)
    base_bounds, better_bounds = interval(baseline.replicates(draws)), interval(better.replicates(draws))
    assert base_bounds[0] < better_bounds[1]  # the models' own intervals overlap ...
    delta = interval(better.replicates(draws) - baseline.replicates(draws))
    assert delta[0] == pytest.approx(-0.1, abs=0.02) and delta[1] == pytest.approx(-0.1, abs=0.02)
    assert excludes_zero(delta)  # ... the paired delta is clearly below 0


def test_a_model_identical_to_the_baseline_has_a_zero_delta_that_does_not_count():
    values = np.random.default_rng(4).normal(size=(3, 10))
    draws = Resampling.draw(3, 10, 500, np.random.default_rng(5))
    same = Measurement.of_means(values).replicates(draws)
    assert interval(same - same) == [0.0, 0.0] and not excludes_zero([0.0, 0.0])
    assert interval(np.full(3, np.nan)) == [None, None] and not excludes_zero([None, None])
