"""What compression and chunking cost and save for each kind of stored unit: the choice of codec by measurement.

It reads real units out of a store (the newest complete artifact of each kind; `make all` makes one) and writes
each unit again under every candidate codec into a fresh Zarr group on local disk, then reads it back. Per kind and
codec it prints the stored bytes against the raw bytes, the files a unit takes, and the milliseconds per unit to
encode and write, and to read and decode (one thread, the median of --repeats). The candidates:

- ``zstd-3``: Zarr 3's default (numcodecs Zstd level 0, which is zstd's level 3), what the stages store today;
- ``zstd-1``: the fastest zstd level;
- ``blosc-lz4-shuffle`` and ``blosc-zstd1-shuffle``: Blosc with byte shuffling (which groups the bytes of each
  float's exponent together), one thread;
- ``none``: no compression (the floor of the per-array cost: metadata and file writes);
- ``zstd-3-one-file``: the default codec, with every array of a unit concatenated into one byte array (what a unit
  costs when the per-array files go away; it shows the per-array overhead, not a layout the readers accept).

    python benchmarks/compression.py                        # units of data/store
    python benchmarks/compression.py --store S --units 20 --repeats 3
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from rich.console import Console
from rich.table import Table
from zarr.codecs import BloscCodec, ZstdCodec

from snd_stages.store import Store

KINDS = ("gaussians", "operators", "masks", "features", "ground_truth")
CODECS = {
    "zstd-3": [ZstdCodec(level=0)],
    "zstd-1": [ZstdCodec(level=1)],
    "blosc-lz4-shuffle": [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", blocksize=0)],
    "blosc-zstd1-shuffle": [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", blocksize=0)],
    "none": None,
}
ONE_FILE = "zstd-3-one-file"


def units_of(store: Store, kind: str, limit: int) -> list[dict[str, np.ndarray]]:
    """Up to ``limit`` units of the newest complete ``kind`` artifact, each as its arrays."""
    artifacts = store.complete_artifacts(kind)
    if not artifacts:
        return []
    group = artifacts[-1].group()
    units = []
    for name in sorted(group.group_keys())[:limit]:
        units.append({array: np.asarray(values[...]) for array, values in group[name].arrays()})
    return units


def write_unit(root: Path, arrays: dict[str, np.ndarray], codec: str) -> None:
    group = zarr.open_group(store=str(root), mode="w", zarr_format=3)
    if codec == ONE_FILE:
        joined = np.concatenate([values.view(np.uint8).reshape(-1) for values in arrays.values()])
        group.create_array("unit", data=joined, compressors=CODECS["zstd-3"])
        return
    for name, values in arrays.items():
        group.create_array(name, data=values, chunks=values.shape or None, compressors=CODECS[codec])


def read_unit(root: Path) -> int:
    group = zarr.open_group(store=str(root), mode="r")
    return sum(np.asarray(values[...]).nbytes for _, values in group.arrays())


def measure(units: list[dict[str, np.ndarray]], codec: str, repeats: int, scratch: Path) -> dict[str, float]:
    write_ms, read_ms = [], []
    stored = files = 0
    for repeat in range(repeats):
        folder = scratch / f"{codec}-{repeat}"
        start = time.perf_counter()
        for index, arrays in enumerate(units):
            write_unit(folder / str(index), arrays, codec)
        write_ms.append(1000 * (time.perf_counter() - start) / len(units))
        start = time.perf_counter()
        for index in range(len(units)):
            read_unit(folder / str(index))
        read_ms.append(1000 * (time.perf_counter() - start) / len(units))
        if repeat == 0:
            written = [path for path in folder.rglob("*") if path.is_file()]
            stored = sum(path.stat().st_size for path in written)
            files = len(written)
        shutil.rmtree(folder)
    raw = sum(values.nbytes for arrays in units for values in arrays.values())
    return {"raw MB/unit": raw / len(units) / 1e6, "stored MB/unit": stored / len(units) / 1e6,
            "ratio": stored / raw, "files/unit": files / len(units),
            "write ms/unit": statistics.median(write_ms), "read ms/unit": statistics.median(read_ms)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, default=Path("data/store"))
    parser.add_argument("--units", type=int, default=12, help="units of each kind")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    args = parser.parse_args()
    store = Store(args.store)
    table = Table(title=f"Codecs per stored unit ({args.store}, one thread)")
    columns = ("raw MB/unit", "stored MB/unit", "ratio", "files/unit", "write ms/unit", "read ms/unit")
    for column in ("kind", "arrays/unit", "codec", *columns):
        table.add_column(column, justify="left" if column in ("kind", "codec") else "right")
    with tempfile.TemporaryDirectory(dir=".") as scratch:
        for kind in args.kinds:
            units = units_of(store, kind, args.units)
            if not units:
                Console(stderr=True).print(f"{kind}: no complete artifact in {args.store}; skipped")
                continue
            for codec in (*CODECS, ONE_FILE):
                row = measure(units, codec, args.repeats, Path(scratch))
                table.add_row(kind, str(len(units[0])), codec, *(f"{row[column]:.3g}" for column in columns))
            table.add_section()
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
