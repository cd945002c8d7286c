"""Reading training batches: what `snd train`'s background reader costs per step, with and without the frame cache.

Reads the batches of the configured run (its samples, masks and operators must be precomputed) the way the
training loop does, in one thread, and prints per-batch medians:

- **no cache**: every frame's PNG decoded and its mask read from the store again (the cache holds nothing);
- **first epoch**: the frame cache filling;
- **later epochs**: every frame already decoded.

On a GPU the reader runs beside the step; when a batch takes longer to read than the step to run, the reader
bounds the loop.

    python benchmarks/loader.py -c pipeline.yaml [--batch 4] [--steps 100] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from snd_stages.pipeline import load_config
from snd_stages.artifacts.operators import operator_unit_name
from snd_stages.stages.train import TrainingData
from snd_stages.artifacts.runs import run_inputs, teacher_operators
from snd_stages.store import Store


def per_batch_ms(data: TrainingData, steps: range, batch_size: int) -> float:
    times = []
    for step in steps:
        started = time.perf_counter()
        data.batch(step, batch_size)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def run_arguments(description: str) -> argparse.ArgumentParser:
    """The options of the benchmarks that read a configured run's training data."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", type=Path, default=Path("pipeline.yaml"))
    parser.add_argument("--set", dest="overrides", nargs="*", default=[])
    parser.add_argument("--batch", type=int, default=4)
    return parser


def configured_run(args: argparse.Namespace):
    """(the run's inputs, its teacher operators, ``reader(cached_frame_bytes) -> TrainingData``) for the config."""
    cfg = load_config(args.config, args.overrides)
    store = Store(cfg.store.root)
    inputs = run_inputs(cfg.data, cfg.sampling, cfg.gaussians, cfg.masks, store)
    operators = teacher_operators(cfg.train, inputs, store)

    def reader(cached_frame_bytes: int) -> TrainingData:
        return TrainingData(inputs.samples.samples, inputs.samples.dataset_root, inputs.gaussians, inputs.masks,
                            cfg.train.seed, operators=operators, cached_frame_bytes=cached_frame_bytes)

    return inputs, operators, reader


def main() -> None:
    parser = run_arguments(__doc__)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    inputs, operators, reader = configured_run(args)
    epoch_steps = math.ceil(len(inputs.samples.samples) / args.batch)
    steps = range(min(args.steps, epoch_steps))
    uncached, cached = reader(0), reader(2 * 2**30)
    # Training keeps every operator once read; read them all into both readers before timing, so that the
    # columns differ only in the frames.
    for data in (uncached, cached):
        for sample in data.samples:
            data._operator(operator_unit_name(sample.scene, sample.context, sample.targets[0]))
    per_batch_ms(uncached, range(1), args.batch)  # open the scenes and the mask units
    table = Table(title=f"Reading a batch of {args.batch} ({len(inputs.samples.samples)} samples, "
                        f"{epoch_steps} steps an epoch), median ms")
    for column in ("no cache", "first epoch", "later epochs", "frames cached", "cache MB"):
        table.add_column(column, justify="right")
    no_cache = per_batch_ms(uncached, steps, args.batch)
    first = per_batch_ms(cached, range(epoch_steps), args.batch)
    later = per_batch_ms(cached, range(epoch_steps, epoch_steps + len(steps)), args.batch)
    table.add_row(f"{no_cache:.2f}", f"{first:.2f}", f"{later:.2f}", str(len(cached._frames)),
                  f"{cached._frames.size / 1e6:.1f}")
    Console().print(table)


if __name__ == "__main__":
    main()
