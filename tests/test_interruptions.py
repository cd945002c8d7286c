"""A killed stage loses nothing: rerunning it gives exactly the artifact of an uninterrupted run, and nothing
partial ever reads as complete.

Each stage runs as the real ``snd`` command in a child process that SIGKILLs itself just before a chosen
rename (publishing a unit, a zarr chunk, a JSON document, the artifact or a checkpoint): the kill lands at the
same point on every machine, however busy, instead of wherever a poll happens to catch it. The rerun's artifact
is compared with one written without interruption into another store, by content (array values, dtypes,
shapes, attributes, documents, file names), not by timestamps.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file
from typer.testing import CliRunner

from snd_stages.cli import app
from snd_stages.config import dump_yaml
from snd_stages.pipeline import load_config
from snd_stages.errors import ArtifactError
from snd_stages.stages import precompute_gaussians as precompute_gaussians_module
from snd_stages.artifacts.protocol import Shard
from snd_stages.artifacts.gaussians import load_gaussians
from snd_stages.artifacts.masks import load_masks
from snd_stages.artifacts.samples import load_samples
from snd_stages.artifacts.runs import latest_checkpoint
from snd_stages.store import DATA, MANIFEST, ArtifactSpec, Store, atomic_directory
from tests import test_train
from tests.conftest import build_demo_artifacts
from tests.test_bad_input import assert_one_line_error
from tests.test_pipeline import run_cli, tiny_config
from tests.test_train import config as train_config
from tests.test_train import run


project = test_train.project  # fixture: tiny demo data and every input of a training run

# The real CLI, in a process that kills itself just before its `count`-th rename onto, or opening for writing of, a
# path matching `pattern`.
KILLED_CLI = textwrap.dedent(
    """
    import os, re, signal, sys
    pattern, count, seen = re.compile(sys.argv[1]), int(sys.argv[2]), 0

    def kill_before_writing(event, args):
        global seen
        if event == "os.rename":
            path = args[1]
        elif event == "open" and isinstance(args[1], str) and "w" in args[1] and not isinstance(args[0], int):
            path = args[0]
        else:
            return
        if pattern.search(os.fsdecode(path)):
            seen += 1
            if seen == count:
                os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(kill_before_writing)
    sys.argv = ["snd", *sys.argv[3:]]
    from snd_stages.cli import main
    main()
    """
)


def run_killed(args: list[str], cwd: Path, pattern: str, count: int = 1) -> None:
    child = subprocess.run([sys.executable, "-c", KILLED_CLI, pattern, str(count), *args], cwd=cwd,
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == -signal.SIGKILL, f"not killed at {pattern!r} #{count}:\n{child.stdout}{child.stderr}"


def run_to_end(args: list[str], cwd: Path) -> str:
    child = run_cli(args, cwd)
    output = child.communicate(timeout=600)[0]
    assert child.returncode == 0, output
    return output


def artifact_digest(path: Path) -> dict[str, object]:
    """An artifact's content by part: its file names, each Zarr group's attributes and each array's dtype, shape,
    attributes and values, the other files' bytes, and the manifest without its creation time."""
    path = Path(path)
    digest: dict[str, object] = {"files": sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())}
    for file in sorted(path.iterdir()):
        if file.name == MANIFEST:
            digest[MANIFEST] = {k: v for k, v in json.loads(file.read_text()).items() if k != "created"}
        elif file.is_file():
            digest[file.name] = hashlib.sha256(file.read_bytes()).hexdigest()
    if (path / DATA).is_dir():
        root = zarr.open_group(store=str(path / DATA), mode="r")
        digest[DATA] = json.dumps(dict(root.attrs), sort_keys=True)
        for name, node in root.members(max_depth=None):
            content = hashlib.sha256(json.dumps(dict(node.attrs), sort_keys=True).encode())
            if isinstance(node, zarr.Array):
                values = np.ascontiguousarray(node[...])
                content.update(f"{values.dtype.str}{values.shape}".encode())
                content.update(values.tobytes())
            digest[f"{DATA}/{name}"] = content.hexdigest()
    return digest


