"""What every producer of an artifact shares: reuse a complete artifact, resume a partial one, or build it.

:func:`producing` is the one mechanism. It returns a complete artifact at once; otherwise it holds the right to
write it (:meth:`~snd_stages.store.Store.writing`), says what changed against the newest artifact of the stage,
resumes the units an interrupted run finished, and, when the build fails before finishing any unit, leaves no empty
``<key>.partial`` behind. :func:`run_stage` wraps it for a stage that builds one artifact; the feature and
ground-truth caches of ``snd eval`` enter it directly, several artifacts at once.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass, field
from typing import Callable, Iterator

from rich.progress import Progress

from ..errors import ConfigError
from ..progress import counter
from ..store import Artifact, ArtifactSpec, ArtifactWriter, Store
from ..throughput import in_unit_processes


@dataclass(frozen=True)
class StageResult:
    """What a stage did.

    Attributes:
        artifact: the complete output; None when this shard is done but other shards still have units to write.
        skipped: True when an artifact with the same key already existed and nothing was recomputed.
        changes: when recomputed, what differs from the newest earlier artifact of the stage (one line each).
        resumed_units: units found finished by an interrupted earlier run and kept.
        pending_units: units other shards still have to write.
    """

    artifact: Artifact | None
    skipped: bool
    changes: list[str] = field(default_factory=list)
    resumed_units: int = 0
    pending_units: int = 0


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


@dataclass
class Production:
    """One artifact being obtained: either ``reused`` (complete, in ``artifact``) or written through ``writer``.

    Attributes:
        changes: when written, what differs from the newest earlier artifact of the stage (one line each).
        resumed_units: units an interrupted earlier run finished, which are kept.
    """

    spec: ArtifactSpec
    artifact: Artifact | None = None
    writer: ArtifactWriter | None = None
    changes: list[str] = field(default_factory=list)
    resumed_units: int = 0

    @property
    def reused(self) -> bool:
        return self.writer is None

    @property
    def status(self) -> str:
        """``reused``, ``resumed`` (some units were left by an interrupted run) or ``computed``."""
        return "reused" if self.reused else "resumed" if self.resumed_units else "computed"


@contextlib.contextmanager
def producing(store: Store, spec: ArtifactSpec, config_yaml: str, force: bool = False,
              shard: Shard | None = None) -> Iterator[Production]:
    """Obtain the artifact of ``spec``: a complete one is yielded as is (``reused``); otherwise this process holds
    the artifact (or its ``shard``) against an identical command while the block writes it through ``writer``.

    A failure before any unit was finished leaves nothing worth resuming, so the empty ``<key>.partial`` is removed
    (only where this process is the artifact's one writer).
    """
    if store.final_path(spec.stage, spec.key).exists() and not force:
        # Reused if complete; a broken one (no manifest, units added or lost, another schema) is refused here,
        # before any work, with what to do about it.
        yield Production(spec, artifact=store.open(spec.stage, spec.key, spec.schema_version))
        return
    shard = shard or Shard()
    with store.writing(spec, (shard.index, shard.count)):
        if store.exists(spec) and not force:  # the command that held it just published it
            yield Production(spec, artifact=store.open(spec.stage, spec.key, spec.schema_version))
            return
        changes = store.describe_changes(spec)
        writer = store.writer(spec, config_yaml, force=force)
        production = Production(spec, writer=writer, changes=changes, resumed_units=len(writer.done_units()))
        try:
            yield production
        except BaseException:
            if shard.count == 1 and not writer.done_units():
                shutil.rmtree(writer.partial, ignore_errors=True)
            raise


def run_stage(
    store: Store,
    spec: ArtifactSpec,
    config_yaml: str,
    force: bool,
    build: Callable[[ArtifactWriter], Artifact | None],
    expected_units: int | None = None,
    shard: Shard | None = None,
) -> StageResult:
    """Return the existing artifact of ``spec`` or build it with ``build(writer)`` (resuming a partial one).

    ``build`` returns None when it wrote its shard's units but others are still missing.
    """
    with producing(store, spec, config_yaml, force, shard) as production:
        if production.reused:
            return StageResult(production.artifact, skipped=True)
        artifact = build(production.writer)
    done = len(production.writer.done_units())
    pending = 0 if artifact is not None or expected_units is None else expected_units - done
    return StageResult(artifact, skipped=False, changes=production.changes, resumed_units=production.resumed_units,
                       pending_units=pending)


def finish_if_complete(
    writer: ArtifactWriter, expected_units: list[str], counts: Callable[[], dict]
) -> Artifact | None:
    """Publish the artifact when every unit is present (whichever shard gets here last); None while shards run.

    ``counts`` is called only when publishing (see :meth:`ArtifactWriter.finish`).
    """
    if set(expected_units) - writer.done_units():
        return None
    return writer.finish(expected_units=expected_units, counts=counts)


def produce_units(write: Callable[..., None], arguments: tuple, writer: ArtifactWriter, todo: list[str],
                  processes: int, progress: Progress | None, description: str, unit: str) -> None:
    """``write(*arguments, todo, progress, description)``, which writes the units ``todo`` through ``writer``: here
    when ``processes`` is 1, else split over that many worker processes
    (:func:`~snd_stages.throughput.in_unit_processes`), the bar counting the units they have finished."""
    if processes == 1:
        write(*arguments, todo, progress, description)
        return
    show, before = counter(progress, description, len(todo), unit=unit), len(writer.done_units())
    in_unit_processes(write, arguments, todo, processes, poll=lambda: show(len(writer.done_units()) - before))
