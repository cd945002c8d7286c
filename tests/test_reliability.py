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
