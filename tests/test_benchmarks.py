"""The benchmark scripts' own logic that runs without a GPU."""

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def train_step():
    path = Path(__file__).parents[1] / "benchmarks" / "train_step.py"
    spec = importlib.util.spec_from_file_location("benchmark_train_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("capacity, largest", [(0, 0), (7, 0), (8, 8), (15, 8), (16, 16), (100, 96), (104, 104),
                                               (1000, 1000), (5000, 4096)])
def test_largest_batch_is_the_largest_multiple_of_8_that_fits(train_step, capacity, largest):
    tried = []

    def fits(batch):
        tried.append(batch)
        return batch <= capacity

    assert train_step.largest_batch(fits) == largest
    assert all(batch % 8 == 0 for batch in tried)
    # Doubling then bisecting: a handful of tries, never one past the limit.
    assert len(tried) <= 14 and max(tried) <= 4096


def test_batch_sizes_reject_what_is_neither_a_size_nor_max(train_step):
    assert train_step.batch_sizes(["8", "max"]) == ["8", "max"]
    for bad in ("0", "-8", "eight", "8.5"):
        with pytest.raises(SystemExit, match=f"--batch {bad}"):
            train_step.batch_sizes([bad])
