"""The probe registry is the one list of probes: the config, the eval loop and the report agree with it."""

from __future__ import annotations

import pytest

from snd_stages.config import PROBE_NAMES, EvalCfg
from snd_stages.errors import ConfigError
from snd_stages.probes.registry import PROBES
from snd_stages.stages.evaluate import HEADLINE, PROBE_FEATURES, REPORTED


def test_every_registered_probe_is_a_valid_config_value_and_nothing_else_is():
    assert set(PROBE_NAMES) == set(PROBES)
    EvalCfg(probes=tuple(PROBES))  # all of them together
    with pytest.raises(ConfigError, match="eval.probes"):
        EvalCfg(probes=("depth", "not_a_probe"))


def test_the_report_rows_and_summary_come_from_the_registry():
    assert [(name, metric) for name, metric, _, _ in REPORTED] == [
        (name, metric.name) for name, probe in PROBES.items() for metric in probe.metrics]
    assert HEADLINE == [(name, probe.headline) for name, probe in PROBES.items()]
    for name, probe in PROBES.items():
        assert probe.headline in {metric.name for metric in probe.metrics}, name
    assert set(PROBE_FEATURES) == {name for name, probe in PROBES.items() if not probe.reads_pairs}
