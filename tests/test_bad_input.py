"""Bad input through the command line: one clear line (file, key or value, and the fix), exit code 1, no traceback.

Each case corrupts one thing in the ScanNet++-format fixture project of ``test_cli`` and runs the first command
that reads it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from snd_stages.cli import app
from snd_stages.errors import DataError
from tests import test_cli
from tests.test_cli import snd
from tests.test_weights import timm_model

project = test_cli.project  # fixture: the ScanNet++-format fixture scene, pipeline.yaml and a store
SCENE = "scenes/0a5c013435"


def assert_one_line_error(result, *fragments: str) -> str:
    """The command failed with exactly one ``error:`` line holding every fragment, and no traceback."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    following = result.output.split(errors[0], 1)[1].strip()
    assert not following, f"the error continues on other lines: {following!r}"
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def scene_files(project: Path, folder: str, keep_first: bool = False) -> list[Path]:
    files = sorted((project / "scannetpp" / SCENE / folder).iterdir())
    return files[1:] if keep_first else files


def edit_transforms(project: Path, change: Callable[[dict], None]) -> None:
    path = project / "scannetpp" / SCENE / "transforms_train.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def with_train_section(project: Path, *lines: str) -> None:
    """Let ``snd train`` run in the project (its run directory under the project, never in the repository)."""
    text = "\n".join(["train:", f"  runs_root: {project / 'runs'}", *(f"  {line}" for line in lines)])
    with open(project / "pipeline.yaml", "a") as handle:
        handle.write(text + "\n")


def precompute(project: Path) -> None:
    for command in ("sample-views", "precompute-gaussians", "precompute-masks"):
        result = snd(project, command)
        assert result.exit_code == 0, result.output


# ---------------------------------------------------------------------------------------------------------------
# Dataset files


def remove_images(project):
    for path in scene_files(project, "images", keep_first=True):
        path.unlink()


def truncate_images(project):
    for path in scene_files(project, "images", keep_first=True):
        path.write_bytes(path.read_bytes()[:200])


def shrink_depth(project):
    for path in scene_files(project, "depth"):
        Image.fromarray(np.full((10, 10), 2000, np.uint16)).save(path)


def zero_depth(project):
    for path in scene_files(project, "depth"):
        Image.fromarray(np.zeros((30, 44), np.uint16)).save(path)


def empty_masks(project):
    for path in scene_files(project, "instance_segmentation"):
        Image.fromarray(np.zeros((30, 44), np.uint16)).save(path)


def remove_masks(project):
    for path in scene_files(project, "instance_segmentation"):
        path.unlink()


def nan_pose(project):
    edit_transforms(project, lambda meta: meta["frames"][0]["transform_matrix"][0].__setitem__(3, float("nan")))


def inf_pose(project):
    edit_transforms(project, lambda meta: meta["frames"][2]["transform_matrix"][1].__setitem__(1, float("inf")))


def scaled_pose(project):
    def change(meta):
        pose = np.asarray(meta["frames"][1]["transform_matrix"])
        pose[:3, :3] *= 2.0
        meta["frames"][1]["transform_matrix"] = pose.tolist()

    edit_transforms(project, change)


def full_size_intrinsics(project):
    edit_transforms(project, lambda meta: meta.update(w=88, h=60))


def shifted_principal_point(project):
    edit_transforms(project, lambda meta: [meta.pop("w"), meta.pop("h"), meta.update(cx=46.2, cy=29.2)])


@pytest.mark.parametrize(
    ("corrupt", "command", "fragments"),
    [
        # the depth Gaussians never decode colours: re-rendering them from the Gaussians does
        (remove_images, "check-geometry", ["missing file", "images/DSC0000", "restore it"]),
        (truncate_images, "check-geometry", ["cannot read image", "images/DSC0000", "replace it"]),
        (shrink_depth, "precompute-gaussians", ["depth/DSC0000", "depth is 10x10", "30x44", "regenerate"]),
        (zero_depth, "precompute-gaussians", ["DSC0000", "no valid depth"]),
        (empty_masks, "precompute-masks", ["instance_segmentation/DSC0000", "no labelled pixel", "masks.source"]),
        (remove_masks, "precompute-masks", ["missing file", "instance_segmentation/DSC0000", "masks.source"]),
        (nan_pose, "sample-views", ["frames[0]", "transform_matrix", "NaN or inf", "correct the pose"]),
        (inf_pose, "sample-views", ["frames[2]", "transform_matrix", "NaN or inf", "correct the pose"]),
        (scaled_pose, "sample-views", ["frames[1]", "not rigid", "no scale or shear", "correct the pose"]),
        (full_size_intrinsics, "sample-views", ["transforms_train.json", "88x60", "44x30", "do not match"]),
        (shifted_principal_point, "sample-views", ["frames[0]", "principal point", "another image size"]),
    ],
    ids=lambda value: value.__name__ if callable(value) else None,
)
def test_bad_dataset_files_stop_with_one_line(project, corrupt, command, fragments):
    corrupt(project)
    before = {"sample-views": [], "check-geometry": ["sample-views", "precompute-gaussians"]}.get(command, ["sample-views"])
    for earlier in before:
        assert snd(project, earlier).exit_code == 0, earlier
    assert_one_line_error(snd(project, command), *fragments)


