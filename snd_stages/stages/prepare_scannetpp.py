"""``snd prepare-scannetpp``: the official ScanNet++ release -> the layout ``data.dataset: scannetpp`` reads.

Usage::

    snd prepare-scannetpp --raw /data/scannetpp --out data/scannetpp [--shard i/n] [--set prepare_scannetpp.width=438]

What is written and checked is described in :mod:`snd_stages.scenes.scannetpp_release`. Scenes are the units of
work, ``prepare_scannetpp.workers`` at once: each is written to a hidden temporary folder beside ``scenes/<id>``
and renamed into place when complete (with its ``prepare_report.json``), so a killed run never leaves a scene that
reads as whole, and a rerun prepares only the rest. ``--shard i/n`` takes every n-th scene of the sorted list;
every run rewrites the split files to name all prepared scenes, so whichever shard ends last leaves them complete.
The release is only read.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.progress import Progress

from ..artifacts.protocol import Shard
from ..config import PrepareScannetppCfg
from ..errors import ConfigError, DataError
from ..progress import track
from ..runtime import in_processes, worker_count
from ..scenes.scannetpp_release import (
    REPORT,
    ClassList,
    SceneSkipped,
    prepare_scene,
    read_class_list,
    release_scene_ids,
    write_release_lists,
)
from ..store import atomic_directory

# Cores one scene keeps busy: open3d's ray casting and OpenCV's remapping are multi-threaded.
SCENE_THREADS = 2


@dataclass
class PrepareResult:
    """What one run did; ``reports`` holds each prepared scene's ``prepare_report.json``."""

    out: Path
    prepared: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # scene -> reason
    failed: dict[str, str] = field(default_factory=dict)  # scene -> what failed
    reports: dict[str, dict] = field(default_factory=dict)
    splits: dict[str, list[str]] = field(default_factory=dict)  # prepared scenes per split, all shards'
    seconds: float = 0.0

    @property
    def scenes_per_hour(self) -> float:
        return len(self.prepared) / self.seconds * 3600 if self.seconds > 0 else 0.0


def prepare_scannetpp(raw: Path, out: Path, cfg: PrepareScannetppCfg, shard: Shard = Shard(),
                      progress: Progress | None = None) -> PrepareResult:
    """Prepare this shard's scenes of the release ``raw`` under ``out`` (resuming); see the module docstring."""
    raw, out = Path(raw), Path(out)
    if out.resolve() == raw.resolve() or out.resolve().is_relative_to(raw.resolve()):
        raise ConfigError(f"--out {out} lies inside the release {raw}, which is never written to; choose a folder "
                          "outside it")
    splits = release_scene_ids(raw, cfg.splits)
    classes = read_class_list(raw, cfg)
    scene_ids = shard.select(sorted({scene for ids in splits.values() for scene in ids}))
    (out / "scenes").mkdir(parents=True, exist_ok=True)
    _remove_abandoned(out / "scenes", scene_ids)
    result = PrepareResult(out)
    result.resumed = [scene for scene in scene_ids if (out / "scenes" / scene / REPORT).is_file()]
    todo = [scene for scene in scene_ids if scene not in result.resumed]
    started = time.perf_counter()
    workers = worker_count(cfg.workers, len(todo), threads_per_worker=SCENE_THREADS)
    outcomes = in_processes(_prepare_one, [(raw, out, cfg, classes, scene) for scene in todo], workers)
    for scene, status, detail in track(outcomes, "preparing ScanNet++ scenes", progress, total=len(todo),
                                       unit="scene"):
        if status == "prepared":
            result.prepared.append(scene)
            result.reports[scene] = detail
        else:
            getattr(result, status)[scene] = detail
    result.seconds = time.perf_counter() - started
    result.splits = write_release_lists(out, splits, classes)
    return result


def _prepare_one(raw: Path, out: Path, cfg: PrepareScannetppCfg, classes: ClassList,
                 scene: str) -> tuple[str, str, dict | str]:
    """(scene, 'prepared' | 'skipped' | 'failed', report or reason); the scene folder appears only when complete."""
    try:
        with atomic_directory(out / "scenes" / scene) as folder:
            report = prepare_scene(raw, scene, folder, cfg, classes)
        return scene, "prepared", report
    except SceneSkipped as reason:
        return scene, "skipped", str(reason)
    except DataError as error:
        return scene, "failed", str(error)


def _remove_abandoned(scenes: Path, scene_ids: list[str]) -> None:
    """Temporary folders of this shard's scenes left by a killed run (their process is gone)."""
    for scene in scene_ids:
        for folder in scenes.glob(f".{scene}.tmp-*"):
            pid = int(folder.name.removeprefix(f".{scene}.tmp-").split("-")[0])
            if not _running(pid):
                shutil.rmtree(folder, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

