"""Artifact store: content keys, manifests, atomic publication, resume after a kill, skip and force."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from snd_stages import __version__
from snd_stages.errors import ArtifactError
from snd_stages import store as store_module
from snd_stages.store import ArtifactSpec, Store, atomic_directory
from tests.conftest import tree_digest

# A writer that produces 8 units, one every `delay` seconds, then publishes. Content depends only on the unit.
WRITER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from snd_stages.store import ArtifactSpec, Store
    root, delay = sys.argv[1], float(sys.argv[2])
    spec = ArtifactSpec("toy", 1, {"units": 8, "scale": 2.5}, {"source": "abc"})
    writer = Store(root).writer(spec, "toy: {}\\n")
    writer.prepare({"toy_attribute": 1})
    names = [f"unit{i:02d}" for i in range(8)]
    for index, name in enumerate(names):
        if name in writer.done_units():
            continue
        with writer.unit(name) as group:
            group.create_array("values", data=np.arange(1000, dtype=np.float32) * 2.5 + index, chunks=(100,))
            time.sleep(delay)  # the unit is half-written here: a kill must not leave it visible
            group.create_array("index", data=np.array([index]))
            group.attrs["name"] = name
    writer.finish(expected_units=names, counts={"units": len(names)})
    print(writer.final)
    """
)


def run_writer(root: Path, delay: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root), str(delay)],
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.PIPE,
        text=True,
    )


def test_key_depends_on_every_ingredient():
    base = ArtifactSpec("stage", 1, {"a": 1, "b": [1, 2]}, {"x": "k1"})
    assert base.key == ArtifactSpec("stage", 1, {"b": [1, 2], "a": 1}, {"x": "k1"}).key  # order-free
    variants = [
        ArtifactSpec("other", 1, {"a": 1, "b": [1, 2]}, {"x": "k1"}),
        ArtifactSpec("stage", 2, {"a": 1, "b": [1, 2]}, {"x": "k1"}),
        ArtifactSpec("stage", 1, {"a": 2, "b": [1, 2]}, {"x": "k1"}),
        ArtifactSpec("stage", 1, {"a": 1, "b": [2, 1]}, {"x": "k1"}),
        ArtifactSpec("stage", 1, {"a": 1, "b": [1, 2]}, {"x": "k2"}),
    ]
    assert len({base.key, *(v.key for v in variants)}) == 6
    assert base.ingredients()["producer_version"] == __version__


def test_the_store_format_is_in_the_keys_of_stored_artifacts_only(monkeypatch):
    stored = ArtifactSpec("stage", 1, {"a": 1})
    dataset = ArtifactSpec("demo_data", 1, {"a": 1}, in_store=False)
    keys = stored.key, dataset.key
    monkeypatch.setattr(store_module, "STORE_FORMAT", store_module.STORE_FORMAT + 1)
    assert stored.key != keys[0]  # a new store format never reads the old artifacts
    assert dataset.key == keys[1]  # while the generated scenes, outside the store, stay valid


def test_publish_open_and_self_describing_attributes(tmp_path):
    store = Store(tmp_path)
    spec = ArtifactSpec("toy", 3, {"p": 1})
    writer = store.writer(spec, "p: 1\n")
    writer.prepare({"extra": "yes"})
    with writer.unit("a") as group:
        group.create_array("x", data=np.arange(5))
    assert not store.exists(spec)
    with pytest.raises(ArtifactError, match="incomplete"):
        store.open("toy", spec.key)
    artifact = writer.finish(expected_units=["a"])
    assert store.exists(spec)
    assert artifact.manifest["complete"] and artifact.manifest["params"] == {"p": 1}
    assert artifact.manifest["conventions"]["quaternion_order"] == "wxyz"
    attributes = dict(artifact.group().attrs)
    assert attributes["snd"]["schema_version"] == 3
    assert attributes["snd"]["conventions"]["extrinsics"] == "world_to_camera 4x4"
    assert attributes["extra"] == "yes"
    np.testing.assert_array_equal(artifact.unit("a")["x"][:], np.arange(5))
    assert (artifact.path / "config.yaml").read_text() == "p: 1\n"
    with pytest.raises(ArtifactError, match="schema version 3.*reads version 4"):
        store.open("toy", spec.key, schema_version=4)


