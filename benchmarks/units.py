"""Writing and reading one stored unit, the two ways the store does it.

Writing: Zarr writing each file to disk as it goes (``ArtifactWriter.unit``, for units built piece by piece) against
Zarr encoding the whole unit into memory and the files then going to disk in one pass, sealed from the bytes in hand
(what ``ArtifactWriter.write_unit``, which the precompute stages use, does for units up to
``store.MOST_BYTES_THROUGH_MEMORY``; the column "write_unit takes" says which way it takes for the kind's units).
Reading: verifying the files, then Zarr reading them (``Artifact.unit``) against reading each file once into memory
and verifying those bytes (``Artifact.load_unit``, what readers of whole units use). Both ways store and read the
same bytes; this script checks that too.

It takes real units from a store (the newest complete artifact of each kind; `make all` makes one), writes each
again both ways into a scratch store on local disk, and prints the median milliseconds per unit (one thread,
alternating the two ways so that both see the same machine).

    python benchmarks/units.py                          # units of data/store
    python benchmarks/units.py --store S --units 40
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import warnings

from snd_stages import store as store_module
from snd_stages.store import ArtifactSpec, Store, UnitArrays

KINDS = ("gaussians", "operators")


def stored_unit(group) -> UnitArrays:
    """A stored unit as the writers hand it over: its arrays with their chunks and codecs, and its attributes."""
    arrays, options = {}, {}
    with warnings.catch_warnings():  # listing a unit on disk meets its seal, which is not Zarr's
        warnings.filterwarnings("ignore", message="Object at snd-unit.json")
        members = list(group.arrays())
    for name, array in members:
        arrays[name] = array[...]
        options[name] = {"chunks": array.chunks, "compressors": array.compressors}
    return UnitArrays(arrays, dict(group.attrs), options)


def files_of(directory: Path) -> dict[str, bytes]:
    return {path.relative_to(directory).as_posix(): path.read_bytes()
            for path in sorted(directory.rglob("*")) if path.is_file()}


def measure(units: list[UnitArrays], scratch: Path) -> dict[str, float]:
    store = Store(scratch)
    writer = store.writer(ArtifactSpec("units", 1, {"scratch": str(scratch)}), "")
    writer.prepare()

    def file_by_file(name: str, unit: UnitArrays) -> None:
        with writer.unit(name) as group:
            unit.write(group)

    def through_memory(name: str, unit: UnitArrays) -> None:
        threshold, store_module.MOST_BYTES_THROUGH_MEMORY = store_module.MOST_BYTES_THROUGH_MEMORY, float("inf")
        try:
            writer.write_unit(name, unit)
        finally:
            store_module.MOST_BYTES_THROUGH_MEMORY = threshold

    writes = {"file by file": [], "through memory": []}
    for index, unit in enumerate(units):
        for label, write in (("file by file", file_by_file), ("through memory", through_memory)):
            start = time.perf_counter()
            write(f"{label.split()[0]}-{index}", unit)
            writes[label].append(time.perf_counter() - start)
    same = all(files_of(writer.data / f"file-{index}") == files_of(writer.data / f"through-{index}")
               for index in range(len(units)))
    artifact = writer.finish(sorted(writer.done_units()))
    reads = {"unit": [], "load_unit": []}
    for index in range(len(units)):
        for label in reads:
            store_module._VERIFIED_UNITS.clear()  # each read verifies, as a process's first read of a unit does
            start = time.perf_counter()
            group = getattr(artifact, label)(f"through-{index}")
            for _, array in group.arrays():
                array[...]
            reads[label].append(time.perf_counter() - start)
    milliseconds = {f"write {label}": 1000 * statistics.median(times) for label, times in writes.items()}
    milliseconds.update({f"read {label}": 1000 * statistics.median(times) for label, times in reads.items()})
    return {**milliseconds, "same": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=Path("data/store"))
    parser.add_argument("--units", type=int, default=30, help="units of each kind")
    args = parser.parse_args()
    torch.set_num_threads(1)
    store = Store(args.store)
    table = Table(title=f"One stored unit, written and read both ways (median ms per unit, {os.cpu_count()} cores, "
                        "one thread)")
    for column in ("kind", "units", "MB per unit", "write file by file", "write through memory", "write_unit takes",
                   "read: unit", "read: load_unit", "same files"):
        table.add_column(column, justify="right")
    for kind in KINDS:
        artifacts = store.complete_artifacts(kind)
        if not artifacts:
            print(f"no complete {kind} artifact in {args.store}: run make all first")
            continue
        artifact = artifacts[-1]
        units = [stored_unit(artifact.unit(name)) for name in artifact.units()[: args.units]]
        with tempfile.TemporaryDirectory(prefix="snd-units-") as scratch:
            result = measure(units, Path(scratch))
        megabytes = sum(values.nbytes for unit in units for values in unit.arrays.values()) / len(units) / 1e6
        way = "memory" if megabytes * 1e6 <= store_module.MOST_BYTES_THROUGH_MEMORY else "file by file"
        table.add_row(kind, str(len(units)), f"{megabytes:.2f}", f"{result['write file by file']:.2f}",
                      f"{result['write through memory']:.2f}", way, f"{result['read unit']:.2f}",
                      f"{result['read load_unit']:.2f}", "yes" if result["same"] else "NO")
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
