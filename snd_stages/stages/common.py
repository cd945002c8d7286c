"""What every stage shares: the skip / resume / force protocol around the artifact store."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from typing import Callable

from ..errors import ConfigError
from ..store import Artifact, ArtifactSpec, ArtifactWriter, Store


@dataclass(frozen=True)
class StageResult:
    """What a stage did.

    Attributes:
        artifact: the complete output; None when this shard is done but other shards still have units to write.
        skipped: True when an artifact with the same key already existed and nothing was recomputed.
        changes: when recomputed, what differs from the newest earlier artifact of the stage (one line each).
        resumed_units: units found finished by an interrupted earlier run and kept.
    """

    artifact: Artifact | None
    skipped: bool
    changes: list[str] = field(default_factory=list)
    resumed_units: int = 0
    pending_units: int = 0


def run_stage(
    store: Store,
    spec: ArtifactSpec,
    config_yaml: str,
    force: bool,
    build: Callable[[ArtifactWriter], Artifact | None],
    expected_units: int | None = None,
    shard: "Shard | None" = None,
) -> StageResult:
    """Return the existing artifact of ``spec`` or build it with ``build(writer)`` (resuming a partial one).

    ``build`` returns None when it wrote its shard's units but others are still missing. While it runs, this
    process holds the artifact (or its ``shard``) against an identical command (:meth:`Store.writing`).
    """
    if store.final_path(spec.stage, spec.key).exists() and not force:
        # Reused if complete; a broken one (no manifest, units added or lost, another schema) is refused here,
        # before any work, with what to do about it.
        return StageResult(store.open(spec.stage, spec.key, spec.schema_version), skipped=True)
    shard = shard or Shard()
    with store.writing(spec, (shard.index, shard.count)):
        if store.exists(spec) and not force:  # the command that held it just published it
            return StageResult(store.open(spec.stage, spec.key, spec.schema_version), skipped=True)
        changes = store.describe_changes(spec)
        writer = store.writer(spec, config_yaml, force=force)
        resumed = len(writer.done_units())
        try:
            artifact = build(writer)
        except BaseException:
            # A failure before any unit was finished leaves nothing worth resuming: no empty <key>.partial behind
            # (only where this process is the artifact's one writer).
            if shard.count == 1 and not writer.done_units():
                shutil.rmtree(writer.partial, ignore_errors=True)
            raise
    pending = 0 if artifact is not None or expected_units is None else expected_units - len(writer.done_units())
    return StageResult(artifact, skipped=False, changes=changes, resumed_units=resumed, pending_units=pending)


@dataclass(frozen=True)
class Shard:
    """This process's share of a stage's units: unit ``k`` (in sorted order) belongs to shard ``k mod count``."""

    index: int = 0
    count: int = 1

    @staticmethod
    def parse(text: str | None) -> "Shard":
        """``"i/n"`` (0-based i) -> Shard; None -> the whole job."""
        if text is None:
            return Shard()
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise ConfigError(f"--shard {text!r} must look like i/n, e.g. 0/4 for the first of four shards") from None
        if count < 1 or not 0 <= index < count:
            raise ConfigError(f"--shard {text!r}: need 0 <= i < n")
        return Shard(index, count)

    def allow_force(self, force: bool) -> None:
        """``--force`` deletes the whole artifact, which would destroy the other shards' work."""
        if force and self.count > 1:
            raise ConfigError("--force deletes the whole artifact, so it cannot be combined with --shard; run it unsharded")

    def select(self, units: list[str]) -> list[str]:
        return [unit for position, unit in enumerate(sorted(units)) if position % self.count == self.index]


def finish_if_complete(
    writer: ArtifactWriter, expected_units: list[str], counts: Callable[[], dict]
) -> Artifact | None:
    """Publish the artifact when every unit is present (whichever shard gets here last); None while shards run.

    ``counts`` is called only when publishing (see :meth:`ArtifactWriter.finish`).
    """
    if set(expected_units) - writer.done_units():
        return None
    return writer.finish(expected_units=expected_units, counts=counts)