def test_finish_refuses_while_units_are_missing(tmp_path):
    writer = Store(tmp_path).writer(ArtifactSpec("toy", 1, {}), "")
    writer.prepare()
    with writer.unit("a"):
        pass
    with pytest.raises(ArtifactError, match="lacks 1 unit"):
        writer.finish(expected_units=["a", "b"])


def test_failed_unit_leaves_nothing_behind(tmp_path):
    writer = Store(tmp_path).writer(ArtifactSpec("toy", 1, {}), "")
    writer.prepare()
    with pytest.raises(RuntimeError):
        with writer.unit("broken") as group:
            group.create_array("x", data=np.arange(3))
            raise RuntimeError("boom")
    assert writer.done_units() == set()


def test_missing_artifact_error_says_which_stage_to_run(tmp_path):
    with pytest.raises(ArtifactError, match="run the stage that produces 'toy'"):
        Store(tmp_path).open("toy", "0" * 20)


def test_corrupt_manifest_is_not_read_as_complete(tmp_path):
    store = Store(tmp_path)
    spec = ArtifactSpec("toy", 1, {})
    writer = store.writer(spec, "")
    writer.prepare()
    artifact = writer.finish()
    (artifact.path / "manifest.json").write_text('{"complete": tr')
    with pytest.raises(ArtifactError, match="not valid JSON"):
        store.open("toy", spec.key)
    (artifact.path / "manifest.json").write_text(json.dumps({"complete": False}))
    with pytest.raises(ArtifactError, match="does not mark the artifact complete"):
        store.open("toy", spec.key)


def test_describe_changes_names_the_changed_parameter(tmp_path):
    store = Store(tmp_path)
    first = ArtifactSpec("toy", 1, {"gap": [4, 8], "seed": 0}, {"scenes": "aaa"})
    writer = store.writer(first, "")
    writer.prepare()
    writer.finish()
    second = ArtifactSpec("toy", 1, {"gap": [8, 8], "seed": 0}, {"scenes": "bbb"})
    changes = store.describe_changes(second)
    assert "params.gap: [4, 8] -> [8, 8]" in changes
    assert 'inputs.scenes: "aaa" -> "bbb"' in changes
    assert len(changes) == 2


def test_atomic_directory_publishes_only_on_success(tmp_path):
    with atomic_directory(tmp_path / "done") as folder:
        (folder / "f").write_text("x")
    assert (tmp_path / "done" / "f").read_text() == "x"
    with pytest.raises(KeyError):
        with atomic_directory(tmp_path / "failed") as folder:
            (folder / "f").write_text("x")
            raise KeyError
    assert not (tmp_path / "failed").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done"]


def test_killed_writer_resumes_to_an_identical_artifact(tmp_path):
    reference_root, resumed_root = tmp_path / "reference", tmp_path / "resumed"
    reference = run_writer(reference_root, delay=0.0)
    assert reference.wait(timeout=120) == 0

    interrupted = run_writer(resumed_root, delay=0.4)
    data = None
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once some, but not all, units are finished
        partial = list((resumed_root / "toy").glob("*.partial/data.zarr"))
        if partial and len([p for p in partial[0].iterdir() if p.is_dir()]) >= 3:
            data = partial[0]
            break
        time.sleep(0.05)
    assert data is not None, "the writer never got going"
    os.kill(interrupted.pid, signal.SIGKILL)
    interrupted.wait()
    finished_before_kill = sorted(p.name for p in data.iterdir() if p.is_dir())
    assert 3 <= len(finished_before_kill) < 8
    store = Store(resumed_root)
    key = ArtifactSpec("toy", 1, {"units": 8, "scale": 2.5}, {"source": "abc"}).key
    with pytest.raises(ArtifactError, match="incomplete"):
        store.open("toy", key)

    resumed = run_writer(resumed_root, delay=0.0)
    assert resumed.wait(timeout=120) == 0
    artifact = store.open("toy", key)
    assert artifact.units() == [f"unit{i:02d}" for i in range(8)]
    # Byte-identical data; only the manifest (creation time) may differ.
    reference_artifact = Store(reference_root).open("toy", key)
    assert tree_digest(artifact.path, exclude_names=("manifest.json",)) == tree_digest(
        reference_artifact.path, exclude_names=("manifest.json",)
    )
    for unit in artifact.units():
        np.testing.assert_array_equal(artifact.unit(unit)["values"][:], reference_artifact.unit(unit)["values"][:])


