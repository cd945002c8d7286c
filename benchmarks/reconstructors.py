"""The feed-forward reconstructors' throughput and depth quality on demo scenes: mvsplat against depthsplat.

Prints one table with a row per reconstructor (and DepthSplat model: small, base, large and the 448x768 ones) and
image size: the time to
reconstruct one context pair (the encoder in true float32 plus the conversion to snd's Gaussians: what
``snd precompute-gaussians`` pays per pair), pairs/s, the peak GPU memory, and the quality of the encoder's depth
maps against the scenes' true z-depth (AbsRel and delta1 < 1.25 over valid pixels, both views of every pair).
Inputs are frames of a generated demo scene at each size; each pair is frames (i, i + gap). A size a model
cannot take is moved to the nearest one it can (MVSplat and DepthSplat's small model: multiples of 16; the
448x768 model: multiples of 64, so 576x880 becomes 576x896), and the row says so.

    python benchmarks/reconstructors.py                             # 576x880 and 448x768, random weights
    python benchmarks/reconstructors.py --sizes 64x128 --pairs 2 --models mvsplat depthsplat-small   # quick, CPU
    python benchmarks/reconstructors.py --mvsplat re10k.ckpt --depthsplat depthsplat-gs-small-....pth
                                                                    # the authors' weights: meaningful depth
    python benchmarks/reconstructors.py --write-inputs DIR   # generate the input scenes only (needs open3d) ...
    python benchmarks/reconstructors.py --inputs DIR         # ... and time them on a machine without open3d

Random weights (the default: a seeded fresh encoder per row) give meaningful timings but meaningless depth;
a checkpoint replaces them for its reconstructor (DepthSplat's configuration is then the checkpoint's).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file

from snd_stages.probes.metrics import depth_metrics
from snd_stages.reconstruct import GaussiansCfg, build_reconstructor
from snd_stages.reconstruct.depthsplat import MODELS, DepthSplatEncoder
from snd_stages.reconstruct.depthsplat.settings import DepthSplatSettings
from snd_stages.reconstruct.mvsplat import SIZE_MULTIPLE, MVSplatEncoder
from snd_stages.reconstruct.mvsplat.settings import MVSplatSettings
from snd_stages.scenes.layout import frame_file_name, read_scene, write_scene
from snd_stages.stages.precompute_gaussians import context_views


@dataclass(frozen=True)
class Model:
    """One row's reconstructor: its name, the DepthSplat configuration (None for MVSplat), its size rule."""

    reconstructor: str
    configuration: str | None
    size_multiple: int

    @property
    def label(self) -> str:
        return self.reconstructor if self.configuration is None else f"{self.reconstructor}-{self.configuration}"


MODELS_TO_TIME = (
    Model("mvsplat", None, SIZE_MULTIPLE),
    *(Model("depthsplat", name, cfg.size_multiple) for name, cfg in MODELS.items()),
)


