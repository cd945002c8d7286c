"""The probes' ground truth cached in the store: read back bitwise, without decoding or fitting, keyed on its
source, resumable after a killed write."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from rich.progress import Progress

from snd_stages.pipeline import load_config
from snd_stages.errors import ArtifactError
from snd_stages.artifacts import ground_truth
from snd_stages.artifacts.ground_truth import STAGE, FrameTruth, GroundTruthRequest, load_ground_truth
from snd_stages.scenes.layout import Scene, list_scene_ids
from snd_stages.stages import evaluate
from snd_stages.stages.evaluate import class_count, load_frames, load_nyuv2_frames
from snd_stages.store import Store

PROBES = ["depth", "normals", "segmentation"]
DEMO = ["demo.train_scenes=1", "demo.eval_scenes=2", "demo.frames_per_scene=5", "demo.height=40", "demo.width=52"]


@pytest.fixture(scope="module")
def demo_root(module_tmp_path):
    from snd_stages.stages.make_demo_data import make_demo_data

    root = module_tmp_path / "demo"
    cfg = load_config(None, [*DEMO, f"data.root={root}"])
    make_demo_data(cfg.data, cfg.demo)
    return root


@pytest.fixture
def scenes(demo_root, tmp_path):
    """A copy of the demo's held-out scenes without their normals/ folders, so that normals are fitted."""
    root = tmp_path / "scenes_root"
    shutil.copytree(demo_root, root)
    for scene_id in list_scene_ids(root, "val"):
        shutil.rmtree(root / "scenes" / scene_id / "normals")
    return root


def load(root, store, probes=PROBES, device="cpu", progress=None):
    scene_ids = list_scene_ids(root, "val")
    return load_frames(root, scene_ids, 1, probes, class_count(root), device, progress, "train", store)