def test_checkpoint_keys_follow_the_file_contents_not_the_path(tmp_path):
    from types import SimpleNamespace

    from snd_stages.config import TrainCfg

    from snd_stages.reconstruct import GaussiansCfg

    from snd_stages.masks import MasksCfg
    from snd_stages.masks.sources import SamSettings
    from snd_stages.reconstruct.mvsplat.settings import MVSplatSettings
    from snd_stages.errors import ConfigError
    from snd_stages.artifacts.gaussians import gaussians_spec
    from snd_stages.artifacts.masks import masks_spec
    from snd_stages.artifacts.runs import run_spec

    first, moved, other = tmp_path / "a.ckpt", tmp_path / "elsewhere" / "b.ckpt", tmp_path / "c.ckpt"
    moved.parent.mkdir()
    first.write_bytes(b"checkpoint one")
    moved.write_bytes(b"checkpoint one")
    other.write_bytes(b"checkpoint two")
    artifact = SimpleNamespace(key="k")
    inputs = SimpleNamespace(samples_artifact=artifact, gaussians=artifact, masks=artifact)
    keys = {
        "gaussians": lambda path: gaussians_spec(GaussiansCfg(reconstructor="mvsplat", mvsplat=MVSplatSettings(path)), "s").key,
        "masks": lambda path: masks_spec(MasksCfg(source="sam", sam=SamSettings(path)), "s").key,
        "train": lambda path: run_spec(TrainCfg(weights=str(path)), inputs).key,
    }
    for stage, key in keys.items():
        assert key(first) == key(moved), stage  # same bytes elsewhere: same artifact
        assert key(first) != key(other), stage  # other bytes at a path: another artifact
        time.sleep(0.01)
        first.write_bytes(b"checkpoint three")  # replaced in place: noticed, despite the in-process cache
        assert key(first) not in (key(moved), key(other)), stage
        first.write_bytes(b"checkpoint one")
    with pytest.raises(ConfigError, match=r"gaussians.mvsplat.checkpoint = .*missing.ckpt does not exist"):
        keys["gaussians"](tmp_path / "missing.ckpt")
    assert run_spec(TrainCfg(weights="embedded"), inputs).ingredients()["params"]["weights"] == "embedded"


def test_a_runs_key_holds_its_settings_never_the_device_it_trains_on():
    from types import SimpleNamespace

    from snd_stages.config import TrainCfg
    from snd_stages.artifacts.runs import run_spec

    artifact = SimpleNamespace(key="k")
    inputs = SimpleNamespace(samples_artifact=artifact, gaussians=artifact, masks=artifact)
    keys = {device: run_spec(TrainCfg(device=device, precision="auto"), inputs).key for device in ("auto", "cpu", "cuda")}
    assert len(set(keys.values())) == 1  # snd eval on a CPU finds the run a GPU trained
    assert run_spec(TrainCfg(steps=4000), inputs).key != keys["cpu"]  # what the run did is in its key


def test_large_inputs_are_known_by_size_and_time_so_a_same_size_rewrite_is_noticed(tmp_path):
    from snd_stages.scenes.layout import dataset_fingerprint
    from snd_stages.store import file_stamp

    scene = tmp_path / "scenes" / "s0"
    (scene / "depth").mkdir(parents=True)
    depth = scene / "depth" / "DSC00001.png"
    depth.write_bytes(b"depth one")
    os.utime(depth, ns=(1_000_000_000, 1_000_000_000))  # as if written long ago
    assert file_stamp(depth) == [9, 1_000_000_000]
    assert file_stamp(tmp_path / "missing.png") is None
    before = dataset_fingerprint(tmp_path, ["s0"])
    assert dataset_fingerprint(tmp_path, ["s0"]) == before

    depth.write_bytes(b"depth two")  # same byte count, other content
    assert depth.stat().st_size == 9 and dataset_fingerprint(tmp_path, ["s0"]) != before
    os.utime(depth, ns=(1_000_000_000, 1_000_000_000))
    assert dataset_fingerprint(tmp_path, ["s0"]) == before  # size and time are all it reads: documented
    (scene / "depth" / "DSC00002.png").write_bytes(b"")
    assert dataset_fingerprint(tmp_path, ["s0"]) != before  # a new file, even empty
