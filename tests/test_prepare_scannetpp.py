"""snd prepare-scannetpp on scenes written as the official ScanNet++ release lays them out.

The fixture (tests/scannetpp_raw_fixture.py) keeps its truth: its own ray casts of the mesh at the prepared pinhole
cameras. The prepared scene must match it within these tolerances, which hold with a wide margin (measured: depth
0.50 mm, the uint16 millimetre rounding; every instance IoU 1.0; poses 2e-14 degrees and 2e-15 m, JSON's rounding;
images 24.8 dB PSNR against the truth, 18.2 dB for the fisheye images only resized):
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from snd_stages.artifacts.protocol import Shard
from snd_stages.cli import app
from snd_stages.config import PrepareScannetppCfg
from snd_stages.errors import ConfigError, DataError
from snd_stages.geometry import rotation_angle_degrees
from snd_stages.scenes.layout import IGNORE_LABEL, list_scene_ids, read_scene
from snd_stages.stages.prepare_scannetpp import prepare_scannetpp
from tests.scannetpp_raw_fixture import (
    BAD_FRAME,
    CLASSES,
    PARTLY_MASKED_FRAME,
    RAW_HEIGHT,
    RAW_WIDTH,
    UNMASKED_FRAME,
    semantic_truth,
    write_raw_scene,
    write_release_metadata,
)

REPO = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT = RAW_WIDTH // 2, RAW_HEIGHT // 2  # 72 x 48: the fisheye images halved, as FiT3D halves the release's
MAX_DEPTH_ERROR_MM = 1.0
MIN_INSTANCE_IOU = 0.98
MAX_ROTATION_ERROR_DEGREES = 1e-6
MAX_TRANSLATION_ERROR_M = 1e-6
MIN_IMAGE_PSNR = 22.0
CFG = PrepareScannetppCfg(width=WIDTH, height=HEIGHT)


def release(root: Path, train=("scene_a",), val=(), extra=()) -> dict:
    """A release holding ``train`` + ``val`` + ``extra`` (listed in no split); returns each scene's truth."""
    truths = {scene: write_raw_scene(root, scene, seed) for seed, scene in enumerate((*train, *val, *extra))}
    write_release_metadata(root, list(train), list(val))
    return truths


@pytest.fixture(scope="module")
def prepared(module_tmp_path):
    """scene_a (train), scene_b and scene_c (val) prepared; nvs_test (train) has no scans/, as the release's NVS
    test scenes."""
    raw, out = module_tmp_path / "release", module_tmp_path / "prepared"
    truths = release(raw, train=("scene_a", "nvs_test"), val=("scene_b", "scene_c"))
    shutil.rmtree(raw / "data" / "nvs_test" / "scans")
    return raw, out, truths, prepare_scannetpp(raw, out, CFG)


def test_the_prepared_scene_matches_the_generators_truth(prepared):
    raw, out, truths, _ = prepared
    for scene_id in ("scene_a", "scene_b"):
        truth, scene = truths[scene_id], read_scene(out, scene_id)
        assert [frame.name for frame in scene.frames] == truth.training_names
        assert (scene.camera.width, scene.camera.height) == (WIDTH, HEIGHT)
        K = scene.camera.intrinsics[0].numpy()
        assert (K[0, 2], K[1, 2]) == (WIDTH / 2, HEIGHT / 2)  # centred, as the reference's patch crop assumes
        ious = []
        for index, frame in enumerate(scene.frames):
            expected = truth.world_to_camera[frame.name]
            world_to_camera = scene.camera.world_to_camera[index].numpy()
            assert rotation_angle_degrees(world_to_camera[:3, :3] @ expected[:3, :3].T) < MAX_ROTATION_ERROR_DEGREES
            assert np.abs(np.linalg.inv(world_to_camera)[:3, 3] - np.linalg.inv(expected)[:3, 3]).max() < MAX_TRANSLATION_ERROR_M
            rendered = truth.render_pinhole(K, frame.name, HEIGHT, WIDTH)
            assert np.abs(scene.load_depth(index) - rendered["depth"]).max() * 1000 < MAX_DEPTH_ERROR_MM
            instances = scene.load_instances(index)
            for object_id in np.unique(rendered["objects"]):
                expected_pixels = rendered["objects"] == object_id
                if expected_pixels.sum() >= 20:
                    ious.append((expected_pixels & (instances == object_id)).sum() / (expected_pixels | (instances == object_id)).sum())
            classes = semantic_truth(rendered["objects"], raw / "data" / scene_id / "scans" / "segments_anno.json")
            assert (scene.load_semantics(index) == classes).mean() > MIN_INSTANCE_IOU
            normals = scene.load_normals(index)  # unit length and facing the camera: n . ray < 0
            rows, cols = np.mgrid[:HEIGHT, :WIDTH] + 0.5
            rays = np.stack([(cols - K[0, 2]) / K[0, 0], (rows - K[1, 2]) / K[1, 1], np.ones_like(cols)], -1)
            assert np.abs(np.linalg.norm(normals, axis=-1) - 1).max() < 0.02 and ((normals * rays).sum(-1) < 0.01).all()
        assert min(ious) >= MIN_INSTANCE_IOU and len(ious) >= 3 * len(scene.frames)


