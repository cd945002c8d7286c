"""The mvsplat reconstructor's throughput and depth quality on demo scenes, at the authors' size by default.

Prints one table: for the chosen image size, device and checkpoint, the time to reconstruct one context pair
(MVSplat's encoder in true float32 plus the conversion to snd's Gaussians: what ``snd precompute-gaussians``
pays per pair), pairs/s, the peak GPU memory, and the quality of the encoder's depth maps against the scenes'
true z-depth (AbsRel and delta1 < 1.25 over valid pixels, both views of every pair). Inputs are frames of a
generated demo scene at that size; each pair is frames (i, i + gap).

    python benchmarks/mvsplat_precompute.py                                    # 576x880, the fixture's weights
    python benchmarks/mvsplat_precompute.py --height 64 --width 96 --pairs 2   # a quick CPU check
    python benchmarks/mvsplat_precompute.py --checkpoint path/to/re10k.ckpt    # the authors' weights
    python benchmarks/mvsplat_precompute.py --write-inputs DIR   # generate the input scene only (needs open3d) ...
    python benchmarks/mvsplat_precompute.py --inputs DIR         # ... and time it on a machine without open3d

The default weights are the parity fixture's seeded random weights (``../shared/fixtures/mvsplat`` or
``$SND_MVSPLAT_FIXTURE``); ``--checkpoint random`` uses a freshly initialised encoder instead. Random weights
give meaningful timings but meaningless depth.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from snd_stages.reconstruct import GaussiansCfg
from snd_stages.reconstruct.mvsplat.settings import MVSplatSettings
from snd_stages.probes.metrics import depth_metrics
from snd_stages.reconstruct import build_reconstructor
from snd_stages.reconstruct.mvsplat import MVSplatEncoder
from snd_stages.scenes.layout import frame_file_name, read_scene, write_scene
from snd_stages.stages.precompute_gaussians import context_views

FIXTURE = Path(
    os.environ.get("SND_MVSPLAT_FIXTURE") or Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "mvsplat"
)


def scene_id(height: int, width: int) -> str:
    return f"bench-mvsplat-{height}x{width}"


def write_inputs(root: Path, height: int, width: int, frames: int) -> Path:
    """One demo scene of ``frames`` frames at ``height`` x ``width`` under ``root/scenes/``, with its depth."""
    from snd_stages.scenes.demo import generate_scene  # needs open3d

    scene = generate_scene(seed=0, frames=frames, height=height, width=width, horizontal_fov_degrees=70.0)
    write_scene(root / "scenes" / scene_id(height, width), [frame_file_name(i) for i in range(frames)],
                scene.images, scene.intrinsics, scene.world_to_camera, depth=scene.depth)
    return root


def random_checkpoint(directory: Path) -> Path:
    """A seeded, freshly initialised encoder saved like the official checkpoint (``encoder.`` keys)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = directory / "random-mvsplat.safetensors"
    save_file({f"encoder.{key}": value.contiguous() for key, value in MVSplatEncoder().state_dict().items()}, path)
    return path


def has_random_weights(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` is the parity fixture's (its safetensors metadata records a seeded random init)."""
    if checkpoint.suffix != ".safetensors":
        return False
    from safetensors import safe_open

    with safe_open(checkpoint, "pt") as weights:
        return "random" in (weights.metadata() or {}).get("init", "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=576)
    parser.add_argument("--width", type=int, default=880)
    parser.add_argument("--pairs", type=int, default=8, help="context pairs to time (after one warm-up pair)")
    parser.add_argument("--gap", type=int, default=4, help="frames between the two views of a pair")
    parser.add_argument("--checkpoint", default=str(FIXTURE / "weights.safetensors"),
                        help="re10k.ckpt, a safetensors copy, or 'random' (default: the parity fixture's weights)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--write-inputs", type=Path, help="write the generated input scene here and stop")
    parser.add_argument("--inputs", type=Path, help="read the input scene written by --write-inputs")
    args = parser.parse_args()
    frames = args.pairs + 1 + args.gap  # one extra pair warms up
    if args.write_inputs is not None:
        write_inputs(args.write_inputs, args.height, args.width, frames)
        return

    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        if args.checkpoint == "random":
            checkpoint, weights = random_checkpoint(scratch), "random init"
        else:
            checkpoint = Path(args.checkpoint)
            if not checkpoint.is_file():
                raise SystemExit(f"checkpoint {checkpoint} not found; pass --checkpoint PATH or --checkpoint random")
            weights = checkpoint.name
        random_weights = args.checkpoint == "random" or has_random_weights(checkpoint)
        inputs = args.inputs if args.inputs is not None else write_inputs(scratch, args.height, args.width, frames)
        scene = read_scene(inputs, scene_id(args.height, args.width))
        if len(scene) < frames:
            raise SystemExit(f"{inputs} holds {len(scene)} frames; --pairs {args.pairs} --gap {args.gap} needs {frames}")

        reconstructor = build_reconstructor(
            GaussiansCfg(reconstructor="mvsplat", mvsplat=MVSplatSettings(checkpoint), device=args.device)
        )
        assert reconstructor.reconstruct_with_depth is not None
        cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        synchronize = torch.cuda.synchronize if cuda else (lambda: None)
        pairs = [(first, first + args.gap) for first in range(args.pairs + 1)]
        views = [context_views(scene, pair, needs_depth=False) for pair in pairs]
        truth = [np.stack([scene.load_depth(p) for p in pair]) for pair in pairs]

        reconstructor.reconstruct_with_depth(views[0])  # warm-up: allocations, cuDNN's algorithm choice
        synchronize()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        seconds, abs_rel, delta1 = [], [], []
        for pair_views, pair_truth in zip(views[1:], truth[1:]):
            start = time.perf_counter()
            _, depth = reconstructor.reconstruct_with_depth(pair_views)
            synchronize()
            seconds.append(time.perf_counter() - start)
            for predicted, target in zip(depth, torch.from_numpy(pair_truth)):
                metrics = depth_metrics(predicted, target, target > 0)
                abs_rel.append(metrics["abs_rel"])
                delta1.append(metrics["delta1"])
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f}" if cuda else "-"

    median = statistics.median(seconds)
    device = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    table = Table(title="mvsplat reconstructor: one context pair (float32, TF32 off)")
    for column in ("size", "device", "weights", "pairs", "ms/pair", "pairs/s", "peak GPU GiB", "AbsRel", "δ1<1.25"):
        table.add_column(column, justify="right")
    table.add_row(f"{args.height}x{args.width}", device, weights, str(len(seconds)), f"{median * 1e3:.1f}",
                  f"{1 / median:.2f}", peak, f"{statistics.mean(abs_rel):.3f}", f"{statistics.mean(delta1):.3f}")
    console = Console(width=max(Console().width, 130))  # the table's nine columns, also when piped
    console.print(table)
    console.print(f"torch {torch.__version__}; depth: the encoder's depth maps vs the scene's true z-depth, "
                  f"valid pixels of both views of {len(seconds)} pairs (frames i, i + {args.gap}).")
    if random_weights:
        console.print("note: random weights (the parity fixture's or a fresh init): the timings hold, but their depth "
                      "is meaningless; pass --checkpoint re10k.ckpt for the trained model's depth quality.")


if __name__ == "__main__":
    main()