def only_artifact(store: Path, stage: str) -> Path:
    (path,) = [p for p in (store / stage).iterdir() if not p.name.startswith(".")]
    return path


# ---------------------------------------------------------------------------------------------------------------
# The precompute stages, on two demo scenes (so the masks have two units)


@pytest.fixture(scope="module")
def reference(module_tmp_path) -> Path:
    """Demo data, and every precompute artifact written without interruption into ``<root>/store``."""
    root = module_tmp_path / "interruptions"
    cfg = tiny_config(root, "demo.train_scenes=2")
    build_demo_artifacts(cfg, operators=False)
    return root


def fresh_store(reference: Path, directory: Path, with_samples: bool = True) -> Path:
    """A pipeline.yaml for the reference's data and a store of its own (holding a copy of the samples)."""
    directory.mkdir()
    cfg = tiny_config(reference, "demo.train_scenes=2", f"store.root={directory / 'store'}",
                      f"train.runs_root={directory / 'runs'}")
    (directory / "pipeline.yaml").write_text(dump_yaml(cfg))
    if with_samples:
        shutil.copytree(reference / "store" / "samples", directory / "store" / "samples")
    return directory


def loaders(directory: Path):
    """The read functions later stages use, for the store of ``directory``."""
    cfg = load_config(directory / "pipeline.yaml")
    store = Store(cfg.store.root)
    return {
        "samples": lambda: load_samples(store, cfg.data, cfg.sampling),
        "gaussians": lambda: load_gaussians(store, cfg.gaussians, load_samples(store, cfg.data, cfg.sampling)[0].key),
        "masks": lambda: load_masks(store, cfg.masks, load_samples(store, cfg.data, cfg.sampling)[0].key),
    }


@pytest.mark.parametrize(
    ("command", "stage", "pattern", "count"),
    [
        # after the root group, before samples.json is in place
        ("sample-views", "samples", r"\.partial/samples\.json$", 1),
        # in the middle of the second context pair's chunks (one pair finished; three chunk files a pair)
        ("precompute-gaussians", "gaussians", r"\.partial/tmp/.*/c/", 5),
        # every unit and the manifest written, the artifact not yet renamed into place
        ("precompute-gaussians", "gaussians", r"gaussians/[0-9a-f]{20}$", 1),
        # the first scene finished, the second one written but not yet published
        ("precompute-masks", "masks", r"\.partial/data\.zarr/[^/]+$", 2),
    ],
    ids=["sample-views", "gaussians-mid-unit", "gaussians-before-publishing", "masks-between-units"],
)
@pytest.mark.slow
def test_killed_stage_resumes_to_the_uninterrupted_artifact(reference, tmp_path, command, stage, pattern, count):
    directory = fresh_store(reference, tmp_path / "interrupted", with_samples=stage != "samples")
    args = [command, "--config", str(directory / "pipeline.yaml")]
    run_killed(args, directory, pattern, count)

    partial = only_artifact(directory / "store", stage)
    assert partial.name.endswith(".partial")  # and no artifact beside it
    with pytest.raises(ArtifactError, match="incomplete.*rerun snd"):
        loaders(directory)[stage]()  # what the next stage reads refuses the partial artifact
    kept = len([p for p in (partial / DATA).iterdir() if (p / "zarr.json").is_file()])

    output = run_to_end(args, directory)
    assert "wrote" in output, output
    assert not kept or f"kept {kept} finished unit" in output, output
    resumed = only_artifact(directory / "store", stage)
    assert artifact_digest(resumed) == artifact_digest(only_artifact(reference / "store", stage))
    loaders(directory)[stage]()
    assert "up to date" in run_to_end(args, directory)


