"""What verifying the store costs: per unit of each stage the training run reads, against reading its batches.

A process verifies each unit the first time it opens it (sizes and CRC32C of every file against the unit's seal,
:mod:`snd_stages.store`). This prints, for the configured run's artifacts (samples, Gaussians, masks and teacher
operators must be precomputed):

- per stage: units, median MB and milliseconds to verify one unit (files in the page cache), and MB/s;
- per training sample: the verification it adds in the first epoch (its operator unit, or its Gaussians where
  the run splats without operators, and its scene's masks unit shared by the scene's samples), against the median
  time to read one sample of a batch in the first epoch (frames decoded) and later (``benchmarks/loader.py``'s
  "no cache" and "later epochs"), when nothing is verified any more.

    python benchmarks/integrity.py -c pipeline.yaml [--units 50] [--set key=value ...]
"""

from __future__ import annotations

import math
import statistics
import time

from rich.console import Console
from rich.table import Table

from loader import configured_run, per_batch_ms, run_arguments  # benchmarks/loader.py, beside this script
from snd_stages.store import DATA, Artifact, verify_unit


def unit_costs(artifact: Artifact, limit: int) -> tuple[int, float, float]:
    """(units, median MB per unit, median ms to verify one unit) over the first ``limit`` units, files cached."""
    names = artifact.units()[:limit]
    sizes, times = [], []
    for name in names:
        directory = artifact.path / DATA / name
        verify_unit(directory, "", again=True)  # warm the page cache: measure the check, not the disk
        started = time.perf_counter()
        verify_unit(directory, "", again=True)
        times.append(time.perf_counter() - started)
        sizes.append(sum(path.stat().st_size for path in directory.rglob("*") if path.is_file()))
    return len(artifact.units()), statistics.median(sizes) / 1e6, statistics.median(times) * 1e3


def main() -> None:
    parser = run_arguments(__doc__)
    parser.add_argument("--units", type=int, default=50, help="units timed per stage")
    args = parser.parse_args()
    inputs, operators, reader = configured_run(args)
    artifacts = {"gaussians": inputs.gaussians, "masks": inputs.masks, "operators": operators}

    table = Table(title="Verifying units")
    for column in ("stage", "units", "MB / unit", "ms / unit", "MB/s"):
        table.add_column(column, justify="right")
    per_unit_ms = {}
    for stage, artifact in artifacts.items():
        units, megabytes, milliseconds = unit_costs(artifact, args.units)
        per_unit_ms[stage] = milliseconds
        table.add_row(stage, str(units), f"{megabytes:.3f}", f"{milliseconds:.2f}", f"{megabytes / milliseconds * 1e3:,.0f}")
    console = Console()
    console.print(table)

    samples = len(inputs.samples.samples)
    scenes = max(1, len({sample.scene for sample in inputs.samples.samples}))
    # with operators the training reads them instead of the Gaussians (snd_stages.stages.train.TrainingData.load)
    splatted = "operators" if operators is not None else "gaussians"
    verify_ms = per_unit_ms[splatted] + per_unit_ms["masks"] * scenes / samples

    steps = range(min(20, math.ceil(samples / args.batch)))
    uncached, cached = reader(0), reader(2 * 2**30)
    per_batch_ms(cached, steps, args.batch)  # fill the frame cache (and verify every unit once)
    read_uncached = per_batch_ms(uncached, steps, args.batch) / args.batch
    read_cached = per_batch_ms(cached, steps, args.batch) / args.batch
    summary = Table(title=f"Per training sample ({splatted} and masks units)")
    for column in ("epoch", "verification ms", "read ms", "verification share of the data time"):
        summary.add_column(column, justify="right")
    summary.add_row("first (frames decoded)", f"{verify_ms:.2f}", f"{read_uncached:.2f}",
                    f"{verify_ms / (verify_ms + read_uncached):.1%}")
    summary.add_row("later (frames cached)", "0", f"{read_cached:.2f}", "0 % (each unit is verified once per process)")
    console.print(summary)


if __name__ == "__main__":
    main()
