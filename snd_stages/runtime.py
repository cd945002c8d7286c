"""Choosing where work runs."""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterator
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


PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies


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


def process_pool(workers: int, threads_per_worker: int) -> ProcessPoolExecutor:
    """``workers`` fresh interpreters (spawn, see :func:`in_processes`), each limited to ``threads_per_worker`` torch
    threads and stopped when this process dies."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                               initargs=(threads_per_worker, os.getpid()))


def _start_worker(threads: int, parent: int) -> None:
    global _worker_cores
    _worker_cores = threads
    torch.set_num_threads(threads)
    # A killed parent must not leave workers behind that finish units under a rerun's feet: on Linux the kernel
    # stops a worker when its parent dies (PR_SET_PDEATHSIG); if the parent is already gone, stop now.
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)