@pytest.mark.slow
def test_two_shards_at_once_write_the_artifact_of_one_process(reference, tmp_path):
    directory = fresh_store(reference, tmp_path / "sharded")
    args = ["precompute-gaussians", "--config", str(directory / "pipeline.yaml")]
    shards = [run_cli([*args, "--shard", f"{index}/2"], directory) for index in range(2)]
    outputs = [shard.communicate(timeout=600)[0] for shard in shards]
    assert [shard.returncode for shard in shards] == [0, 0], outputs
    assert any("wrote" in output for output in outputs), outputs
    assert [p.name for p in (directory / "store" / "gaussians").iterdir() if not p.name.startswith(".")] == [
        only_artifact(reference / "store", "gaussians").name
    ]  # published once, no partial directory left behind
    assert artifact_digest(only_artifact(directory / "store", "gaussians")) == artifact_digest(
        only_artifact(reference / "store", "gaussians")
    )


def test_the_publishing_shard_counts_the_units_another_shard_finished_meanwhile(reference, tmp_path, monkeypatch):
    """Shard 1 writes its last unit between shard 0's last unit and shard 0's publishing: the manifest's totals
    must still cover every unit (a total taken before the completeness check would miss shard 1's)."""
    directory = fresh_store(reference, tmp_path / "interleaved")
    cfg = tiny_config(reference, "demo.train_scenes=2", f"store.root={directory / 'store'}")
    store = Store(cfg.store.root)
    publish = precompute_gaussians_module.finish_if_complete

    def shard_one_lands_first(writer, expected_units, counts):
        monkeypatch.setattr(precompute_gaussians_module, "finish_if_complete", lambda *args: None)
        precompute_gaussians_module.precompute_gaussians(cfg.data, cfg.sampling, cfg.gaussians, store,
                                                         shard=Shard(1, 2))  # its units only; it stops there
        return publish(writer, expected_units, counts)

    monkeypatch.setattr(precompute_gaussians_module, "finish_if_complete", shard_one_lands_first)
    precompute_gaussians_module.precompute_gaussians(cfg.data, cfg.sampling, cfg.gaussians, store, shard=Shard(0, 2))
    manifest = json.loads((only_artifact(directory / "store", "gaussians") / MANIFEST).read_text())
    expected = json.loads((only_artifact(reference / "store", "gaussians") / MANIFEST).read_text())
    assert manifest["counts"] == expected["counts"] and manifest["units"] == expected["units"]


def test_a_unit_published_meanwhile_by_another_writer_is_kept(tmp_path, monkeypatch):
    final = tmp_path / "data.zarr" / "unit"
    final.parent.mkdir()
    rename = os.rename

    def another_writer_wins(source, target):
        if Path(target) == final:  # the other shard's rename lands just before ours
            final.mkdir()
            (final / "zarr.json").write_text("theirs")
        rename(source, target)

    monkeypatch.setattr(os, "rename", another_writer_wins)
    with atomic_directory(final, scratch=tmp_path / "tmp") as ours:
        (ours / "zarr.json").write_text("ours")
    assert (final / "zarr.json").read_text() == "theirs" and not list((tmp_path / "tmp").iterdir())


def test_a_shard_finding_the_artifact_published_meanwhile_reads_it_there(tmp_path):
    store, spec = Store(tmp_path), ArtifactSpec("toy", 1, {})
    late, last = store.writer(spec, ""), store.writer(spec, "")
    late.prepare()
    for writer, name in ((late, "a"), (last, "b")):
        with writer.unit(name) as group:
            group.attrs["count"] = len(name)
    last.finish(expected_units=["a", "b"])  # renames the partial directory away under the late shard
    assert late.done_units() == {"a", "b"} and late.unit_attributes("a") == {"count": 1}
    assert late.finish(expected_units=["a", "b"]).units() == ["a", "b"]


# ---------------------------------------------------------------------------------------------------------------
# What the next stage reads must be complete, whoever left the directory


def broken_copy(reference: Path, directory: Path, stage: str, damage) -> Path:
    fresh_store(reference, directory, with_samples=False)
    shutil.copytree(reference / "store", directory / "store")
    damage(only_artifact(directory / "store", stage))
    return directory