def test_dataset_root_in_another_layout_names_the_expected_one(project, tmp_path):
    raw = tmp_path / "scannetpp-raw"
    (raw / "data" / "0a5c013435" / "dslr").mkdir(parents=True)  # the download's layout, not FiT3D's prepared one
    result = snd(project, "sample-views", "--set", f"data.root={raw}")
    assert_one_line_error(result, str(raw), "no scenes/ folder", "expected the ScanNet++ layout",
                          "scenes/<scene_id>/transforms_train.json")
    absent = snd(project, "sample-views", "--set", f"data.root={tmp_path / 'absent'}")
    assert_one_line_error(absent, "does not exist", "data.root", "snd make-demo-data")


def test_a_failing_file_system_is_one_line_too(project):
    blocker = project / "not-a-folder"
    blocker.write_text("")
    result = snd(project, "sample-views", "--set", f"store.root={blocker / 'store'}")
    assert_one_line_error(result, "Not a directory", str(blocker), "rerun the same command")


def test_debug_shows_the_traceback_of_a_data_error(project):
    remove_images(project)
    for earlier in ("sample-views", "precompute-gaussians"):
        assert snd(project, earlier).exit_code == 0
    result = CliRunner().invoke(app, ["--debug", "check-geometry", "--config", str(project / "pipeline.yaml")])
    assert result.exit_code != 0 and isinstance(result.exception, DataError)


# ---------------------------------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize(
    ("command", "override", "fragments"),
    [
        ("precompute-gaussians", "gaussians.reconstructor=splatt3r", ["gaussians.reconstructor", "'splatt3r'",
                                                                     "choose one of", "'depth'"]),
        ("precompute-masks", "masks.source=sam2", ["masks.source", "'sam2'", "choose one of", "felzenszwalb"]),
        ("sample-views", "sampling.frame_gapp=[2,3]", ["unknown key 'sampling.frame_gapp'",
                                                      "did you mean 'sampling.frame_gap'"]),
        ("sample-views", "sampling.seed=three", ["sampling.seed", "'three'", "must be an integer"]),
        ("sample-views", "sampling.frame_gap=[5,2]", ["sampling.frame_gap", "[5, 2]", "[min, max] with 1 <= min"]),
    ],
)
def test_bad_overrides_stop_with_one_line(project, command, override, fragments):
    assert snd(project, "sample-views").exit_code == 0
    assert_one_line_error(snd(project, command, "--set", override), *fragments)


def test_bad_keys_and_values_in_the_config_file(project):
    config = project / "pipeline.yaml"
    original = config.read_text()
    config.write_text(original + "trian:\n  steps: 3\n")
    assert_one_line_error(snd(project, "sample-views"), str(config), "unknown key 'trian'", "did you mean 'train'")
    config.write_text(original.replace("samples_per_scene: 4", "samples_per_scene: four"))
    assert_one_line_error(snd(project, "sample-views"), "sampling.samples_per_scene", "'four'", "integer")


# ---------------------------------------------------------------------------------------------------------------
# Weights and artifacts


def vitb_checkpoint(path: Path) -> Path:
    """A ViT-B/14 state dict with every tensor a broadcast zero: right names and shapes, a few kilobytes."""
    with torch.device("meta"):
        shapes = {key: value.shape for key, value in timm_model("dinov2_vitb14").state_dict().items()}
    torch.save({key: torch.zeros(()).expand(shape) for key, shape in shapes.items()}, path)
    return path


def garbage_checkpoint(path: Path) -> Path:
    path.write_bytes(os.urandom(4096))
    return path


def headless_checkpoint(path: Path) -> Path:
    torch.save({"classifier.weight": torch.zeros(10, 384), "classifier.bias": torch.zeros(10)}, path)
    return path


@pytest.mark.parametrize(
    ("write", "fragments"),
    [
        (vitb_checkpoint, ["strictly", "shape mismatches", "ViT-B/14", "set model to dinov2_vitb14 (train.backbone)"]),
        (garbage_checkpoint, ["is not a torch checkpoint", "truncated", "save it again"]),
        (headless_checkpoint, ["holds no ViT backbone", "classifier.weight", "Expected a timm"]),
    ],
    ids=["vitb_for_vits", "garbage", "wrong_keys"],
)
def test_weights_that_do_not_fit_the_backbone(project, write, fragments):
    precompute(project)
    weights = write(project / "weights.pth")
    with_train_section(project, "backbone: dinov2_vits14", f"weights: {weights}")
    assert_one_line_error(snd(project, "train"), str(weights), *fragments)


def test_artifact_of_another_schema_version_is_refused(project):
    assert snd(project, "sample-views").exit_code == 0
    (manifest,) = (project / "store" / "samples").glob("*/manifest.json")
    document = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**document, "schema_version": 0}))
    for command in ("precompute-gaussians", "sample-views"):
        assert_one_line_error(snd(project, command), str(manifest.parent), "schema version 0",
                              "reads version 1", "snd sample-views --force")
    assert snd(project, "sample-views", "--force").exit_code == 0
    assert snd(project, "precompute-gaussians").exit_code == 0
