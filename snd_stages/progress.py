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
    show = counter(progress, description, total, unit)
    done = 0
    for item in items:
        yield item
        done += 1 if size is None else size(item)
        show(done)


def counter(progress: Progress | None, description: str, total: int | None, unit: str = "item") -> Callable[[int], None]:
    """A bar on ``progress`` (if given) and the function that sets how many ``unit`` are done, with a live rate
    (for work counted from outside, such as units other processes write)."""
    if progress is None:
        return lambda done: None
    task = progress.add_task(description, total=total, rate="")

    def show(done: int) -> None:
        progress.update(task, completed=done)
        speed = progress.tasks[task].speed
        if speed:
            progress.update(task, rate=f"{speed:.2f} {unit}/s")

    return show
