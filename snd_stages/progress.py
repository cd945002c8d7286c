"""Progress reporting that stages accept optionally: the CLI passes a rich ``Progress``, tests pass nothing."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence, TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")


def make_progress() -> Progress:
    """The progress display used by every command."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )


def track(items: Sequence[T] | Iterable[T], description: str, progress: Progress | None, total: int | None = None,
          unit: str = "item", size: Callable[[T], int] | None = None) -> Iterator[T]:
    """Yield ``items``, advancing a bar on ``progress`` (if given) with a live ``unit``/s rate; ``size``: how many
    units an item holds (default: one)."""
    if progress is None:
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    task = progress.add_task(description, total=total, rate="")
    for item in items:
        yield item
        progress.advance(task, 1 if size is None else size(item))
        speed = progress.tasks[task].speed
        if speed:
            progress.update(task, rate=f"{speed:.2f} {unit}/s")
