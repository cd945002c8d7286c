"""Keeping the machine busy in the stages around training: reading, computing and writing units at once, and
recording where each stage's time goes.

:func:`overlapped` runs a stage's units as a three-step pipeline: inputs are read (files decoded, stored units
loaded) by threads running ahead, units are computed in the calling thread in order, one or several per call (the
GPU's one stream, or the CPU's threads through torch), and results are written (packed, compressed, sealed,
renamed) by threads behind it.
Decoding PNGs, reading Zarr chunks and compressing them release the GIL, so the three overlap. What a unit stores
does not depend on the overlap: every unit is written whole by one writer, as it would be serially.

:func:`phase` records wall time per named phase (``read``, ``compute``, ``write``, ``publish``) into the recorder
that :func:`recording` installs; ``benchmarks/stages.py`` prints them. Without a recorder it costs nothing.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TypeVar

from .runtime import available_cores, process_pool

Item = TypeVar("Item")


@dataclass
class Phases:
    """Seconds spent in each phase, summed over units and threads (overlapped phases can add up to more than the
    wall time), and how many units each phase handled."""

    seconds: dict[str, float] = field(default_factory=lambda: collections.defaultdict(float))
    counts: dict[str, int] = field(default_factory=lambda: collections.defaultdict(int))
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, seconds: float, count: int = 1) -> None:
        with self.lock:
            self.seconds[name] += seconds
            self.counts[name] += count


_recorder: Phases | None = None
_overlap = True


@contextlib.contextmanager
def recording() -> Iterator[Phases]:
    """Record the phases of whatever runs inside the block (in any thread)."""
    global _recorder
    previous, _recorder = _recorder, Phases()
    try:
        yield _recorder
    finally:
        _recorder = previous


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    recorder = _recorder
    if recorder is None:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        recorder.add(name, time.perf_counter() - start)


def timed(name: str, function: Callable) -> Callable:
    """``function``, its calls recorded as phase ``name``."""
    def call(*args, **kwargs):
        with phase(name):
            return function(*args, **kwargs)
    return call


@contextlib.contextmanager
def serial() -> Iterator[None]:
    """Inside the block, :func:`overlapped` runs every step in the calling thread, one unit after the other (to
    measure what the overlap gains, or to debug)."""
    global _overlap
    previous, _overlap = _overlap, False
    try:
        yield
    finally:
        _overlap = previous


def overlapping() -> bool:
    """False inside :func:`serial`: stages then also take their units one at a time (no batches)."""
    return _overlap


# Below this many cores, a stage that computes on the CPU runs serially: torch's own threads already use every
# core there, and reading and writing beside them slowed the CPU operators stage by a quarter on 2 cores.
CORES_TO_SPARE_FOR_IO = 8


def io_threads(compute_device: str = "cuda", cores: int | None = None) -> int:
    """Threads for each of reading and writing beside a stage computing on ``compute_device`` (0: none, run
    serially) in a process with ``cores`` cores (default: this one's): enough to keep one computing thread fed,
    never more than the cores."""
    cores = available_cores() if cores is None else cores
    if compute_device == "cpu":
        return 0 if cores < CORES_TO_SPARE_FOR_IO else max(1, cores // CORES_TO_SPARE_FOR_IO)
    # Beside a GPU, writing is the slowest step (compressing a 192x256 pair of Gaussians takes about 50 ms of CPU):
    # half the cores read and write, up to 8 threads each.
    return max(1, min(8, cores // 2))


# On a GPU a small unit's cost is its computing call's launches and synchronisations, so consecutive units share a
# call, up to this many pixels (a call's intermediates then stay within a few GB: the depth Gaussians' float64 ones,
# the operators' sparse matrices). On the CPU a unit costs its arithmetic and a call of many only multiplies the
# memory (the torch renderer's intermediates for 32 demo samples at once took over 17 GB): one unit per call there.
PIXELS_PER_CALL = 1 << 21
BATCHED_DEVICES = ("cuda",)


def units_per_call(compute_device: str, pixels_per_unit: int, most: int) -> int:
    """How many consecutive units one computing call on ``compute_device`` takes: as many as fit in
    :data:`PIXELS_PER_CALL`, at most ``most``, at least one; one off :data:`BATCHED_DEVICES` and inside
    :func:`serial`."""
    if not _overlap or compute_device not in BATCHED_DEVICES:
        return 1
    return max(1, min(most, PIXELS_PER_CALL // pixels_per_unit))


# Beside a GPU, a stage computes its units in one process per this many cores: a unit's reading and writing is
# Python (Zarr, decoding), and the threads of one process share its interpreter lock. On an H100 machine the demo's
# 160 reconstructions took 3.3 s of compute serially and 10.8 s beside 16 reading and writing threads.
CORES_PER_UNIT_PROCESS = 4
# Fewer units than this per process do not pay for starting one: in the ablation job on an H200 (12 processes of
# about 90 units each, --shard i/12) each process computed 10 units/s once started, about 9 s of work, but the stage
# took 33 s: the rest was interpreters, torch and CUDA contexts starting. Processes forked from the fork server skip
# the interpreters and imports (runtime.process_pool); the count stays until a GPU run measures what is left.
MIN_UNITS_PER_PROCESS = 100


def unit_processes(requested: int, units: int, compute_device: str = "cuda", shards: int = 1) -> int:
    """How many processes compute a stage's ``units``: ``requested`` (at most one per unit), or where it is 0, one
    per :data:`CORES_PER_UNIT_PROCESS` cores beside a GPU and one on the CPU (torch's threads already use every core
    there), as long as each keeps :data:`MIN_UNITS_PER_PROCESS` units; one in a shard of several (``--shard i/n``
    already divides the machine) and inside :func:`serial`."""
    if not _overlap:
        return 1
    if requested:
        return max(1, min(requested, units))
    if compute_device == "cpu" or shards > 1:
        return 1
    return max(1, min(available_cores() // CORES_PER_UNIT_PROCESS, units // MIN_UNITS_PER_PROCESS))


def in_unit_processes(function: Callable[..., None], arguments: tuple, units: list[Item], processes: int,
                      poll: Callable[[], None] = lambda: None, every: float = 0.5) -> None:
    """``function(*arguments, share)`` for ``processes`` consecutive shares of ``units`` (neighbours often share
    inputs: a pair's targets, a scene's frames), each in a fresh process with its share of the cores, forked from a
    server that imported ``function``'s module once (:func:`~snd_stages.runtime.process_pool`); ``poll()`` runs
    here every ``every`` seconds meanwhile (to show progress), and the phases the processes record are added to
    this one's recorder.

    ``function`` and ``arguments`` must pickle. A failure is raised here once the other processes have finished
    their shares (each unit is written whole, so a rerun keeps them).
    """
    size = max(1, -(-len(units) // processes))
    shares = [units[start : start + size] for start in range(0, len(units), size)]
    with process_pool(len(shares), max(1, available_cores() // len(shares)), preload=(function.__module__,)) as pool:
        futures = [pool.submit(_recorded, function, *arguments, share) for share in shares]
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=every, return_when=FIRST_EXCEPTION)
            poll()
            if any(future.exception() is not None for future in done):
                break
        for future in futures:
            seconds, counts = future.result()  # the first failure is raised here (after the others finish)
            if _recorder is not None:
                for name, total in seconds.items():
                    _recorder.add(name, total, counts[name])
    poll()


def _recorded(function: Callable[..., None], *arguments) -> tuple[dict[str, float], dict[str, int]]:
    """``function(*arguments)`` in a worker process, returning the phases it recorded."""
    with recording() as phases:
        function(*arguments)
    return dict(phases.seconds), dict(phases.counts)


def ordered_map(function: Callable[[Item], object], items: Iterable[Item], ahead: int | None = None,
                compute_device: str = "cuda") -> Iterator:
    """``function`` of each item, in item order, computed by :func:`io_threads` threads at most ``ahead`` items ahead
    of the consumer (default: twice the threads), so that memory stays bounded however many items there are."""
    items = list(items)
    threads = io_threads(compute_device)
    if not _overlap or len(items) < 2 or threads == 0:
        yield from map(function, items)
        return
    ahead = ahead or 2 * threads
    with ThreadPoolExecutor(threads, thread_name_prefix="snd-map") as pool:
        pending: collections.deque[Future] = collections.deque(pool.submit(function, item) for item in items[:ahead])
        try:
            for position in range(len(items)):
                result = pending.popleft().result()
                if position + ahead < len(items):
                    pending.append(pool.submit(function, items[position + ahead]))
                yield result
        finally:
            for future in pending:
                future.cancel()


def overlapped(items: Iterable[Item], read: Callable[[Item], object],
               compute: Callable[[list[Item], list[object]], list[object]], write: Callable[[Item, object], None],
               per_call: int = 1, ahead: int | None = None, compute_device: str = "cuda") -> Iterator[Item]:
    """Read each item, compute up to ``per_call`` consecutive items in one call of ``compute`` (their items and
    inputs -> their results, in order), write each item's result; yield each item once its write is done. Times are
    recorded as the phases ``read``, ``compute`` (per call) and ``write``.

    Reads run up to ``ahead`` items ahead and writes up to ``ahead`` items behind (bounding the memory held; default:
    twice the threads, and at least two calls' items), each in :func:`io_threads` threads and one item per task, so
    that a call of many items still reads and writes them in parallel; ``compute`` runs in this thread in item order,
    on ``compute_device`` (a CPU compute leaves threads for reading and writing only on a machine with cores to
    spare). Writes run in threads, not processes: sending a unit to a writing process costs a copy of it through a
    pipe (33 MB for a 576x880 pair of Gaussians), and processes wrote 3 to 5 times fewer units per second on a GPU
    machine (benchmarks/README.md), though Zarr's one event loop per process makes writing threads queue.
    A failure anywhere stops new work, lets the writes already started finish (their units are whole), and is
    raised here.
    """
    items = list(items)
    threads = io_threads(compute_device)
    read, compute, write = timed("read", read), timed("compute", compute), timed("write", write)
    if not _overlap or len(items) < 2 or threads == 0:
        for start in range(0, len(items), per_call):
            batch = items[start : start + per_call]
            for item, result in zip(batch, compute(batch, [read(item) for item in batch]), strict=True):
                write(item, result)
                yield item
        return
    ahead = max(ahead or 2 * threads, 2 * per_call)
    with ThreadPoolExecutor(threads, thread_name_prefix="snd-write") as writers:
        reads = ordered_map(read, items, ahead, compute_device)
        writes: dict[Future, Item] = {}
        try:
            for start in range(0, len(items), per_call):
                batch = items[start : start + per_call]
                inputs = [next(reads) for _ in batch]
                for item, result in zip(batch, compute(batch, inputs), strict=True):
                    while len(writes) >= ahead:  # hold at most `ahead` results in memory
                        yield from _finished(writes, wait(writes, return_when=FIRST_COMPLETED).done)
                    writes[writers.submit(write, item, result)] = item
                yield from _finished(writes, [future for future in writes if future.done()])
            yield from _finished(writes, wait(writes).done)
        except BaseException:
            reads.close()  # no further reads
            wait(writes)  # units being written are finished whole, so a rerun keeps them
            raise


def _finished(writes: dict[Future, Item], done) -> Iterator[Item]:
    for future in list(done):
        item = writes.pop(future)
        future.result()  # a failed write is raised here
        yield item