def supersampled_truth_image(truth, K: np.ndarray, name: str) -> np.ndarray:
    colour = 0
    for dx, dy in ((-0.25, -0.25), (0.25, -0.25), (-0.25, 0.25), (0.25, 0.25)):
        shifted = K.copy()
        shifted[0, 2], shifted[1, 2] = K[0, 2] - dx, K[1, 2] - dy
        colour = colour + truth.render_pinhole(shifted, name, HEIGHT, WIDTH)["colour"] / 4
    return colour * 255


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255**2 / ((a.astype(float) - b.astype(float)) ** 2).mean()))


def test_images_are_undistorted_onto_the_pinhole_camera(prepared):
    raw, out, truths, _ = prepared
    scene, truth = read_scene(out, "scene_a"), truths["scene_a"]
    K = scene.camera.intrinsics[0].numpy()
    for index, frame in enumerate(scene.frames):
        expected = supersampled_truth_image(truth, K, frame.name)
        fisheye = cv2.imread(str(raw / "data" / "scene_a" / "dslr" / "resized_images" / frame.name))[..., ::-1]
        only_resized = cv2.resize(fisheye, (WIDTH, HEIGHT), interpolation=cv2.INTER_CUBIC)
        undistorted = psnr(scene.load_image(index), expected)
        assert undistorted > MIN_IMAGE_PSNR and undistorted > psnr(only_resized, expected) + 4, frame.name


def test_frames_marked_bad_or_unmasked_are_excluded_and_counted(prepared):
    _, out, _, result = prepared
    report = result.reports["scene_a"]
    assert report["frames"] == {"listed": 10, "prepared": 8, "excluded": {
        "marked is_bad": 1, "anonymisation mask keeps less than 50%": 1}}
    names = {f["file_path"] for f in json.loads((out / "scenes" / "scene_a" / "transforms_train.json").read_text())["frames"]}
    assert BAD_FRAME not in names and UNMASKED_FRAME not in names and "DSC00011.JPG" not in names  # nor test frames
    mask = cv2.imread(str(out / "scenes" / "scene_a" / "masks" / PARTLY_MASKED_FRAME.replace(".JPG", ".png")), 0)
    assert set(np.unique(mask)) == {0, 255} and 0.7 < (mask == 255).mean() < 0.99


def test_checks_pass_with_their_numbers_in_the_report(prepared):
    _, _, _, result = prepared
    checks = result.reports["scene_a"]["checks"]
    assert checks["edge_shift_px"] == [0, 0]
    assert checks["depth_median_relative_error"] < 0.02 and checks["depth_observations"] > 100
    assert checks["pose_rotation_error_degrees"] < 1e-9 and checks["pose_translation_error_m"] < 1e-9


def test_scenes_without_a_mesh_are_skipped_with_the_reason_and_splits_name_prepared_scenes(prepared):
    _, out, _, result = prepared
    assert sorted(result.prepared) == ["scene_a", "scene_b", "scene_c"]
    assert set(result.skipped) == {"nvs_test"} and "no mesh" in result.skipped["nvs_test"]
    assert not (out / "scenes" / "nvs_test").exists()
    assert list_scene_ids(out, "train") == ["scene_a"] and list_scene_ids(out, "val") == ["scene_b", "scene_c"]
    assert (out / "metadata" / "semantic_classes.txt").read_text().split() == list(CLASSES)
    classes = np.unique(read_scene(out, "scene_a").load_semantics(0))
    assert IGNORE_LABEL in classes or classes.max() < len(CLASSES)


def test_a_rerun_prepares_nothing_and_the_release_is_unchanged(prepared):
    raw, out, _, _ = prepared
    before = {path: path.stat().st_mtime_ns for path in raw.rglob("*")}
    again = prepare_scannetpp(raw, out, CFG)
    assert again.prepared == [] and sorted(again.resumed) == ["scene_a", "scene_b", "scene_c"]
    assert {path: path.stat().st_mtime_ns for path in raw.rglob("*")} == before


