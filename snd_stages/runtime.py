"""Choosing where work runs."""

from __future__ import annotations

import multiprocessing
import os
import select
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed

import torch

from .errors import ConfigError


def resolve_device(name: str, key: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is a config error naming ``key``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key} = 'cuda' but no CUDA device is available; use auto or cpu")
    return torch.device(name)


# In a worker of process_pool: the cores it was given (its share of the parent's), which its own threads divide.
_worker_cores: int | None = None


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity: a container's or a job scheduler's share; in a worker
    process, its share of its parent's)."""
    if _worker_cores is not None:
        return _worker_cores
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_count(requested: int, units: int, threads_per_worker: int = 1) -> int:
    """How many worker processes to start for ``units`` independent units: ``requested``, or where it is 0 as many as
    the available cores hold when each worker keeps ``threads_per_worker`` of them busy; never more than there are
    units."""
    return max(1, min(requested or available_cores() // threads_per_worker, units))


def in_processes(function: Callable, arguments: list[tuple], workers: int) -> Iterator:
    """``function(*args)`` for each of ``arguments``, ``workers`` at once; yields the results as they finish.

    One worker runs in this process (no start-up cost, plain tracebacks). Otherwise the workers are fresh
    interpreters (spawn), not forks of this one: torch's and open3d's thread pools do not survive a fork; each gets
    its share of the cores for the threads it starts itself. A failure (or ^C) cancels what has not started.
    """
    if workers == 1:
        for args in arguments:
            yield function(*args)
        return
    with process_pool(workers, max(1, available_cores() // workers)) as pool:
        futures = [pool.submit(function, *args) for args in arguments]
        try:
            for future in as_completed(futures):
                yield future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def process_pool(workers: int, threads_per_worker: int, preload: Sequence[str] = ()) -> ProcessPoolExecutor:
    """``workers`` fresh interpreters, each limited to ``threads_per_worker`` torch threads and stopped when this
    process dies.

    Without ``preload`` each worker is spawned (see :func:`in_processes`) and imports what it runs itself. With it,
    workers are forked from a server process that imported the modules ``preload`` once and has run nothing
    (``forkserver``): no thread pool or CUDA context exists to be copied, and N workers start in about the time of
    one import instead of N imports side by side (torch and the stages take seconds; the first pool of a command
    starts the server, later pools reuse it with the modules it has). Where there is no fork server (Windows),
    workers are spawned.
    """
    if preload and "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(list(preload))  # no effect once this process's server runs
    else:
        context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                               initargs=(threads_per_worker, os.getpid()))


def _start_worker(threads: int, parent: int) -> None:
    global _worker_cores
    _worker_cores = threads
    torch.set_num_threads(threads)
    _exit_with(parent)


def _exit_with(parent: int) -> None:
    """End this process as soon as process ``parent`` ends: a killed parent must not leave workers behind that finish
    units under a rerun's feet.

    A thread waits on the parent's pid file descriptor (Linux), else checks every second. The kernel's parent-death
    signal is no substitute: a worker forked by the fork server is the server's child, and the server outlives the
    parent for as long as its workers hold it open.
    """
    try:
        handle = os.pidfd_open(parent)
    except ProcessLookupError:  # already gone
        os._exit(1)
    except (AttributeError, OSError):  # no pidfd_open here
        handle = None

    def watch() -> None:
        if handle is not None:
            select.select([handle], [], [])  # readable once the process has ended
        else:
            while _alive(parent):
                time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, name="snd-parent-watch", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
