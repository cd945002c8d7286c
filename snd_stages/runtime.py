"""Choosing where work runs."""

from __future__ import annotations

import os

import torch

from .errors import ConfigError


def resolve_device(name: str, key: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is a config error naming ``key``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key} = 'cuda' but no CUDA device is available; use auto or cpu")
    return torch.device(name)


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity: a container's or a job scheduler's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_count(requested: int, units: int, threads_per_worker: int = 1) -> int:
    """How many worker processes to start for ``units`` independent units: ``requested``, or where it is 0 as many as
    the available cores hold when each worker keeps ``threads_per_worker`` of them busy; never more than there are
    units."""
    return max(1, min(requested or available_cores() // threads_per_worker, units))
