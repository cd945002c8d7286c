"""Hostile input beyond the dataset cases of ``test_bad_input``: each is one clear line (what, where, the fix), exit
code 1, no traceback, and nothing that was good is lost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_bad_input import assert_one_line_error, precompute
from tests.test_cli import project, snd  # noqa: F401  (project is a fixture)


# ---------------------------------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("sampling.seed=-1", ["--set sampling.seed=-1:", "sampling.seed = -1", "[0, 2**32)"]),
        ("train.seed=1180591620717411303424", ["--set train.seed=", "train.seed", "[0, 2**32)"]),
        ("masks.felzenszwalb.sigma=-1", ["masks.felzenszwalb.sigma = -1.0", "a number >= 0"]),
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
    (run,) = [path for path in (project / "runs").iterdir() if path.is_dir()]
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


# ---------------------------------------------------------------------------------------------------------------
# Dataset files read as meant, or refused


SCENE = "scannetpp/scenes/0a5c013435"


def edit(project: Path, change) -> None:
    path = project / SCENE / "transforms_train.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("corrupt", "fragments"),
    [
        (lambda meta: meta["frames"][2].update(file_path=meta["frames"][1]["file_path"]),
         ["frames[2]", "is listed twice (also frames[1])", "list each frame once"]),
        (lambda meta: meta["frames"][1].update(file_path="/etc/passwd"), ["frames[1]", "leaves the scene's images/"]),
        (lambda meta: meta["frames"][1].update(file_path="../other/DSC0001.JPG"), ["leaves the scene's images/"]),
        (lambda meta: meta["frames"][1].update(is_bad="false"),
         ["frames[1]", "is_bad = 'false' must be true or false"]),
        (lambda meta: meta.update(k1="abc"), ["distortion coefficient k1 = 'abc' is not a number"]),
        (lambda meta: meta.update(fl_x=1e30), ["fl_x = 1e+30 px gives a field of view of", "expected 1 to 179"]),
        (lambda meta: meta.update(fl_y=1e-3), ["fl_y = 0.001 px", "expected 1 to 179"]),
    ],
    ids=["duplicate frame", "absolute path", "path up and out", "is_bad a string", "distortion not a number",
         "focal length 1e30", "focal length 1e-3"],
)
def test_transforms_that_cannot_be_right(project, corrupt, fragments):  # noqa: F811
    edit(project, corrupt)
    assert_one_line_error(snd(project, "sample-views"), "transforms_train.json", *fragments)


def test_transforms_that_are_not_utf8(project):  # noqa: F811
    path = project / SCENE / "transforms_train.json"
    path.write_bytes(path.read_bytes().replace(b'"frames"', b'"fr\xffames"'))
    assert_one_line_error(snd(project, "sample-views"), str(path), "is not UTF-8 text", "save it as UTF-8")


def test_depth_saturated_everywhere_is_refused(project):  # noqa: F811
    from PIL import Image
    import numpy as np

    for path in sorted((project / SCENE / "depth").iterdir()):
        Image.fromarray(np.full((30, 44), 65535, np.uint16)).save(path)
    assert snd(project, "sample-views").exit_code == 0
    assert_one_line_error(snd(project, "precompute-gaussians"), "depth/DSC0", "every depth pixel is 65535 mm")


def test_a_16_bit_grey_image_is_read_as_its_high_byte_not_white(tmp_path):
    from PIL import Image
    import numpy as np

    from snd_stages.scenes.layout import _open_image

    grey = np.random.default_rng(0).integers(0, 65536, (6, 7)).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    image = _open_image(tmp_path / "grey16.png", "RGB")
    assert image.dtype == np.uint8 and image.shape == (6, 7, 3)
    np.testing.assert_array_equal(image, np.repeat((grey >> 8).astype(np.uint8)[..., None], 3, axis=-1))


def test_an_unreadable_image_says_permission_denied(tmp_path, monkeypatch):
    from snd_stages.errors import DataError
    from snd_stages.scenes import layout

    path = tmp_path / "image.png"
    path.write_bytes(b"")

    def denied(*args, **kwargs):  # what open() raises for a file without read permission (root reads any file)
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(layout.Image, "open", denied)
    with pytest.raises(DataError, match="permission denied .*chmod \\+r"):
        layout._open_image(path, "RGB")


def test_a_nyuv2_file_whose_images_are_a_group(tmp_path):
    import h5py

    from snd_stages.errors import DataError
    from snd_stages.scenes.nyuv2 import NYUv2Labeled
    from tests.test_nyuv2 import write_labeled_mat

    path = write_labeled_mat(tmp_path / "nyu.mat", include=("depths", "rawDepths", "labels"))
    with h5py.File(path, "r+") as file:
        file.create_group("images")
    with pytest.raises(DataError, match="'images' is an HDF5 group, not an array"):
        NYUv2Labeled(path)


# ---------------------------------------------------------------------------------------------------------------
# Several machines: the same store, the dataset at another path


def test_a_moved_dataset_is_found_where_data_root_points(project):  # noqa: F811
    import shutil

    precompute(project)
    moved = project / "elsewhere" / "scannetpp"
    shutil.copytree(project / "scannetpp", moved)  # copy2 keeps modification times, as rsync -a does
    shutil.rmtree(project / "scannetpp")  # nothing may be read from the old place
    again = snd(project, "sample-views", "--set", f"data.root={moved}")
    assert again.exit_code == 0 and "up to date" in again.output, again.output
    for command in ("precompute-gaussians", "precompute-masks"):
        result = snd(project, command, "--set", f"data.root={moved}", "--force")
        assert result.exit_code == 0, result.output
    geometry = snd(project, "check-geometry", "--set", f"data.root={moved}", "--out", str(project / "pictures"))
    assert geometry.exit_code == 0, geometry.output


# ---------------------------------------------------------------------------------------------------------------
# Weight values


@pytest.mark.parametrize(
    ("spoil", "fragments"),
    [
        (lambda tensors: tensors["blocks.3.attn.qkv.weight"].view(-1).__setitem__(7, float("nan")),
         ["1 tensors hold NaN or infinite values", "blocks.3.attn.qkv.weight", "use an intact one"]),
        (lambda tensors: tensors.update({key: value.to(torch.int32) for key, value in tensors.items()}),
         ["tensors are not floating point", "torch.int32", "use the original checkpoint"]),
    ],
    ids=["a NaN", "cast to int32"],
)
def test_weights_that_are_not_finite_floats_are_refused(project, spoil, fragments):  # noqa: F811
    import safetensors.torch

    from tests.test_weights import timm_model

    tensors = {key: value.clone() for key, value in timm_model("dinov2_vits14").state_dict().items()}
    spoil(tensors)
    weights = project / "weights.safetensors"
    safetensors.torch.save_file(tensors, weights)
    precompute(project)
    assert snd(project, "precompute-operators").exit_code == 0
    with open(project / "pipeline.yaml", "a") as handle:
        handle.write(f"train:\n  runs_root: {project / 'runs'}\n  weights: {weights}\n")
    assert_one_line_error(snd(project, "train"), str(weights), *fragments)


# ---------------------------------------------------------------------------------------------------------------
# Messages that say what is true


@pytest.mark.parametrize(("target", "fragments", "absent"),
                         [("/etc/passwd", ["/etc/passwd is truncated or not a training checkpoint",
                                           "--resume takes a checkpoint that snd train wrote"], "delete"),
                          ("folder", ["is a folder", "--resume auto"], "does not exist")])
def test_resume_from_something_that_is_not_a_checkpoint(project, target, fragments, absent):  # noqa: F811
    precompute(project)
    assert snd(project, "precompute-operators").exit_code == 0
    with open(project / "pipeline.yaml", "a") as handle:
        handle.write(f"train:\n  runs_root: {project / 'runs'}\n  weights: random\n  allow_random_weights: true\n"
                     "  steps: 1\n  batch_size: 1\n  prototypes: 64\n")
    if target == "folder":
        target = str(project / "runs")
        (project / "runs").mkdir()
    line = assert_one_line_error(snd(project, "train", "--resume", target), *fragments)
    assert absent not in line.split("error:", 1)[1]


# ---------------------------------------------------------------------------------------------------------------
# Two identical commands at once


def test_a_second_identical_precompute_is_refused_and_harms_nothing(project):  # noqa: F811
    from snd_stages.pipeline import load_config
    from snd_stages.artifacts.gaussians import gaussians_spec
    from snd_stages.artifacts.samples import load_samples
    from snd_stages.store import Store

    assert snd(project, "sample-views").exit_code == 0
    cfg = load_config(project / "pipeline.yaml")
    store = Store(cfg.store.root)
    spec = gaussians_spec(cfg.gaussians, load_samples(store, cfg.data, cfg.sampling)[0].key)
    with store.writing(spec):  # as the first command holds it while it writes
        assert_one_line_error(snd(project, "precompute-gaussians"), "another snd precompute-gaussians command is "
                              f"writing gaussians/{spec.key}", "wait for it to finish")
        assert_one_line_error(snd(project, "precompute-gaussians", "--shard", "1/2"), "is writing")
    with store.writing(spec, (0, 2)):  # shards of one artifact run side by side; the same shard twice does not
        assert_one_line_error(snd(project, "precompute-gaussians", "--shard", "0/2"), "(shard 0/2)")
        assert_one_line_error(snd(project, "precompute-gaussians"), "is writing")
        assert snd(project, "precompute-gaussians", "--shard", "1/2").exit_code == 0
    assert snd(project, "precompute-gaussians", "--shard", "0/2").exit_code == 0  # released: it publishes
    assert store.exists(spec) and not list((project / "store" / "gaussians").glob("*.partial"))


@pytest.mark.filterwarnings("ignore:random weights")
def test_a_second_identical_training_is_refused(project):  # noqa: F811
    from snd_stages.artifacts.runs import training_lock

    run = trained_run(project)
    (run / "manifest.json").unlink()  # as if still training
    with training_lock(run):
        assert_one_line_error(snd(project, "train"), f"another snd train is training run {run}", "wait for it")


# ---------------------------------------------------------------------------------------------------------------
# Sizes and counts that cannot work


def test_a_batch_larger_than_the_samples_is_refused_before_any_work(project):  # noqa: F811
    precompute(project)
    assert snd(project, "precompute-operators").exit_code == 0
    with open(project / "pipeline.yaml", "a") as handle:
        handle.write(f"train:\n  runs_root: {project / 'runs'}\n  weights: random\n  allow_random_weights: true\n")
    assert_one_line_error(snd(project, "train", "--set", "train.batch_size=1000000000"),
                          "train.batch_size = 1000000000 is more than the", "training samples")
    assert not any(path.is_dir() for path in (project / "runs").glob("*"))  # no run was started


def test_check_geometry_of_no_pairs_is_refused(project):  # noqa: F811
    precompute(project)
    assert_one_line_error(snd(project, "check-geometry", "--pairs", "0"), "--pairs 0", "at least 1")


def test_a_stage_that_fails_before_its_first_unit_leaves_no_partial_directory(project):  # noqa: F811
    for path in sorted((project / SCENE / "instance_segmentation").iterdir()):
        path.unlink()
    assert snd(project, "sample-views").exit_code == 0
    assert snd(project, "precompute-masks").exit_code == 1
    assert not list((project / "store" / "masks").glob("*.partial"))


def test_a_dataset_root_that_is_a_file_is_not_called_missing(project):  # noqa: F811
    root = project / "a-file"
    root.write_text("")
    line = assert_one_line_error(snd(project, "sample-views", "--set", f"data.root={root}"),
                                 "is a file, not a folder")
    assert "does not exist" not in line


def test_an_empty_split_is_called_empty(project):  # noqa: F811
    split = project / "scannetpp" / "metadata" / "nvs_sem_train.txt"
    split.parent.mkdir(parents=True, exist_ok=True)
    split.write_text("\n")
    line = assert_one_line_error(snd(project, "sample-views", "--set", "sampling.split=train"), str(split),
                                 "lists no scenes", "the 'train' split is empty")
    assert "no scenes found" not in line