def test_shards_split_the_scenes_and_the_last_leaves_complete_split_files(tmp_path):
    raw, out = tmp_path / "release", tmp_path / "prepared"
    release(raw, train=("scene_a",), val=("scene_b",))
    first = prepare_scannetpp(raw, out, CFG, Shard(0, 2))
    assert first.prepared == ["scene_a"] and list_scene_ids(out, "all") == ["scene_a"]
    assert (out / "metadata" / "nvs_sem_val.txt").read_text() == ""
    second = prepare_scannetpp(raw, out, CFG, Shard(1, 2))
    assert second.prepared == ["scene_b"] and list_scene_ids(out, "val") == ["scene_b"]
    assert list_scene_ids(out, "train") == ["scene_a"]


def test_a_scene_that_fails_half_way_leaves_nothing_that_reads_as_a_scene(tmp_path):
    raw, out = tmp_path / "release", tmp_path / "prepared"
    release(raw)
    images = raw / "data" / "scene_a" / "dslr" / "resized_images"
    (images / "DSC00009.JPG").write_bytes(b"not a jpeg")  # the frames before it are written by then
    result = prepare_scannetpp(raw, out, CFG)
    assert "cannot read image" in result.failed["scene_a"] and "DSC00009.JPG" in result.failed["scene_a"]
    assert list((out / "scenes").iterdir()) == []
    # A folder a killed run left behind (its process is gone) is hidden from the reader, and removed by a rerun
    abandoned = out / "scenes" / ".scene_a.tmp-999999999-0000abcd"
    (abandoned / "images").mkdir(parents=True)
    with pytest.raises(DataError, match="no scenes found"):
        list_scene_ids(out)
    write_raw_scene(raw, "scene_a", 0)
    assert prepare_scannetpp(raw, out, CFG).prepared == ["scene_a"] and not abandoned.exists()


def edit_json(path: Path, change) -> None:
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def moved_pose(root: Path) -> None:
    def change(meta):
        meta["frames"][2]["transform_matrix"][0][3] += 0.05
    edit_json(root / "dslr" / "nerfstudio" / "transforms.json", change)


def scaled_pose(root: Path) -> None:
    def change(meta):
        meta["frames"][1]["transform_matrix"] = (np.array(meta["frames"][1]["transform_matrix"]) * 1.1).tolist()
    edit_json(root / "dslr" / "nerfstudio" / "transforms.json", change)


def shifted_principal_point(root: Path) -> None:
    """Both files name a principal point 8 px off the images' own: the undistortion no longer fits the images."""
    edit_json(root / "dslr" / "nerfstudio" / "transforms.json", lambda meta: meta.update(cx=meta["cx"] + 8.0))
    cameras = root / "dslr" / "colmap" / "cameras.txt"
    header, line = cameras.read_text().splitlines()
    fields = line.split()
    fields[6] = repr(float(fields[6]) + 8.0)
    cameras.write_text(f"{header}\n{' '.join(fields)}\n")


def scaled_points(root: Path) -> None:
    path = root / "dslr" / "colmap" / "points3D.txt"
    lines = path.read_text().splitlines()
    scaled = [lines[0]] + [" ".join([f[0], *(repr(float(v) * 1.3) for v in f[1:4]), *f[4:]])
                           for f in (line.split() for line in lines[1:])]
    path.write_text("\n".join(scaled) + "\n")


def other_focal_length(root: Path) -> None:
    edit_json(root / "dslr" / "nerfstudio" / "transforms.json", lambda meta: meta.update(fl_x=meta["fl_x"] * 1.01))


@pytest.mark.parametrize("damage, fragments", [
    (moved_pose, ["poses:", "disagree by up to", "0.05 m"]),
    (scaled_pose, ["poses:", "DSC00002.JPG", "not rigid"]),
    (shifted_principal_point, ["masks:", "label edges line up best", "limit 1 px"]),
    (scaled_points, ["depth:", "COLMAP points", "not in one frame and scale"]),
    (other_focal_length, ["intrinsics:", "cameras.txt", "disagree"]),
])
def test_a_failed_check_fails_the_scene_with_the_reason(tmp_path, damage, fragments):
    raw, out = tmp_path / "release", tmp_path / "prepared"
    release(raw)
    damage(raw / "data" / "scene_a")
    result = prepare_scannetpp(raw, out, CFG)
    assert result.prepared == [] and not (out / "scenes" / "scene_a").exists()
    for fragment in fragments:
        assert fragment in result.failed["scene_a"], (fragment, result.failed["scene_a"])


