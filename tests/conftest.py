"""Shared test helpers: tiny scene fixtures written in the real on-disk layout."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from collections.abc import Iterator
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


@pytest.fixture(scope="module")
def module_tmp_path(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder shared by one test module, removed once the module's tests are done.

    The training tests keep real ViT-S/14 weights and checkpoints (90 MB each); left to the end of the session,
    the modules' folders add up to gigabytes of /tmp.
    """
    folder = tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2])
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def build_demo_samples(cfg):
    """Generate ``cfg``'s demo scenes and freeze their samples; returns the store."""
    from snd_stages.stages.make_demo_data import make_demo_data  # open3d: CPU tier
    from snd_stages.stages.sample_views import sample_views
    from snd_stages.store import Store

    # The tests' scenes are tiny: generating them here costs less than starting worker processes would.
    make_demo_data(cfg.data, dataclasses.replace(cfg.demo, workers=1))
    store = Store(cfg.store.root)
    sample_views(cfg.data, cfg.sampling, store)
    return store


def build_demo_artifacts(cfg, operators: bool = True):
    """Generate ``cfg``'s demo scenes and every precompute artifact the training stage reads; returns the store."""
    from snd_stages.stages.precompute_gaussians import precompute_gaussians
    from snd_stages.stages.precompute_masks import precompute_masks
    from snd_stages.stages.precompute_operators import precompute_operators

    store = build_demo_samples(cfg)
    precompute_gaussians(cfg.data, cfg.sampling, cfg.gaussians, store)
    precompute_masks(cfg.data, cfg.sampling, cfg.masks, store)
    if operators:
        precompute_operators(cfg.data, cfg.sampling, cfg.gaussians, cfg.masks, cfg.train, store)
    return store
