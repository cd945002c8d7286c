"""Integrity on read: a missing, truncated, altered or added file in a published artifact is a one-line error that
names the file and the command that rebuilds it, never zeros, and ``snd check-store`` lists it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from snd_stages import store as store_module
from snd_stages.errors import ArtifactError
from snd_stages.stages.check_store import check_store
from snd_stages.store import DATA, MANIFEST, UNIT_RECORD, ArtifactSpec, Store
from tests.test_bad_input import assert_one_line_error, precompute, with_train_section
from tests.test_cli import project, snd  # noqa: F401  (project is a fixture)

SPEC = ArtifactSpec("gaussians", 1, {"size": 3})


def published(root: Path) -> Store:
    """A gaussians artifact of two units; unit ``b``'s array has chunks of zeros, which Zarr does not write."""
    store = Store(root)
    writer = store.writer(SPEC, "config: {}\n")
    writer.prepare()
    for name, values in (("a", np.arange(24, dtype=np.float32)), ("b", np.r_[np.zeros(16), np.ones(8)].astype(np.float32))):
        with writer.unit(name) as group:
            group.create_array("means", shape=(24,), chunks=(8,), dtype="float32", fill_value=0.0)[...] = values
    writer.write_json("samples.json", {"samples": [1, 2, 3]})
    writer.finish(["a", "b"])
    return store


def unit_path(store: Store, name: str = "a") -> Path:
    return store.final_path(SPEC.stage, SPEC.key) / DATA / name


def chunk(store: Store, index: int = 1, name: str = "a") -> Path:
    return unit_path(store, name) / "means" / "c" / str(index)


def read(store: Store, name: str = "a", reader: str = "unit") -> np.ndarray:
    """Unit ``name``'s values through Artifact.unit (files verified, then read by Zarr) or Artifact.load_unit (read
    into memory, verified from the bytes read)."""
    return np.asarray(getattr(store.open(SPEC.stage, SPEC.key), reader)(name)["means"][...])


READERS = pytest.mark.parametrize("reader", ["unit", "load_unit"])


@pytest.fixture
def fresh(tmp_path) -> Store:
    return published(tmp_path / "store")


@READERS
def test_an_intact_artifact_reads_back_exactly(fresh, reader):
    np.testing.assert_array_equal(read(fresh, reader=reader), np.arange(24, dtype=np.float32))
    np.testing.assert_array_equal(read(fresh, "b", reader), np.r_[np.zeros(16), np.ones(8)])
    assert store_module.UNIT_RECORD in {path.name for path in unit_path(fresh).iterdir()}
    assert fresh.open(SPEC.stage, SPEC.key).read_json("samples.json") == {"samples": [1, 2, 3]}


@pytest.mark.parametrize(
    ("damage", "fragments"),
    [
        (lambda store: chunk(store).unlink(), ["means/c/1 is missing", "snd precompute-gaussians"]),
        (lambda store: chunk(store).write_bytes(chunk(store).read_bytes()[:5]), ["means/c/1 is truncated"]),
        (lambda store: chunk(store).write_bytes(bytes(len(chunk(store).read_bytes()))),
         ["means/c/1 was altered after it was written"]),
        # a chunk of zeros is not stored; one appearing later would change the values read
        (lambda store: chunk(store, 0, "b").write_bytes(chunk(store, 2, "b").read_bytes()),
         ["means/c/0 was not written by snd"]),
        (lambda store: (unit_path(store) / "means" / "zarr.json").write_text("{"), ["means/zarr.json is"]),
        (lambda store: (unit_path(store) / "means" / "zarr.json").write_text(
            (unit_path(store) / "means" / "zarr.json").read_text().replace("float32", "float64")),
         ["means/zarr.json was altered"]),
        (lambda store: (unit_path(store) / UNIT_RECORD).unlink(), [f"has no {UNIT_RECORD}"]),
        (lambda store: (unit_path(store) / UNIT_RECORD).write_text("[]"), [f"{UNIT_RECORD} is damaged"]),
    ],
    ids=["deleted chunk", "truncated chunk", "same-size edit", "added chunk", "corrupt array metadata",
         "edited dtype", "missing seal", "damaged seal"],
)
@READERS
def test_a_damaged_unit_is_an_error_naming_the_file_and_the_fix(fresh, damage, fragments, reader):
    name = "b" if "was not written" in fragments[0] else "a"
    damage(fresh)
    with pytest.raises(ArtifactError) as raised:
        read(fresh, name, reader)
    message = str(raised.value)
    assert "\n" not in message and "and rerun snd precompute-gaussians" in message
    for fragment in fragments:
        assert fragment in message
    # snd check-store finds the same damage
    result = check_store(fresh)
    assert [check.status for check in result.checks] == ["damaged"] and fragments[0] in result.damaged[0].detail