def test_missing_annotations_and_masks(tmp_path):
    raw, out = tmp_path / "release", tmp_path / "prepared"
    release(raw, train=("scene_a", "unannotated"))
    (raw / "data" / "unannotated" / "scans" / "segments_anno.json").unlink()
    (raw / "data" / "scene_a" / "dslr" / "resized_anon_masks" / "DSC00004.png").unlink()
    result = prepare_scannetpp(raw, out, CFG)
    assert "no annotations" in result.skipped["unannotated"] and "segments_anno.json" in result.skipped["unannotated"]
    assert result.reports["scene_a"]["frames"]["excluded"]["no anonymisation mask"] == 1
    assert result.reports["scene_a"]["frames"]["prepared"] == 7


def test_wrong_release_layouts_are_refused_with_the_expected_one(tmp_path, prepared):
    _, prepared_root, _, _ = prepared
    with pytest.raises(DataError, match="no data/ and splits/ folders .*prepared root"):
        prepare_scannetpp(prepared_root, tmp_path / "out", CFG)
    raw = tmp_path / "release"
    release(raw)
    with pytest.raises(ConfigError, match="inside the release"):
        prepare_scannetpp(raw, raw / "prepared", CFG)
    (raw / "metadata" / "semantic_benchmark" / "top100.txt").unlink()
    with pytest.raises(DataError, match="class list .*top100.txt is missing.*prepare_scannetpp.classes"):
        prepare_scannetpp(raw, tmp_path / "out", CFG)
    (raw / "splits" / "nvs_sem_val.txt").unlink()
    with pytest.raises(DataError, match="nvs_sem_val.txt is missing"):
        prepare_scannetpp(raw, tmp_path / "out", CFG)


def test_the_command_reports_each_scene_and_fails_on_a_failed_check(tmp_path):
    raw, out = tmp_path / "release", tmp_path / "prepared"
    release(raw, train=("scene_a", "scene_c"))
    sizes = ["--set", f"prepare_scannetpp.width={WIDTH}", "--set", f"prepare_scannetpp.height={HEIGHT}"]
    command = ["prepare-scannetpp", "--raw", str(raw), "--out", str(out), "--config", str(tmp_path / "none.yaml")]
    (tmp_path / "none.yaml").write_text("{}\n")
    scaled_points(raw / "data" / "scene_c")
    result = CliRunner().invoke(app, [*command, *sizes])
    text = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert "scene_a: 8 of 10 frames" in text and "scenes/hour" in text
    assert "1 scene(s) failed their checks" in text and "scene_c" in text and "depth:" in text
    assert list_scene_ids(out, "train") == ["scene_a"]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:random weights")
def test_the_pipeline_trains_and_evaluates_on_the_prepared_scenes(prepared, tmp_path):
    from snd_stages.pipeline import load_config
    from snd_stages.stages.evaluate import evaluate
    from snd_stages.stages.precompute_gaussians import precompute_gaussians
    from snd_stages.stages.precompute_masks import precompute_masks
    from snd_stages.stages.precompute_operators import precompute_operators
    from snd_stages.stages.sample_views import sample_views
    from snd_stages.stages.train import train
    from snd_stages.store import Store
    from tests.test_train import TINY

    _, out, _, _ = prepared
    cfg = load_config(None, [*TINY, "data.dataset=scannetpp", f"data.root={out}", f"store.root={tmp_path / 'store'}",
                             f"train.runs_root={tmp_path / 'runs'}", "gaussians.reconstructor=depth", "masks.source=gt",
                             "train.steps=2", "eval.dataset=scannetpp", "eval.baseline_weights=random",
                             "eval.probe_train_scenes=1", "eval.probe_steps=3", "eval.correspondence_pairs=2",
                             "eval.correspondence_gap=[2,3]", "eval.correspondence_top_k=50",
                             f"eval.report_dir={tmp_path / 'report'}"])
    store = Store(cfg.store.root)
    sample_views(cfg.data, cfg.sampling, store)
    precompute_gaussians(cfg.data, cfg.sampling, cfg.gaussians, store)
    precompute_masks(cfg.data, cfg.sampling, cfg.masks, store)
    precompute_operators(cfg.data, cfg.sampling, cfg.gaussians, cfg.masks, cfg.train, store)
    result = train(cfg.data, cfg.sampling, cfg.gaussians, cfg.masks, cfg.train, store)
    assert result.steps == 2 and np.isfinite(result.final_loss) and result.student_path.is_file()
    report = evaluate(cfg.data, cfg.train, cfg.eval, [result.run_dir], store=store)
    assert len(report.results["models"]) == 2  # the baseline and the trained student
    for scores in report.results["models"].values():
        assert np.isfinite(scores["depth"]["rmse"]) and 0 <= scores["segmentation"]["miou"] <= 1


