"""``snd check-store``: verify every artifact of a store, file by file, and list what is damaged.

Each artifact is opened as a reader opens it (:meth:`snd_stages.store.Store.open`: a complete manifest that agrees
with the directory), then every unit's files are checked against the unit's seal and every other file against the
manifest's records (sizes and CRC32C, :mod:`snd_stages.store`). Partial artifacts (an interrupted or sharded run
still writing) and artifacts of an older store format are listed as such; neither is read by any stage.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from rich.progress import Progress

from ..errors import ArtifactError
from ..progress import track
from ..store import DATA, MANIFEST, STORE_FORMAT, Store, list_units, producer


@dataclass(frozen=True)
class ArtifactCheck:
    """One directory of the store and what its check found.

    Attributes:
        path: the artifact's directory.
        stage: the stage it belongs to.
        status: ``ok``, ``damaged``, ``incomplete`` (still being written, or interrupted), ``older format``, or
            ``leftover`` (a killed write's temporary directory).
        detail: what was found, and what to do about it.
        units: finished units.
        size: bytes of its files.
    """

    path: Path
    stage: str
    status: str
    detail: str
    units: int
    size: int


@dataclass(frozen=True)
class StoreCheck:
    checks: list[ArtifactCheck]
    seconds: float

    @property
    def damaged(self) -> list[ArtifactCheck]:
        return [check for check in self.checks if check.status == "damaged"]

    @property
    def verified_bytes(self) -> int:
        return sum(check.size for check in self.checks if check.status in ("ok", "damaged"))


def check_store(store: Store, progress: Progress | None = None) -> StoreCheck:
    """Check every directory under the store's stage folders (see the module docstring)."""
    started = time.perf_counter()
    entries = []
    if store.root.is_dir():
        for stage_path in sorted(path for path in store.root.iterdir() if path.is_dir()):
            entries += [(stage_path.name, path) for path in sorted(stage_path.iterdir()) if path.is_dir()]
    checks = [_check(store, stage, path) for stage, path in track(entries, "checking artifacts", progress,
                                                                   unit="artifact")]
    return StoreCheck(checks, time.perf_counter() - started)


def _check(store: Store, stage: str, path: Path) -> ArtifactCheck:
    size = sum(file.stat().st_size for file in path.rglob("*") if file.is_file())
    if path.name.startswith("."):
        return ArtifactCheck(path, stage, "leftover", "a killed write's temporary directory; safe to delete", 0, size)
    if path.name.endswith(".partial"):
        units = len(list_units(path / DATA))
        return ArtifactCheck(path, stage, "incomplete",
                             f"{units} unit(s) finished; rerun {producer(stage)} (every shard) to finish it, or delete "
                             "it", units, size)
    units = len(list_units(path / DATA))
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        manifest = None
    if isinstance(manifest, dict) and manifest.get("complete") and manifest.get("store_format") != STORE_FORMAT:
        return ArtifactCheck(path, stage, "older format",
                             f"store format {manifest.get('store_format')}: this snd never reads it; delete it to free "
                             "the space", units, size)
    try:
        store.open(stage, path.name).verify()
    except ArtifactError as error:
        return ArtifactCheck(path, stage, "damaged", str(error), units, size)
    return ArtifactCheck(path, stage, "ok", "", units, size)
