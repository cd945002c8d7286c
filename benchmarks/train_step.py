"""Training-step cost: the full Splat-and-Distill step and its teacher side, per image size and batch.

Inputs are the two-frame scenes that ``benchmarks/precompute.py --write-inputs DIR`` writes; the sample is
(context 0, 1 -> target 1), repeated ``--batch`` times, with depth-reconstructed Gaussians and ground-truth
instance masks. Prints median step time, samples/s and peak GPU memory.

    python benchmarks/train_step.py --inputs DIR --sizes 448x448 576x880 --batch 8 [--weights PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from snd_stages.config import GaussiansCfg, TrainCfg
from snd_stages.geometry import image_to_tensor
from snd_stages.reconstruct import build_reconstructor
from snd_stages.scenes.layout import read_scene
from snd_stages.stages.precompute_gaussians import PairGaussians, context_views
from snd_stages.stages.train import TrainingSample, build_model, distillation_step, make_optimizer, teacher_targets


def sample_of(root: Path, size: str) -> TrainingSample:
    scene = read_scene(root, f"bench{size}")
    gaussians = build_reconstructor(GaussiansCfg(device="cpu")).reconstruct(context_views(scene, (0, 1), True))
    image = lambda p: image_to_tensor(scene.load_image(p))  # noqa: E731
    mask = lambda p: torch.from_numpy(scene.load_instances(p)).long()  # noqa: E731
    pair = PairGaussians(scene.scene_id, (0, 1), gaussians, scene.camera[[0, 1]], [1], scene.camera[[1]])
    return TrainingSample(torch.stack([image(0), image(1)]), torch.stack([mask(0), mask(1)]), image(1), mask(1),
                          pair, scene.camera[[1]])


def median_seconds(function, repeats: int) -> float:
    function()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=Path, required=True)
    parser.add_argument("--sizes", nargs="+", default=["448x448", "576x880"])
    parser.add_argument("--batch", type=int, nargs="+", default=[8])
    parser.add_argument("--backbone", default="dinov2_vits14")
    parser.add_argument("--weights", default="random")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this benchmark times the GPU path"
    device = torch.device("cuda")
    cfg = TrainCfg(backbone=args.backbone, weights=args.weights, allow_random_weights=args.weights == "random")
    autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731

    table = Table(title=f"Splat-and-Distill training step, {args.backbone}, bf16 autocast, 65,536 prototypes")
    for column in ("image", "student input", "batch", "teacher side ms", "full step ms", "samples/s", "peak GiB"):
        table.add_column(column, justify="right")
    for size in args.sizes:
        sample = sample_of(args.inputs, size)
        height, width = sample.target_image.shape[-2:]
        for batch_size in args.batch:
            torch.manual_seed(0)
            model = build_model(cfg).to(device)
            optimizer, scheduler = make_optimizer(model, cfg, 10_000)
            batch = [sample] * batch_size

            def teacher_side():
                teacher_targets(model, batch, cfg, device, autocast)

            def full_step():
                loss, _ = distillation_step(model, batch, cfg, device, autocast)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                model.update_teacher(cfg.ema_momentum)
                optimizer.step()
                scheduler.step()

            torch.cuda.reset_peak_memory_stats()
            try:
                teacher_ms = median_seconds(teacher_side, args.repeats) * 1e3
                step_ms = median_seconds(full_step, args.repeats) * 1e3
            except torch.cuda.OutOfMemoryError:
                table.add_row(size, "", str(batch_size), "OOM", "OOM", "", "")
                continue
            peak = torch.cuda.max_memory_allocated() / 2**30
            table.add_row(size, f"{height - height % 14}x{width - width % 14}", str(batch_size), f"{teacher_ms:.1f}",
                          f"{step_ms:.1f}", f"{batch_size / step_ms * 1e3:.1f}", f"{peak:.1f}")
            torch.cuda.empty_cache()
    Console().print(table)
    Console().print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