def nearest_valid(size: tuple[int, int], multiple: int) -> tuple[int, int]:
    """Each side rounded to the nearest positive multiple of ``multiple`` (ties upwards)."""
    height, width = (max(multiple, (side + multiple // 2) // multiple * multiple) for side in size)
    return height, width


def parse_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(side) for side in text.split("x"))
    except ValueError:
        raise SystemExit(f"--sizes {text}: expected HEIGHTxWIDTH, e.g. 576x880") from None
    return height, width


def scene_id(height: int, width: int) -> str:
    return f"bench-reconstructors-{height}x{width}"


def write_inputs(root: Path, sizes: list[tuple[int, int]], frames: int) -> Path:
    """One demo scene of ``frames`` frames per size under ``root/scenes/``, with its depth."""
    from snd_stages.scenes.demo import generate_scene  # needs open3d

    for height, width in sizes:
        scene = generate_scene(seed=0, frames=frames, height=height, width=width, horizontal_fov_degrees=70.0)
        write_scene(root / "scenes" / scene_id(height, width), [frame_file_name(i) for i in range(frames)],
                    scene.images, scene.intrinsics, scene.world_to_camera, depth=scene.depth)
    return root


def random_checkpoint(directory: Path, model: Model) -> Path:
    """A seeded, freshly initialised encoder saved like the official checkpoints (``encoder.`` keys)."""
    torch.manual_seed(0)
    encoder = MVSplatEncoder() if model.configuration is None else DepthSplatEncoder(MODELS[model.configuration])
    path = directory / f"random-{model.reconstructor}-{model.configuration}.safetensors"
    save_file({f"encoder.{key}": value.contiguous() for key, value in encoder.state_dict().items()}, path)
    return path


def gaussians_cfg(model: Model, checkpoint: Path, device: str) -> GaussiansCfg:
    if model.configuration is None:
        return GaussiansCfg(reconstructor="mvsplat", mvsplat=MVSplatSettings(checkpoint), device=device)
    return GaussiansCfg(reconstructor="depthsplat", device=device,
                        depthsplat=DepthSplatSettings(checkpoint, model=model.configuration))


def time_model(cfg: GaussiansCfg, scene, pairs: list[tuple[int, int]], cuda: bool) -> dict[str, float | None]:
    """Median seconds per pair (after one warm-up pair), peak GPU GiB, mean AbsRel and delta1 of its depth."""
    reconstructor = build_reconstructor(cfg)
    assert reconstructor.reconstruct_with_depth is not None
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)
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
    del reconstructor
    return {
        "seconds": statistics.median(seconds),
        "peak": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "abs_rel": statistics.mean(abs_rel),
        "delta1": statistics.mean(delta1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["576x880", "448x768"], help="HEIGHTxWIDTH of the frames")
    parser.add_argument("--models", nargs="+", default=[model.label for model in MODELS_TO_TIME],
                        choices=[model.label for model in MODELS_TO_TIME], help="which rows (default: all)")
    parser.add_argument("--pairs", type=int, default=8, help="context pairs to time (after one warm-up pair)")
    parser.add_argument("--gap", type=int, default=4, help="frames between the two views of a pair")
    parser.add_argument("--mvsplat", type=Path, help="MVSplat's checkpoint (re10k.ckpt); default: random weights")
    parser.add_argument("--depthsplat", type=Path,
                        help="a DepthSplat checkpoint; its rows are then its configuration's (default: random weights)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--write-inputs", type=Path, help="write the generated input scenes here and stop")
    parser.add_argument("--inputs", type=Path, help="read the input scenes written by --write-inputs")
    args = parser.parse_args()
    frames = args.pairs + 1 + args.gap  # one extra pair warms up
    models = [model for model in MODELS_TO_TIME if model.label in args.models]
    if args.depthsplat is not None:
        from snd_stages.reconstruct.depthsplat import infer_model, read_depthsplat_checkpoint
        from snd_stages.reconstruct.mvsplat.checkpoint import convert_mvsplat_state_dict

        state = convert_mvsplat_state_dict(read_depthsplat_checkpoint(args.depthsplat))[0]
        configuration = infer_model(state) or "small"
        models = [model for model in models if model.configuration in (None, configuration)]
    rows = [(model, size, nearest_valid(size, model.size_multiple))
            for size in map(parse_size, args.sizes) for model in models]
    sizes = sorted({valid for _, _, valid in rows})
    if args.write_inputs is not None:
        write_inputs(args.write_inputs, sizes, frames)
        return

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    results = []
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        inputs = args.inputs if args.inputs is not None else write_inputs(scratch, sizes, frames)
        pairs = [(first, first + args.gap) for first in range(args.pairs + 1)]
        for model, asked, (height, width) in rows:
            given = args.mvsplat if model.configuration is None else args.depthsplat
            checkpoint = given if given is not None else random_checkpoint(scratch, model)
            scene = read_scene(inputs, scene_id(height, width))
            if len(scene) < frames:
                raise SystemExit(f"{inputs} holds {len(scene)} frames at {height}x{width}; --pairs {args.pairs} "
                                 f"--gap {args.gap} needs {frames}")
            measured = time_model(gaussians_cfg(model, checkpoint, args.device), scene, pairs, cuda)
            results.append((model, asked, (height, width), "random init" if given is None else given.name, measured))
            if cuda:
                torch.cuda.empty_cache()

    device = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    table = Table(title=f"Reconstructors: one context pair (float32, TF32 off) on {device}")
    for column in ("reconstructor", "size", "weights", "ms/pair", "pairs/s", "peak GPU GiB", "AbsRel", "δ1<1.25"):
        table.add_column(column, justify="right")
    for model, asked, (height, width), weights, measured in results:
        size = f"{height}x{width}" + ("" if (height, width) == asked else f" (for {asked[0]}x{asked[1]})")
        peak = "-" if measured["peak"] is None else f"{measured['peak']:.2f}"
        table.add_row(model.label, size, weights, f"{measured['seconds'] * 1e3:.1f}", f"{1 / measured['seconds']:.2f}",
                      peak, f"{measured['abs_rel']:.3f}", f"{measured['delta1']:.3f}")
    console = Console(width=max(Console().width, 130))  # the table's eight columns, also when piped
    console.print(table)
    console.print(f"torch {torch.__version__}; {args.pairs} pairs per row (frames i, i + {args.gap}) after one "
                  "warm-up pair; depth: the encoder's depth maps vs the scene's true z-depth, valid pixels of both "
                  "views.")
    if any(weights == "random init" for *_, weights, _ in results):
        console.print("note: rows with random weights time correctly, but their depth is meaningless; pass "
                      "--mvsplat / --depthsplat checkpoints for the trained models' depth quality.")


if __name__ == "__main__":
    main()
