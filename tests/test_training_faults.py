"""Faults during ``snd train``: a non-finite loss, a full disk while checkpointing, a damaged checkpoint.

Each stops the run with one line that names what happened and what to do, keeps the last good checkpoint, and
rerunning after the fault is fixed lands on the weights of a run that never failed. Faults are injected at the
boundary only: the loss function the training step calls (``snd_stages.stages.train.prototype_cross_entropy``) and
``torch.save``.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from snd_stages.cli import app
from snd_stages.config import dump_yaml
from snd_stages.stages import train as train_module
from snd_stages.artifacts.runs import checkpoint_path, latest_checkpoint
from tests import test_train
from tests.test_bad_input import assert_one_line_error
from tests.test_train import config, run

pytestmark = pytest.mark.slow
project = test_train.project  # fixture: tiny demo data and every input of a training run
SETTINGS = ("train.steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=2")


@pytest.fixture(scope="module")
def straight(project):
    """Exported weights of the run without faults."""
    result = run(project, *SETTINGS, f"train.runs_root={project / 'runs-straight-faults'}")
    return {name: load_file(result.run_dir / name) for name in ("student.safetensors", "teacher.safetensors")}


def train_cli(project: Path, runs_root: Path):
    """``snd train`` in process, so that a fault injected with monkeypatch reaches it."""
    path = runs_root.parent / f"{runs_root.name}.yaml"
    path.write_text(dump_yaml(config(project, *SETTINGS, f"train.runs_root={runs_root}")))
    return CliRunner().invoke(app, ["train", "--config", str(path)])


def run_dir_of(runs_root: Path) -> Path:
    (run_dir,) = [path for path in runs_root.iterdir() if path.is_dir()]
    return run_dir


def assert_finishes_like_straight(project, runs_root: Path, straight, start_step: int) -> None:
    result = run(project, *SETTINGS, f"train.runs_root={runs_root}")
    assert result.start_step == start_step and not result.skipped
    for name, expected in straight.items():
        exported = load_file(result.run_dir / name)
        for key in expected:
            torch.testing.assert_close(exported[key], expected[key], rtol=0, atol=0)


def test_non_finite_loss_stops_with_the_step_and_samples_and_keeps_the_last_checkpoint(
    project, straight, tmp_path, monkeypatch
):
    real_loss, calls = train_module.prototype_cross_entropy, []

    def loss_that_overflows_in_step_3(*args, **kwargs):
        calls.append(1)
        loss, entropy = real_loss(*args, **kwargs)
        return (loss * float("inf") if len(calls) == 3 else loss), entropy

    monkeypatch.setattr(train_module, "prototype_cross_entropy", loss_that_overflows_in_step_3)
    runs_root = tmp_path / "runs"
    result = train_cli(project, runs_root)
    run_dir = run_dir_of(runs_root)
    kept = checkpoint_path(run_dir, 2)
    assert_one_line_error(result, "loss is inf in step 3 of 3", "samples #", "demo0000, context [", "targets [",
                          f"the last good checkpoint {kept} is kept", "train.learning_rate")
    assert latest_checkpoint(run_dir) == kept and not (run_dir / "manifest.json").exists()
    assert not checkpoint_path(run_dir, 3).exists()

    monkeypatch.setattr(train_module, "prototype_cross_entropy", real_loss)
    assert_finishes_like_straight(project, runs_root, straight, start_step=2)


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(project, straight, tmp_path,
                                                                     monkeypatch):
    real_save, saves = torch.save, []

    def save_on_a_disk_that_fills_up(state, target, *args, **kwargs):
        saves.append(target)
        if len(saves) == 2:
            Path(target).write_bytes(b"the first bytes of a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(state, target, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_on_a_disk_that_fills_up)
    runs_root = tmp_path / "runs"
    result = train_cli(project, runs_root)
    run_dir = run_dir_of(runs_root)
    assert_one_line_error(result, f"cannot write checkpoint {checkpoint_path(run_dir, 2)}", "No space left on device",
                          "the previous checkpoint step-000001.pt is intact", "free space")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000001.pt"]  # temporary removed

    monkeypatch.setattr(torch, "save", real_save)
    assert_finishes_like_straight(project, runs_root, straight, start_step=1)


def test_damaged_checkpoint_is_an_error_that_names_the_one_to_fall_back_to(project, straight, tmp_path):
    runs_root = tmp_path / "runs"
    finished = run(project, *SETTINGS, f"train.runs_root={runs_root}")
    (finished.run_dir / "manifest.json").unlink()  # as if the run had stopped after its last checkpoint
    damaged = checkpoint_path(finished.run_dir, 3)
    damaged.write_bytes(damaged.read_bytes()[:1000])  # cut short, as by a failing disk or an interrupted copy

    result = train_cli(project, runs_root)
    assert_one_line_error(result, f"checkpoint {damaged} is truncated or not a training checkpoint",
                          "delete it and rerun", "continues from step-000002.pt")
    damaged.write_bytes(b"garbage" * 100)
    assert_one_line_error(train_cli(project, runs_root), str(damaged), "truncated or not a training checkpoint")

    damaged.unlink()
    assert_finishes_like_straight(project, runs_root, straight, start_step=2)
