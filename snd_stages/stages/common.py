"""What every stage shares: the skip / resume / force protocol around the artifact store."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..store import Artifact, ArtifactSpec, ArtifactWriter, Store


@dataclass(frozen=True)
class StageResult:
    """What a stage did.

    Attributes:
        artifact: the complete output.
        skipped: True when an artifact with the same key already existed and nothing was recomputed.
        changes: when recomputed, what differs from the newest earlier artifact of the stage (one line each).
        resumed_units: units found finished by an interrupted earlier run and kept.
    """

    artifact: Artifact
    skipped: bool
    changes: list[str] = field(default_factory=list)
    resumed_units: int = 0


def run_stage(
    store: Store,
    spec: ArtifactSpec,
    config_yaml: str,
    force: bool,
    build: Callable[[ArtifactWriter], Artifact],
) -> StageResult:
    """Return the existing artifact of ``spec`` or build it with ``build(writer)`` (resuming a partial one)."""
    if store.exists(spec) and not force:
        return StageResult(store.open(spec.stage, spec.key, spec.schema_version), skipped=True)
    changes = store.describe_changes(spec)
    writer = store.writer(spec, config_yaml, force=force)
    resumed = len(writer.done_units())
    return StageResult(build(writer), skipped=False, changes=changes, resumed_units=resumed)