def assert_bitwise_equal(cached, fresh):
    assert cached.names == fresh.names and cached.image_size == fresh.image_size
    assert cached.identity == fresh.identity and cached.fitted_normals == fresh.fitted_normals
    for name in ("depth", "normals", "semantics", "depth_region"):
        a, b = getattr(cached, name), getattr(fresh, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and a.shape == b.shape, name
            # Compare the bits, so that -0.0 / 0.0 or NaN payloads could not pass as equal.
            as_bits = {torch.float32: torch.int32, torch.float16: torch.int16}.get(a.dtype)
            assert torch.equal(a.view(as_bits), b.view(as_bits)) if as_bits else torch.equal(a, b), name
    assert np.array_equal(cached.load_image(0), fresh.load_image(0))


def fail(*args, **kwargs):
    raise AssertionError("the ground truth was computed again instead of read from the store")


def test_cached_ground_truth_equals_fresh_bitwise(scenes, tmp_path):
    fresh = load(scenes, None)
    assert fresh.fitted_normals == len(fresh) == 10 and fresh.normals.dtype == torch.float16
    assert fresh.normals.float().norm(dim=1).gt(0.5).float().mean() > 0.5  # real fitted normals, not zeros
    store = Store(tmp_path / "store")
    written = load(scenes, store)
    cached = load(scenes, store)
    assert len(store.complete_artifacts(STAGE)) == 1
    assert_bitwise_equal(written, fresh)
    assert_bitwise_equal(cached, fresh)


def test_frames_computed_several_at_once_are_the_serial_ground_truth(scenes, tmp_path, monkeypatch):
    from snd_stages import throughput

    with throughput.serial():
        serial = load(scenes, Store(tmp_path / "serial"))
    monkeypatch.setattr(throughput, "CORES_TO_SPARE_FOR_IO", 1)  # threads even for a CPU fit on this machine
    assert throughput.io_threads("cpu") >= 1
    assert_bitwise_equal(load(scenes, Store(tmp_path / "threads")), serial)
    assert_bitwise_equal(load(scenes, None), serial)


def test_a_cached_set_is_read_without_decoding_or_fitting(scenes, tmp_path, monkeypatch):
    store = Store(tmp_path / "store")
    first = load(scenes, store)
    monkeypatch.setattr(evaluate, "normals_from_depth_plane_fit", fail)
    monkeypatch.setattr(Scene, "load_depth", fail)
    monkeypatch.setattr(Scene, "load_semantics", fail)
    progress = Progress(disable=True)
    cached = load(scenes, store, progress=progress)
    assert_bitwise_equal(cached, first)
    assert [task.description for task in progress.tasks] == ["ground truth · train (cached)"]


def test_key_follows_the_source_files_and_probes_but_not_the_device(scenes, tmp_path, monkeypatch):
    store = Store(tmp_path / "store")
    base = load(scenes, store)
    keys = {artifact.key for artifact in store.complete_artifacts(STAGE)}

    with monkeypatch.context() as patched:  # another device finds the same artifact: nothing is fitted again
        patched.setattr(evaluate, "normals_from_depth_plane_fit", fail)
        patched.setattr(Scene, "load_depth", fail)
        assert_bitwise_equal(load(scenes, store, device="cuda"), base)
    assert {artifact.key for artifact in store.complete_artifacts(STAGE)} == keys

    without_normals = load(scenes, store, probes=["depth", "segmentation"])
    assert without_normals.normals is None and without_normals.fitted_normals == 0
    assert torch.equal(without_normals.depth, base.depth)
    assert len(store.complete_artifacts(STAGE)) == 2

    scene_id = list_scene_ids(scenes, "val")[0]
    depth_file = sorted((scenes / "scenes" / scene_id / "depth").iterdir())[0]
    before = depth_file.stat().st_size
    Image.fromarray(np.full(base.image_size, 1234, np.uint16)).save(depth_file)  # flat: compresses to fewer bytes
    assert depth_file.stat().st_size != before
    changed = load(scenes, store)
    assert len(store.complete_artifacts(STAGE)) == 3
    assert torch.all(changed.depth[0] == np.float32(1.234)) and torch.equal(changed.depth[1:], base.depth[1:])
    assert_bitwise_equal(changed, load(scenes, None))

    # Rewritten in place with the same byte count (a flat image of another value compresses alike): noticed too.
    os.utime(depth_file, ns=(1_000_000_000, 1_000_000_000))
    same_size = depth_file.stat().st_size
    Image.fromarray(np.full(base.image_size, 1235, np.uint16)).save(depth_file)
    assert depth_file.stat().st_size == same_size
    rewritten = load(scenes, store)
    assert len(store.complete_artifacts(STAGE)) == 4
    assert torch.all(rewritten.depth[0] == np.float32(1.235)) and torch.equal(rewritten.depth[1:], base.depth[1:])


def test_a_killed_write_is_not_read_and_the_rerun_completes_it(scenes, tmp_path, monkeypatch):
    monkeypatch.setattr(ground_truth, "FRAMES_PER_UNIT", 2)
    store = Store(tmp_path / "store")
    real_load_depth = Scene.load_depth
    calls = []

    def killed_at_the_fourth_frame(self, index):
        calls.append(index)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_load_depth(self, index)

    with monkeypatch.context() as patched:
        patched.setattr(Scene, "load_depth", killed_at_the_fourth_frame)
        with pytest.raises(KeyboardInterrupt):
            load(scenes, store)
    assert store.complete_artifacts(STAGE) == []
    partial, = (store.root / STAGE).glob("*.partial")
    assert sorted(p.name for p in (partial / "data.zarr").iterdir() if p.is_dir()) == ["00000"]
    with pytest.raises(ArtifactError, match="incomplete"):
        store.open(STAGE, partial.name.removesuffix(".partial"))

    calls.clear()
    with monkeypatch.context() as patched:
        patched.setattr(Scene, "load_depth", lambda self, index: calls.append(index) or real_load_depth(self, index))
        resumed = load(scenes, store)
    assert len(calls) == 10 - 2  # the first unit's two frames are kept
    artifact, = store.complete_artifacts(STAGE)
    assert artifact.key == partial.name.removesuffix(".partial") and artifact.manifest["units"] == 5
    assert artifact.manifest["counts"]["fitted_normals"] == 10
    assert_bitwise_equal(resumed, load(scenes, None))


def test_a_stored_depth_region_is_read_back(tmp_path):
    rng = np.random.default_rng(0)
    depth = rng.uniform(0.5, 3, (5, 6, 8)).astype(np.float32)
    region = np.zeros((6, 8), bool)
    region[1:5, 2:7] = True
    request = GroundTruthRequest("test", tuple(f"f{i}" for i in range(5)), (6, 8), 1, {"source": "random"},
                                 normals=False, classes=None, fits_normals=False)

    def compute(index):
        return FrameTruth(torch.from_numpy(depth[index]))

    fresh = load_ground_truth(request, compute, None, region=region)
    store = Store(tmp_path / "store")
    computed = load_ground_truth(request, compute, store, region=region)
    reused = load_ground_truth(request, fail, store, region=region)
    assert (computed.status, reused.status, fresh.status) == ("computed", "reused", "in memory")
    for truth in (computed, reused):
        assert truth.region.dtype == torch.bool and torch.equal(truth.region, fresh.region)
        assert torch.equal(truth.depth, fresh.depth) and truth.normals is None and truth.semantics is None
    assert load_ground_truth(request, compute, store).key != reused.key  # no region: another artifact


def test_nyuv2_ground_truth_cached_and_keyed_on_its_files(tmp_path, monkeypatch):
    from tests.test_nyuv2 import write_labeled_mat, write_v5_files

    files = write_v5_files(tmp_path)
    mat = write_labeled_mat(tmp_path / "nyu_depth_v2_labeled.mat")
    cfg = load_config(None, ["eval.dataset=nyuv2", f"eval.nyuv2_mat={mat}", f"eval.nyuv2_splits={files['splits']}",
                             f"eval.nyuv2_mapping_40={files['map40']}", f"eval.nyuv2_mapping_13={files['map13']}",
                             "eval.frame_stride=1"]).eval
    store = Store(tmp_path / "store")
    fresh = load_nyuv2_frames(cfg, "train", PROBES, "cpu")
    written = load_nyuv2_frames(cfg, "train", PROBES, "cpu", store=store)
    with monkeypatch.context() as patched:
        patched.setattr(evaluate, "normals_from_depth_plane_fit", fail)
        cached = load_nyuv2_frames(cfg, "train", PROBES, "cpu", store=store)
    assert fresh.fitted_normals == 2 and fresh.semantics is not None
    assert_bitwise_equal(written, fresh)
    assert_bitwise_equal(cached, fresh)
    assert len(store.complete_artifacts(STAGE)) == 1

    other_classes = load_config(None, [f"eval.{name}={getattr(cfg, name)}" for name in
                                       ("dataset", "nyuv2_mat", "nyuv2_splits", "nyuv2_mapping_40", "nyuv2_mapping_13")]
                                + ["eval.frame_stride=1", "eval.nyuv2_classes=40"]).eval
    load_nyuv2_frames(other_classes, "train", PROBES, "cpu", store=store)
    assert len(store.complete_artifacts(STAGE)) == 2


def test_a_damaged_artifact_is_refused_with_what_to_run(tmp_path):
    request = GroundTruthRequest("test", ("a", "b"), (2, 3), 1, {"source": "zeros"}, normals=False, classes=None,
                                 fits_normals=False)
    store = Store(tmp_path / "store")
    truth = load_ground_truth(request, lambda index: FrameTruth(torch.zeros(2, 3)), store)
    shutil.rmtree(store.final_path(STAGE, truth.key) / "data.zarr" / "00000")
    with pytest.raises(ArtifactError, match="rerun snd eval"):
        load_ground_truth(request, fail, store)