def units(path: Path) -> list[Path]:
    return sorted(p for p in (path / DATA).iterdir() if p.is_dir())


def drop_manifest(path: Path) -> None:
    (path / MANIFEST).unlink()


def drop_unit(path: Path) -> None:
    shutil.rmtree(units(path)[-1])


def add_unit(path: Path) -> None:
    shutil.copytree(units(path)[0], path / DATA / "demo9999")


@pytest.mark.parametrize(
    ("stage", "damage", "fragments"),
    [
        ("gaussians", drop_manifest, ["has no manifest.json", "not a complete artifact", "snd precompute-gaussians"]),
        ("masks", drop_unit, ["holds 1 finished unit(s) but its manifest counts 2", "snd precompute-masks"]),
        ("gaussians", add_unit, ["finished unit(s) but its manifest counts", "delete"]),
    ],
    ids=["units-without-manifest", "unit-lost", "unit-added"],
)
def test_next_stage_refuses_an_artifact_that_does_not_match_its_manifest(reference, tmp_path, stage, damage,
                                                                         fragments):
    directory = broken_copy(reference, tmp_path / "broken", stage, damage)
    path = only_artifact(directory / "store", stage)
    with pytest.raises(ArtifactError, match="delete"):
        loaders(directory)[stage]()
    result = CliRunner().invoke(app, ["train", "--config", str(directory / "pipeline.yaml")])
    assert_one_line_error(result, str(path), *fragments)
    producer = "precompute-gaussians" if stage == "gaussians" else "precompute-masks"
    again = CliRunner().invoke(app, [producer, "--config", str(directory / "pipeline.yaml")])
    assert_one_line_error(again, str(path))  # refused before any work, not overwritten or half-merged


# ---------------------------------------------------------------------------------------------------------------
# Training, killed while writing a checkpoint


@pytest.mark.slow
def test_training_killed_while_checkpointing_resumes_to_the_same_weights(project, tmp_path):
    settings = ("train.steps=2", "train.checkpoint_every=1", "train.keep_checkpoints=2")
    straight = run(project, *settings, f"train.runs_root={tmp_path / 'straight'}")
    cfg = train_config(project, *settings, f"train.runs_root={tmp_path / 'killed'}")
    (tmp_path / "pipeline.yaml").write_text(dump_yaml(cfg))
    args = ["train", "--config", str(tmp_path / "pipeline.yaml")]

    run_killed(args, tmp_path, r"checkpoints/step-000002\.pt$")  # the last checkpoint written, not yet renamed
    run_dir = tmp_path / "killed" / straight.run_dir.name
    checkpoints = run_dir / "checkpoints"
    leftover, kept = sorted(p.name for p in checkpoints.iterdir())
    assert leftover.startswith(".step-000002.pt.tmp-") and kept == "step-000001.pt"  # a name of its own process
    assert not (run_dir / "manifest.json").exists()
    assert latest_checkpoint(run_dir) == checkpoints / "step-000001.pt"  # the leftover is never picked...
    assert not (checkpoints / leftover).exists()  # ...and is cleaned up
    (checkpoints / leftover).write_bytes(b"half a checkpoint")  # as the killed run left it

    output = run_to_end(args, tmp_path)
    assert "resumed at step 1" in output, output
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000001.pt", "step-000002.pt"]
    for name in ("student.safetensors", "teacher.safetensors"):
        ours, theirs = load_file(run_dir / name), load_file(straight.run_dir / name)
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)
    assert json.loads((run_dir / "manifest.json").read_text()) == json.loads(
        (straight.run_dir / "manifest.json").read_text())
    ours = torch.load(checkpoints / "step-000002.pt", weights_only=True)
    theirs = torch.load(straight.run_dir / "checkpoints" / "step-000002.pt", weights_only=True)
    assert ours.keys() == theirs.keys() and ours["scheduler"] == theirs["scheduler"]
    for key in ("model", "optimizer", "rng_cpu", "step"):
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)