def test_make_demo_data_leaves_a_prepared_root_as_it_is_so_make_all_runs_on_it(prepared, tmp_path):
    _, out, _, _ = prepared
    (tmp_path / "pipeline.yaml").write_text(f"data:\n  dataset: scannetpp\n  root: {out}\n")
    before = sorted(str(path) for path in out.rglob("*"))
    result = CliRunner().invoke(app, ["make-demo-data", "--config", str(tmp_path / "pipeline.yaml")])
    assert result.exit_code == 0 and "nothing to generate" in " ".join(result.output.split())
    assert sorted(str(path) for path in out.rglob("*")) == before


@pytest.mark.slow
def test_a_killed_run_keeps_only_whole_scenes_and_a_rerun_finishes_them(tmp_path):
    raw, out = tmp_path / "release", tmp_path / "prepared"
    release(raw, train=("scene_a", "scene_b", "scene_c"))
    # At 876 x 584 a scene takes seconds, ample time to kill the run between its first and last scene.
    (tmp_path / "pipeline.yaml").write_text("prepare_scannetpp:\n  width: 876\n  height: 584\n  workers: 1\n")
    command = [sys.executable, "-m", "snd_stages.cli", "prepare-scannetpp", "--raw", str(raw), "--out", str(out),
               "--config", str(tmp_path / "pipeline.yaml")]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out / "scenes" / "scene_a").is_dir() and run.poll() is None:
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()
    finished = [path.name for path in (out / "scenes").iterdir() if not path.name.startswith(".")]
    assert "scene_a" in finished and len(finished) < 3, finished
    for scene_id in finished:  # whatever reads as a scene is whole
        scene = read_scene(out, scene_id)
        assert len(scene) == 8 and all(scene.path(kind, 7).is_file() for kind in ("images", "depth", "normals"))
    rerun = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"kept {len(finished)} finished earlier" in " ".join(rerun.stdout.split() + rerun.stderr.split())
    assert sorted(path.name for path in (out / "scenes").iterdir()) == ["scene_a", "scene_b", "scene_c"]


def short_segments(root: Path) -> None:
    edit_json(root / "scans" / "segments.json", lambda meta: meta.update(segIndices=meta["segIndices"][:-5]))


def zero_object_id(root: Path) -> None:
    edit_json(root / "scans" / "segments_anno.json", lambda meta: meta["segGroups"][0].update(objectId=0))


def every_frame_bad(root: Path) -> None:
    edit_json(root / "dslr" / "nerfstudio" / "transforms.json",
              lambda meta: [frame.update(is_bad=True) for frame in meta["frames"]])


def pinhole_transforms(root: Path) -> None:
    edit_json(root / "dslr" / "nerfstudio" / "transforms.json", lambda meta: meta.update(camera_model="PINHOLE"))


@pytest.mark.parametrize("damage, fragments", [
    (short_segments, ["segments.json: segIndices has", "vertices", "same release"]),
    (zero_object_id, ["segGroups[0]: objectId 0 is outside 1..65535"]),
    (every_frame_bad, ["no frame of", "'marked is_bad': 10"]),
    (lambda root: (root / "dslr" / "colmap" / "points3D.txt").unlink(), ["points3D.txt is missing", "dslr_colmap_dir"]),
    (pinhole_transforms, ["expected camera_model OPENCV_FISHEYE", "'PINHOLE'"]),
    (lambda root: shutil.rmtree(root), ["listed in the splits", "is missing; download it"]),
])
def test_malformed_scene_files_fail_the_scene_with_the_fix(tmp_path, damage, fragments):
    raw, out = tmp_path / "release", tmp_path / "prepared"
    release(raw)
    damage(raw / "data" / "scene_a")
    result = prepare_scannetpp(raw, out, CFG)
    assert result.prepared == [] and list((out / "scenes").iterdir()) == []
    for fragment in fragments:
        assert fragment in result.failed["scene_a"], (fragment, result.failed["scene_a"])
