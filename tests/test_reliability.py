"""Hostile input beyond the dataset cases of ``test_bad_input``: each is one clear line (what, where, the fix), exit
code 1, no traceback, and nothing that was good is lost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_bad_input import assert_one_line_error, precompute
from tests.test_cli import project, snd  # noqa: F401  (project is a fixture)


# ---------------------------------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("sampling.seed=-1", ["--set sampling.seed=-1:", "sampling.seed = -1", "[0, 2**32)"]),
        ("train.seed=1180591620717411303424", ["--set train.seed=", "train.seed", "[0, 2**32)"]),
        ("masks.felzenszwalb_sigma=-1", ["masks.felzenszwalb_sigma = -1.0", "a number >= 0"]),
        ("train.lora_alpha=-2", ["train.lora_alpha = -2.0", "a positive number"]),
        ("sampling.samples_per_scene=1000000000", ["sampling.samples_per_scene = 1000000000", "[1, 100,000]"]),
        ("eval.seeds=[0,-3]", ["eval.seeds = -3", "[0, 2**32)"]),
    ],
)
def test_values_out_of_range_are_refused_before_any_work(project, override, fragments):  # noqa: F811
    section = override.split(".", 1)[0]
    command = {"sampling": "sample-views", "masks": "precompute-masks", "train": "train", "eval": "eval"}[section]
    assert_one_line_error(snd(project, command, "--set", override), *fragments)
    assert not (project / "store").exists()


def test_a_value_from_the_file_is_attributed_to_the_file(project):  # noqa: F811
    config = project / "pipeline.yaml"
    config.write_text(config.read_text().replace("samples_per_scene: 4", "samples_per_scene: 0"))
    assert_one_line_error(snd(project, "sample-views"), f"{config}: sampling.samples_per_scene = 0")


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        (b"sampling:\n  seed: 1\n  seed: 2\n", ["is not valid YAML (line 3, column 3)", "'seed' is given twice"]),
        (b"sampling:\n  seed: \xff\n", ["is not UTF-8 text", "save it as UTF-8"]),
        (b"sampling:\n  seed: [1\n", ["is not valid YAML (line 3"]),
    ],
    ids=["duplicate key", "not UTF-8", "unclosed list"],
)
def test_a_config_file_that_cannot_be_read_as_meant(tmp_path, text, fragments):
    config = tmp_path / "pipeline.yaml"
    config.write_bytes(text)
    assert_one_line_error(snd(tmp_path, "sample-views"), str(config), *fragments)


def test_a_config_path_that_is_a_folder(tmp_path):
    (tmp_path / "pipeline.yaml").mkdir()
    assert_one_line_error(snd(tmp_path, "sample-views"), "is a folder", "pass --config")


# ---------------------------------------------------------------------------------------------------------------
# Manifests


@pytest.mark.parametrize("damaged", ["[]", '{"complete": true, "created": "yesterday"}', "\udcff"],
                         ids=["a list", "non-numeric created", "not UTF-8"])
def test_a_damaged_old_manifest_blocks_no_new_artifact(project, damaged):  # noqa: F811
    assert snd(project, "sample-views").exit_code == 0
    (old,) = (project / "store" / "samples").glob("*/manifest.json")
    old.write_bytes(damaged.encode("utf-8", "surrogateescape"))
    result = snd(project, "sample-views", "--set", "sampling.seed=5")  # a new artifact of the same stage
    assert result.exit_code == 0, result.output
    # and the damaged one, when a stage needs it, is one line naming it
    assert_one_line_error(snd(project, "precompute-gaussians"), str(old.parent), "snd sample-views")


def trained_run(project: Path) -> Path:
    precompute(project)
    with open(project / "pipeline.yaml", "a") as handle:
        handle.write(f"train:\n  runs_root: {project / 'runs'}\n  weights: random\n  allow_random_weights: true\n"
                     "  steps: 1\n  batch_size: 1\n  prototypes: 64\n")
    for command in ("precompute-operators", "train"):
        result = snd(project, command)
        assert result.exit_code == 0, result.output
    (run,) = (project / "runs").iterdir()
    return run


@pytest.mark.filterwarnings("ignore:random weights")
@pytest.mark.parametrize(
    ("damage", "fragments"),
    [
        (lambda run: (run / "manifest.json").write_text("{"), ["manifest.json is damaged"]),
        (lambda run: (run / "manifest.json").write_text(json.dumps(
            {k: v for k, v in json.loads((run / "manifest.json").read_text()).items() if k != "files"})),
         ["written by an older snd"]),
        (lambda run: (run / "student.safetensors").unlink(), ["student.safetensors is missing"]),
        (lambda run: (run / "teacher.safetensors").write_bytes(b"x" * 10), ["teacher.safetensors is truncated"]),
    ],
    ids=["corrupt manifest", "manifest without records", "student deleted", "teacher truncated"],
)
def test_a_damaged_run_is_neither_up_to_date_nor_probed(project, damage, fragments):  # noqa: F811
    run = trained_run(project)
    damage(run)
    assert_one_line_error(snd(project, "train"), str(run), *fragments, "snd train --force")
    assert_one_line_error(snd(project, "eval", "--set", f"eval.runs=[{run}]"), *fragments)
    retrained = snd(project, "train", "--force")
    assert retrained.exit_code == 0, retrained.output
    assert (run / "student.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------------------
# The last guard


def test_an_unexpected_exception_is_one_line_that_says_it_is_a_bug(project, monkeypatch):  # noqa: F811
    from snd_stages.stages import sample_views

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(sample_views, "sample_views", broken)
    assert_one_line_error(snd(project, "sample-views"), "unexpected ZeroDivisionError: division by zero",
                          "a bug in snd", "snd --debug")
    from typer.testing import CliRunner

    from snd_stages.cli import app
    debug = CliRunner().invoke(app, ["--debug", "sample-views", "--config", str(project / "pipeline.yaml")])
    assert isinstance(debug.exception, ZeroDivisionError)
