"""View sampling honours the configured frame gap, target placement and seeds."""

from __future__ import annotations

from collections import Counter

import pytest

from snd_stages.config import SamplingCfg
from snd_stages.scenes.sampling import ViewSample, sample_scene


def draw(numbers=None, count=40, **overrides) -> list[ViewSample]:
    cfg = SamplingCfg(**{"samples_per_scene": 400, **overrides})
    return sample_scene("scene", numbers if numbers is not None else list(range(count)), cfg)


def test_every_gap_in_the_range_is_used_and_no_other():
    samples = draw(frame_gap=(4, 8))
    gaps = Counter(s.context[1] - s.context[0] for s in samples)
    assert set(gaps) == {4, 5, 6, 7, 8}
    assert min(gaps.values()) > 400 / 5 * 0.6  # roughly uniform


def test_reference_fixed_gap_is_one_config_away():
    assert {s.context[1] - s.context[0] for s in draw(frame_gap=(8, 8))} == {8}


def test_targets_lie_strictly_between_context_frames_when_excluding():
    for sample in draw(frame_gap=(2, 6), targets_per_sample=1):
        first, second = sample.context
        assert all(first < t < second for t in sample.targets)


def test_targets_may_coincide_with_context_frames_when_allowed():
    samples = draw(frame_gap=(8, 8), exclude_context_targets=False)
    positions = Counter(s.targets[0] - s.context[0] for s in samples)
    assert set(positions) == set(range(9))  # inclusive [i, i + 8], as in the reference sampler


def test_context_targets_are_one_of_the_two_context_frames_seeded():
    samples = draw(frame_gap=(2, 6), targets="context")
    assert all(len(sample.targets) == 1 and sample.targets[0] in sample.context for sample in samples)
    chosen = Counter(sample.context.index(sample.targets[0]) for sample in samples)
    assert min(chosen[0], chosen[1]) > 400 / 2 * 0.8  # either context frame, about equally often
    assert draw(frame_gap=(2, 6), targets="context") == samples
    # A gap of 1 leaves no frame between the context frames, but both of them can be targets.
    both = draw(frame_gap=(1, 1), targets="context", targets_per_sample=2)
    assert all(sample.targets == sample.context for sample in both)


def test_several_targets_are_distinct_and_sorted():
    for sample in draw(frame_gap=(5, 8), targets_per_sample=3):
        assert len(set(sample.targets)) == 3 and list(sample.targets) == sorted(sample.targets)


def test_context_frames_stay_inside_the_scene():
    for sample in draw(count=10, frame_gap=(4, 30)):
        assert 0 <= sample.context[0] < sample.context[1] <= 9


def test_seeded_and_scene_specific():
    cfg = SamplingCfg(samples_per_scene=20, seed=5)
    frames = list(range(30))
    assert sample_scene("a", frames, cfg) == sample_scene("a", frames, cfg)
    assert sample_scene("a", frames, cfg) != sample_scene("b", frames, cfg)
    assert sample_scene("a", frames, cfg) != sample_scene("a", frames, SamplingCfg(samples_per_scene=20, seed=6))


def test_short_scene_gives_no_samples():
    assert draw(count=4, frame_gap=(4, 8)) == []


def test_consecutive_file_numbers_rule_rejects_pairs_across_holes():
    numbers = list(range(0, 20)) + list(range(100, 120))  # a hole between positions 19 and 20
    samples = draw(numbers=numbers, frame_gap=(6, 6), require_consecutive_file_numbers=True)
    assert samples
    for sample in samples:
        first, second = sample.context
        assert numbers[second] - numbers[first] == 6
    loose = draw(numbers=numbers, frame_gap=(6, 6))
    assert any(numbers[s.context[1]] - numbers[s.context[0]] != 6 for s in loose)


def test_json_round_trip():
    sample = ViewSample("s", (3, 9), (5, 7))
    assert ViewSample.from_json(sample.to_json()) == sample


@pytest.mark.parametrize("gap, targets, exclude", [((2, 4), 2, True), ((1, 4), 1, True)])
def test_infeasible_target_count_is_a_config_error(gap, targets, exclude):
    from snd_stages.errors import ConfigError

    with pytest.raises(ConfigError, match="targets_per_sample"):
        SamplingCfg(frame_gap=gap, targets_per_sample=targets, exclude_context_targets=exclude)
