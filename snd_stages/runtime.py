"""Choosing where work runs."""

from __future__ import annotations

import torch

from .errors import ConfigError


def resolve_device(name: str, key: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is a config error naming ``key``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key} = 'cuda' but no CUDA device is available; use auto or cpu")
    return torch.device(name)
