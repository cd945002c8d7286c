"""The probe registry is the one list of probes: the config, the eval loop and the report agree with it."""

from __future__ import annotations

import pytest

from snd_stages.config import DataCfg, EvalCfg, TrainCfg
from snd_stages.errors import ConfigError
from snd_stages.pipeline import load_config
from snd_stages.probes.registry import PROBES
from snd_stages.report.markdown import reported_metrics
from snd_stages.stages.evaluate import PROBE_FEATURES, evaluate, metric_table


def test_every_registered_probe_is_a_valid_config_value_and_nothing_else_is():
    load_config(None, [f"eval.probes=[{','.join(PROBES)}]"])  # all of them together
    with pytest.raises(ConfigError, match=r"eval.probes = 'not_a_probe' is not allowed; choose one of \['correspondence'"):
        load_config(None, ["eval.probes=[depth,not_a_probe]"])
    with pytest.raises(ConfigError, match="eval.probes = 'not_a_probe'"):  # the same check where EvalCfg is built in code
        evaluate(DataCfg(), TrainCfg(), EvalCfg(probes=("depth", "not_a_probe")), [])


def test_backbone_names_come_from_the_backbone_registry():
    with pytest.raises(ConfigError, match=r"train.backbone = 'dinov4_vits16' is not allowed; choose one of \["):
        load_config(None, ["train.backbone=dinov4_vits16"])


def test_the_report_rows_and_summary_come_from_the_registry():
    reported = reported_metrics({"metrics": metric_table()})
    assert reported == [(name, metric.name, metric.higher_is_better, metric.format)
                        for name, probe in PROBES.items() for metric in probe.metrics]
    for name, probe in PROBES.items():
        assert probe.headline in {metric.name for metric in probe.metrics}, name
    assert set(PROBE_FEATURES) == {name for name, probe in PROBES.items() if not probe.reads_pairs}
