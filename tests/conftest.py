"""Shared test helpers: tiny scene fixtures written in the real on-disk layout."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest


def tree_digest(root: Path, exclude_names: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file under ``root`` by relative path (for 'identical to an uninterrupted run' checks)."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(Path(root).rglob("*"))
        if path.is_file() and path.name not in exclude_names
    }


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
