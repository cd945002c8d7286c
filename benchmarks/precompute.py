"""Precompute throughput: reconstructing context pairs into Gaussians, at the demo size and the authors' size.

Prints one table: for each image size and device, the time to reconstruct one context pair (2 views of
pixel-aligned Gaussians from depth), pairs/s, Gaussians per pair, the bytes a pair takes in the store (Zarr,
compressed as written) and the time to write it. Inputs are demo scenes generated at each size, so the numbers
include real depth and normals.

    python benchmarks/precompute.py                   # CPU (and CUDA if present)
    python benchmarks/precompute.py --sizes 192x256   # one size
    python benchmarks/precompute.py --write-inputs DIR   # generate the input scenes only (needs open3d) ...
    python benchmarks/precompute.py --inputs DIR         # ... and time them on a machine without open3d
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from snd_stages.reconstruct import GaussiansCfg
from snd_stages.reconstruct import build_reconstructor
from snd_stages.scenes.layout import frame_file_name, read_scene, write_scene
from snd_stages.stages.precompute_gaussians import context_views
from snd_stages.artifacts.gaussians import write_pair
from snd_stages.store import ArtifactSpec, Store


def write_inputs(root: Path, size: str) -> Path:
    """Two frames of a demo scene at ``size`` (HxW), in the dataset layout under ``root/scenes/bench<size>``."""
    from snd_stages.scenes.demo import generate_scene  # needs open3d

    height, width = (int(v) for v in size.split("x"))
    scene = generate_scene(seed=0, frames=2, height=height, width=width, horizontal_fov_degrees=70.0)
    write_scene(root / "scenes" / f"bench{size}", [frame_file_name(i) for i in range(2)], scene.images,
                scene.intrinsics, scene.world_to_camera, depth=scene.depth, normals=scene.normals,
                instances=scene.instances)
    return root


def time_call(function, repeats: int, synchronize) -> tuple[float, object]:
    result = function()  # warm-up (allocations, CUDA context)
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["192x256", "576x880"], help="HxW image sizes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write-inputs", type=Path, help="write the generated input scenes here and stop")
    parser.add_argument("--inputs", type=Path, help="read input scenes written by --write-inputs")
    args = parser.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.write_inputs is not None:
        for size in args.sizes:
            write_inputs(args.write_inputs, size)
        return

    table = Table(title="precompute-gaussians: one context pair (depth reconstructor, disk covariances)")
    for column in ("size", "device", "reconstruct ms", "pairs/s", "Gaussians", "stored MB", "write ms"):
        table.add_column(column, justify="right")
    scratch = Path(tempfile.mkdtemp())
    try:
        for size in args.sizes:
            inputs = args.inputs if args.inputs is not None else write_inputs(scratch, size)
            scene = read_scene(inputs, f"bench{size}")
            views = context_views(scene, (0, 1), needs_depth=True)
            for device in devices:
                reconstructor = build_reconstructor(GaussiansCfg(device=device))
                sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
                seconds, gaussians = time_call(lambda: reconstructor.reconstruct(views), args.repeats, sync)
                writer = Store(scratch / f"store-{size}-{device}").writer(ArtifactSpec("bench", 1, {}), "")
                writer.prepare()
                start = time.perf_counter()
                with writer.unit("pair") as group:
                    write_pair(group, scene, (0, 1), [1], gaussians)
                write_seconds = time.perf_counter() - start
                stored = sum(p.stat().st_size for p in (writer.data / "pair").rglob("*") if p.is_file())
                table.add_row(size, device, f"{seconds * 1e3:.1f}", f"{1 / seconds:.2f}", f"{len(gaussians):,}",
                              f"{stored / 2**20:.2f}", f"{write_seconds * 1e3:.0f}")
    finally:
        shutil.rmtree(scratch)
    console = Console()
    console.print(table)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    console.print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {name}")


if __name__ == "__main__":
    main()
