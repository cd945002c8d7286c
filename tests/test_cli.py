"""The snd command line on a ScanNet++-format fixture: commands, skip/resume messages, shards, user errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from snd_stages.cli import app
from snd_stages.errors import ConfigError
from snd_stages.store import Store
from tests.scannetpp_fixture import write_fixture

REGISTERED = {"make-demo-data", "sample-views", "precompute-gaussians", "precompute-masks", "check-store"}


@pytest.fixture
def project(tmp_path) -> Path:
    write_fixture(tmp_path / "scannetpp", frame_numbers=(1, 2, 3, 4, 5, 6))
    (tmp_path / "pipeline.yaml").write_text(
        f"data:\n  dataset: scannetpp\n  root: {tmp_path / 'scannetpp'}\n"
        "sampling:\n  frame_gap: [2, 3]\n  samples_per_scene: 4\n"
        f"store:\n  root: {tmp_path / 'store'}\n"
    )
    return tmp_path


def snd(project: Path, *args: str):
    result = CliRunner().invoke(app, [*args[:1], "--config", str(project / "pipeline.yaml"), *args[1:]])
    return result


def plain(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def test_help_lists_the_registered_commands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    listed = set(re.findall(r"│ ([a-z][a-z-]+) ", result.output))
    assert REGISTERED <= listed


def test_pipeline_runs_skips_and_reports_changes(project):
    assert snd(project, "sample-views").exit_code == 0
    first = snd(project, "precompute-gaussians")
    assert first.exit_code == 0, first.output
    assert "wrote" in first.output
    masks = snd(project, "precompute-masks")
    assert masks.exit_code == 0, masks.output
    again = snd(project, "precompute-gaussians")
    assert "up to date, nothing to do" in plain(again.output)
    changed = snd(project, "precompute-gaussians", "--set", "gaussians.depth.footprint_scale=1.0")
    assert changed.exit_code == 0
    assert "params.depth.footprint_scale: 0.7 -> 1.0" in plain(changed.output)
    store = Store(project / "store")
    assert len(store.complete_artifacts("gaussians")) == 2
    forced = snd(project, "precompute-masks", "--force")
    assert forced.exit_code == 0 and "wrote" in forced.output


def test_shards_share_one_store_and_the_last_one_publishes(project):
    assert snd(project, "sample-views").exit_code == 0
    first = snd(project, "precompute-masks", "--set", "masks.source=slic", "--shard", "0/2")
    assert first.exit_code == 0, first.output
    # The fixture's single scene is one unit: shard 0 owns it, so it also publishes.
    assert "wrote" in first.output
    second = snd(project, "precompute-masks", "--set", "masks.source=slic", "--shard", "1/2")
    assert "up to date" in plain(second.output)


def test_user_errors_are_one_line_without_traceback(project):
    result = snd(project, "sample-views", "--set", "sampling.frame_gapp=[2,3]")
    assert result.exit_code == 1
    assert "unknown key 'sampling.frame_gapp'" in plain(result.output)
    assert "Traceback" not in result.output
    missing = snd(project, "precompute-gaussians")
    assert missing.exit_code == 1
    assert "run the stage that produces 'samples' first" in plain(missing.output)
    wrong_section = snd(project, "sample-views", "--set", "masks.source=slic")
    assert wrong_section.exit_code == 1 and "reads only the sections" in plain(wrong_section.output)
    bad_shard = snd(project, "precompute-masks", "--shard", "2/2")
    assert bad_shard.exit_code == 1 and "--shard" in plain(bad_shard.output)


def test_debug_shows_the_exception(project):
    result = CliRunner().invoke(
        app, ["--debug", "sample-views", "--config", str(project / "pipeline.yaml"), "--set", "sampling.seed=x"]
    )
    assert result.exit_code != 0
    assert isinstance(result.exception, ConfigError)


def test_run_dir_prints_where_train_puts_this_configurations_run(project):
    from snd_stages.pipeline import load_config
    from snd_stages.artifacts.runs import run_directory

    for stage in ("sample-views", "precompute-gaussians", "precompute-masks"):
        assert snd(project, stage).exit_code == 0
    printed = snd(project, "run-dir")
    assert printed.exit_code == 0, printed.output
    cfg = load_config(project / "pipeline.yaml")
    expected = run_directory(cfg.data, cfg.sampling, cfg.gaussians, cfg.masks, cfg.train, Store(cfg.store.root))
    assert printed.output.strip() == str(expected)
    ablation = snd(project, "run-dir", "--set", "train.blending=1.0").output.strip()
    assert ablation != str(expected) and Path(ablation).parent == expected.parent
    on_gpu = snd(project, "run-dir", "--set", "train.device=cuda").output.strip()
    assert on_gpu == str(expected)  # the device is not part of a run


def test_an_unknown_profile_is_one_line_naming_the_profiles(project):
    result = CliRunner().invoke(app, ["--profile", "huge", "sample-views", "--config", str(project / "pipeline.yaml")])
    assert result.exit_code == 1
    assert "profile 'huge' is not defined" in plain(result.output) and "Traceback" not in result.output
