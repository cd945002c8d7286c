"""The whole pipeline on small generated demo scenes: data -> samples -> Gaussians + masks, checked by geometry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from snd_stages.pipeline import load_config
from snd_stages.geometry import Camera
from snd_stages.scenes.layout import read_scene
from snd_stages.stages.check_geometry import check_geometry, psnr_where_covered, render_source_colours
from snd_stages.artifacts.gaussians import load_gaussians, read_pair
from snd_stages.artifacts.masks import load_masks
from snd_stages.artifacts.samples import load_samples
from tests.conftest import build_demo_artifacts, tree_digest

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "demo.train_scenes=1", "demo.eval_scenes=1", "demo.frames_per_scene=10", "demo.height=60", "demo.width=80",
    "sampling.samples_per_scene=3", "sampling.frame_gap=[3,5]",
]


def tiny_config(root: Path, *extra: str):
    return load_config(None, [*TINY, f"data.root={root / 'demo'}", f"store.root={root / 'store'}", *extra])


@pytest.fixture(scope="module")
def built(module_tmp_path):
    root = module_tmp_path / "pipeline"
    cfg = tiny_config(root)
    store = build_demo_artifacts(cfg, operators=False)
    return cfg, store


def test_demo_data_is_in_the_scannetpp_layout_with_held_out_scenes(built):
    cfg, _ = built
    root = cfg.data.root
    assert (root / "metadata" / "nvs_sem_train.txt").read_text().split() == ["demo0000"]
    assert (root / "metadata" / "nvs_sem_val.txt").read_text().split() == ["demo0001"]
    scene = read_scene(root, "demo0001")
    assert len(scene) == 10 and (scene.camera.height, scene.camera.width) == (60, 80)
    assert scene.load_depth(0).min() > 0.1 and len(np.unique(scene.load_semantics(0))) >= 3


def test_samples_use_only_training_scenes(built):
    cfg, store = built
    _, samples = load_samples(store, cfg.data, cfg.sampling)
    assert {s.scene for s in samples.samples} == {"demo0000"}
    assert all(3 <= s.context[1] - s.context[0] <= 5 for s in samples.samples)


def test_samples_of_changed_scene_files_are_not_read_and_the_error_says_why(tmp_path):
    from snd_stages.errors import ArtifactError
    from snd_stages.stages.make_demo_data import make_demo_data
    from snd_stages.stages.sample_views import sample_views
    from snd_stages.store import Store

    cfg = tiny_config(tmp_path)
    make_demo_data(cfg.data, cfg.demo)
    store = Store(cfg.store.root)
    sample_views(cfg.data, cfg.sampling, store)
    load_samples(store, cfg.data, cfg.sampling)
    image = sorted((cfg.data.root / "scenes" / "demo0000" / "images").iterdir())[0]
    os.utime(image, ns=(1_000_000_000, 1_000_000_000))  # same bytes, another time: as a careless copy leaves it
    with pytest.raises(ArtifactError, match=r"no artifact samples/.*other scene files: the scenes under .*demo "
                                            r"changed since snd sample-views ran"):
        load_samples(store, cfg.data, cfg.sampling)
    other_settings = tiny_config(tmp_path, "sampling.samples_per_scene=2")
    with pytest.raises(ArtifactError) as raised:  # other settings too: only the plain "run it first"
        load_samples(store, other_settings.data, other_settings.sampling)
    assert "other scene files" not in str(raised.value) and "snd sample-views" in str(raised.value)


def test_masks_cover_every_used_frame_with_gt_instances(built):
    cfg, store = built
    samples_artifact, samples = load_samples(store, cfg.data, cfg.sampling)
    artifact = load_masks(store, cfg.masks, samples_artifact.key)
    unit = artifact.unit("demo0000")
    used = sorted({p for s in samples.samples for p in (*s.context, *s.targets)})
    assert list(unit["positions"][:]) == used
    scene = read_scene(cfg.data.root, "demo0000")
    np.testing.assert_array_equal(unit["labels"][0], scene.load_instances(used[0]))
    assert unit.attrs["source"] == "gt"


def test_splatted_colours_reproduce_the_targets(built, tmp_path):
    cfg, store = built
    report = check_geometry(cfg.data, cfg.sampling, cfg.gaussians, store, max_pairs=3, out_dir=tmp_path)
    assert report.mean_coverage > 0.9
    assert report.mean_psnr > 22.0, report.checks
    assert len(report.pictures) == len({c.pair for c in report.checks}) and report.pictures[0].is_file()


def broken_conventions(camera: Camera) -> dict[str, Camera]:
    """The target cameras as a pipeline with a convention bug would see them."""
    w2c = camera.world_to_camera
    flipped = w2c.clone()
    flipped[:, 1] *= -1  # y axis up instead of down (OpenGL leaking in)
    flipped[:, 2] *= -1
    transposed = w2c.clone()
    transposed[:, :3, :3] = w2c[:, :3, :3].transpose(-1, -2)  # camera-to-world rotation used as world-to-camera
    centred = camera.intrinsics.clone()
    centred[:, 0, 2], centred[:, 1, 2] = camera.width / 2, camera.height / 2 - 3  # principal point ignored
    return {
        "flipped axes": Camera(camera.intrinsics, flipped, camera.height, camera.width),
        "transposed rotation": Camera(camera.intrinsics, transposed, camera.height, camera.width),
        "shifted principal point": Camera(centred, w2c, camera.height, camera.width),
    }


def test_a_wrong_convention_would_fail_the_geometry_check(built):
    cfg, store = built
    samples_artifact, samples = load_samples(store, cfg.data, cfg.sampling)
    artifact = load_gaussians(store, cfg.gaussians, samples_artifact.key)
    pair = read_pair(artifact.unit(artifact.units()[0]))
    scene = read_scene(cfg.data.root, pair.scene)
    images = [torch.from_numpy(scene.load_image(p)).permute(2, 0, 1).float() / 255 for p in pair.context_positions]
    target = torch.from_numpy(scene.load_image(pair.target_positions[0])).float() / 255
    rendered, alpha = render_source_colours(pair, torch.stack(images), pair.target_camera[:1])
    good, _ = psnr_where_covered(rendered[0], target, alpha[0])
    for bug, camera in broken_conventions(pair.target_camera[:1]).items():
        rendered, alpha = render_source_colours(pair, torch.stack(images), camera)
        bad, coverage = psnr_where_covered(rendered[0], target, alpha[0])
        assert bad < good - 4.0 or coverage < 0.5, (bug, good, bad, coverage)


def run_cli(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "snd_stages.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_killed_demo_generation_resumes_to_identical_files(tmp_path):
    # Seven scenes of ~0.5 s each leave ample time to kill the writer between its first and last scene.
    settings = ["demo.train_scenes=6", "demo.eval_scenes=1", "demo.frames_per_scene=10", "demo.height=96", "demo.width=128"]
    overrides = [arg for item in settings for arg in ("--set", item)]
    for name in ("reference", "resumed"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "pipeline.yaml").write_text((REPO / "pipeline.yaml").read_text())
    reference = run_cli(["make-demo-data", *overrides], tmp_path / "reference")
    assert reference.wait(timeout=300) == 0, reference.stdout.read()

    interrupted = run_cli(["make-demo-data", *overrides], tmp_path / "resumed")
    scenes = tmp_path / "resumed" / "data" / "demo" / "scenes"
    deadline = time.time() + 300
    while time.time() < deadline and not (scenes.is_dir() and any(p.name.startswith("demo") for p in scenes.iterdir())):
        time.sleep(0.02)
    os.kill(interrupted.pid, signal.SIGKILL)
    interrupted.wait()
    finished = sorted(p.name for p in scenes.iterdir() if not p.name.startswith("."))
    assert 1 <= len(finished) < 7, finished
    assert not (tmp_path / "resumed" / "data" / "demo" / "snd_dataset.json").exists()

    resumed = run_cli(["make-demo-data", *overrides], tmp_path / "resumed")
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert "kept" in output
    digest = tree_digest(tmp_path / "resumed" / "data" / "demo")
    assert digest == tree_digest(tmp_path / "reference" / "data" / "demo")
    again = run_cli(["make-demo-data", *overrides], tmp_path / "resumed")
    assert "up to date" in again.communicate(timeout=300)[0]


def test_demo_scenes_are_the_same_files_however_many_processes_make_them(tmp_path):
    from snd_stages.stages.make_demo_data import demo_spec, make_demo_data

    settings = ["demo.train_scenes=2", "demo.eval_scenes=1", "demo.frames_per_scene=4", "demo.height=48",
                "demo.width=64"]
    one = load_config(None, [*settings, "demo.workers=1", f"data.root={tmp_path / 'one'}"])
    three = load_config(None, [*settings, "demo.workers=3", f"data.root={tmp_path / 'three'}"])
    assert demo_spec(one.demo).key == demo_spec(three.demo).key  # how it ran is not what it made
    serial, parallel = make_demo_data(one.data, one.demo), make_demo_data(three.data, three.demo)
    assert sorted(parallel.generated) == sorted(serial.generated) == ["demo0000", "demo0001", "demo0002"]
    # every scene file the same; the record differs only in where it lies and how it ran (its config dump)
    assert tree_digest(tmp_path / "one", ("snd_dataset.json",)) == tree_digest(tmp_path / "three", ("snd_dataset.json",))
    records = [json.loads((tmp_path / name / "snd_dataset.json").read_text()) for name in ("one", "three")]
    assert records[0]["key"] == records[1]["key"] and records[0]["params"] == records[1]["params"]
    assert make_demo_data(three.data, one.demo).skipped  # the other worker count finds them up to date