def test_damaged_documents_and_root_group_are_errors(fresh):
    artifact_path = fresh.final_path(SPEC.stage, SPEC.key)
    document = artifact_path / "samples.json"
    document.write_text(document.read_text().replace("3", "4"))  # same size, other values
    with pytest.raises(ArtifactError, match="samples.json was altered after it was written"):
        fresh.open(SPEC.stage, SPEC.key).read_json("samples.json")
    (artifact_path / DATA / "zarr.json").write_text("{}")
    with pytest.raises(ArtifactError, match="data.zarr/zarr.json is truncated"):
        fresh.open(SPEC.stage, SPEC.key)


def drop_from_manifest(store: Store, key: str) -> None:
    path = store.final_path(SPEC.stage, SPEC.key) / MANIFEST
    manifest = json.loads(path.read_text())
    del manifest[key]
    path.write_text(json.dumps(manifest))


def test_a_manifest_without_file_records_is_refused(fresh):
    drop_from_manifest(fresh, "files")
    with pytest.raises(ArtifactError, match="records no files"):
        fresh.open(SPEC.stage, SPEC.key)


def test_an_artifact_of_an_older_store_format_is_never_read(fresh):
    drop_from_manifest(fresh, "store_format")
    with pytest.raises(ArtifactError, match="store format None, this snd reads format 2"):
        fresh.open(SPEC.stage, SPEC.key)
    assert [check.status for check in check_store(fresh).checks] == ["older format"]


def test_a_unit_is_verified_once_per_process(fresh, monkeypatch):
    read(fresh)
    calls, checksum = [], store_module.file_checksum
    monkeypatch.setattr(store_module, "file_checksum", lambda path: calls.append(Path(path)) or checksum(path))
    read(fresh)  # verified already: no file of the unit is read again
    assert not [path for path in calls if unit_path(fresh) in path.parents]
    read(fresh, "b")  # not yet: each of its files is checked
    assert len([path for path in calls if unit_path(fresh, "b") in path.parents]) == len(
        store_module.file_records(unit_path(fresh, "b"), lambda name: name == UNIT_RECORD))


def test_check_store_lists_partial_and_leftover_directories(fresh, tmp_path):
    partial = fresh.writer(ArtifactSpec("masks", 1, {"other": 1}), "")
    partial.prepare()
    with partial.unit("scene0") as group:
        group.create_array("labels", shape=(2,), dtype="uint8")[...] = 1
    (fresh.root / "masks" / ".x.tmp-1-abc").mkdir()
    statuses = {(check.stage, check.status) for check in check_store(fresh).checks}
    assert statuses == {("gaussians", "ok"), ("masks", "incomplete"), ("masks", "leftover")}


def artifact_of(project: Path, stage: str) -> Path:
    return next(path for path in (project / "store" / stage).iterdir() if (path / MANIFEST).is_file())


def test_check_store_command_exits_1_on_damage(project):  # noqa: F811
    precompute(project)
    assert snd(project, "check-store").exit_code == 0
    gaussians = artifact_of(project, "gaussians")
    unit = sorted((gaussians / DATA).iterdir())[0]
    next(path for path in sorted(unit.rglob("*")) if path.is_file() and "c" in path.relative_to(unit).parts).unlink()
    assert_one_line_error(snd(project, "check-store"), "1 damaged artifact(s)", "is missing",
                          "rerun snd precompute-gaussians")


def test_commands_refuse_a_deleted_chunk_instead_of_reading_zeros(project, tmp_path):  # noqa: F811
    precompute(project)
    gaussians = artifact_of(project, "gaussians")
    means = sorted((gaussians / DATA).iterdir())[0] / "means" / "c"
    next(path for path in sorted(means.rglob("*")) if path.is_file()).unlink()
    pair = sorted((gaussians / DATA).iterdir())[0].name
    assert_one_line_error(snd(project, "export-ply", str(tmp_path / "out.ply"), "--pair", pair), "is missing",
                          "rerun snd precompute-gaussians")
    assert not (tmp_path / "out.ply").exists()
    assert_one_line_error(snd(project, "check-geometry", "--out", str(tmp_path / "pictures")), "is missing")


def test_training_refuses_a_deleted_operator_chunk(project):  # noqa: F811
    precompute(project)
    assert snd(project, "precompute-operators", "--set", "train.weights=random",
               "--set", "train.allow_random_weights=true").exit_code == 0
    operators = artifact_of(project, "operators")
    for unit in sorted(path for path in (operators / DATA).iterdir() if path.is_dir()):
        next(path for path in sorted(unit.rglob("*")) if path.is_file() and "c" in path.relative_to(unit).parts).unlink()
    with_train_section(project, "weights: random", "allow_random_weights: true", "steps: 1", "batch_size: 1")
    result = snd(project, "train")
    assert_one_line_error(result, "is missing", "rerun snd precompute-operators")
    assert not any((project / "runs").glob("*/student.safetensors"))
