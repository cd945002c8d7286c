"""Training-step cost: the full Splat-and-Distill step, its parts, and the network-only step, in one process.

One subcommand per mode. Those that read scenes (``steps``, ``count-flops``, ``profile``) take ``--inputs DIR``,
the two-frame scenes that ``benchmarks/precompute.py --write-inputs DIR`` writes; the sample is
(context 0, 1 -> target 1), repeated ``--batch`` times, with depth-reconstructed Gaussians and ground-truth
instance masks. Every mode takes ``--sizes``, ``--backbones`` and ``--batch``.

``steps`` (the main table) times, for each (model, size, batch), with warm-up and medians:

- the parts: teacher forward (2B context images), the plain path's upsample+lift, render (gsplat) and
  blend+downsample, the fast path's sparse-operator apply, student forward+backward with both heads and the loss,
  the optimiser step, the EMA update;
- three steps (as the training loop runs them between log steps: without the ``kl`` metric): **full (render)**,
  the plain path; **full (operator)**, the default fast path (``train.teacher_splatting: operator``); **network
  only**, the same teacher and student forwards, backward, heads, optimiser and EMA with the 3D part removed
  (targets = the teacher's first context view resized to the target grid);
- the ratio full (operator) / network only, samples/s, peak memory, and the network's share of the GPU's dense
  bf16 matrix throughput: of the datasheet peak, and of the GEMM ceiling (the fastest of 64 large bf16 products:
  ``gemm_ceiling_tflops``), searched in the same process before the first row and again after every row, every
  share taken against the highest pass (``RunCeiling``). FLOPs counted are the model's (``network_flops``,
  checked against torch's FlopCounterMode in tests/test_benchmarks.py): per image and block
  ``24 n d^2 + 4 n^2 d`` forward; the teacher runs forward only (2B images), the student forward + activation
  backward (its base weights are frozen: no weight gradients), i.e. 2x forward for the linear layers and 3x for
  attention (backward's dV, dP, dQ, dK are two forwards); heads ``2 (d 2048 + 2048^2 + 2048 256 + 256 K)`` per
  token, teacher forward (1x), student forward + backward (3x).

It also composes one operator at each size (``build_splat_operator`` with gsplat) and prints its cost and bytes.
Its ``--batch`` takes sizes and ``max``: the largest batch (a multiple of 8) whose full step, optimiser state
included, peaks within ``--max-memory-fraction`` (0.85) of the GPU's memory, found by doubling and then bisecting
with eager steps before any timing.

The other modes:

- ``count-flops`` prints torch's own count of the network-only step on the GPU (``FlopCounterMode``) beside the
  formula's; the count also books flash attention's recomputed scores and LoRA's products.
- ``kernel-floor`` times the network-only step's matrix products and attention alone, at its shapes, and prints
  their sum: the step's cost if nothing else ran, and the share of the peak that would be.
- ``attention`` times each attention kernel alone at the step's shapes (SDPA's backends, and FA3/FA4 where
  installed), with its error against float64.
- ``profile`` sums the network-only step's CUDA kernel time by part and lists the slowest kernels.

    python benchmarks/train_step.py steps --inputs DIR --sizes 448x448 576x880 --batch 8 max [--weights PATH]
        [--compile [--cuda-graphs]] [--skip-render]
    python benchmarks/train_step.py count-flops --inputs DIR --sizes 576x880 --batch 8
    python benchmarks/train_step.py kernel-floor --sizes 576x880 --batch 8 64
    python benchmarks/train_step.py attention --sizes 576x880 --batch 8 64 --repeats 20
    python benchmarks/train_step.py profile --inputs DIR --sizes 576x880 --batch 64 --compile [--slowest 40]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import math
import statistics
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

from snd_stages.artifacts.gaussians import PairGaussians
from snd_stages.config import TrainCfg
from snd_stages.gaussians import Gaussians
from snd_stages.geometry import Camera, image_to_channels
from snd_stages.models.backbones import backbone_spec
from snd_stages.models.checkpoints import build_model
from snd_stages.reconstruct import GaussiansCfg, build_reconstructor
from snd_stages.scenes.layout import read_scene
from snd_stages.splat.features import blend_with_segments, downsample_to_tokens, lift_features, mask_aware_upsample
from snd_stages.splat.operator import apply_operators, build_splat_operator
from snd_stages.splat.render import render_features
from snd_stages.stages.precompute_gaussians import context_views
from snd_stages.stages.train import (
    TrainingSample,
    distillation_step,
    learn,
    make_optimizer,
    teacher_targets,
    upload,
)

def token_grid(backbones: list[str], height: int, width: int) -> tuple[int, int]:
    """The token grid that every benchmarked backbone cuts a ``height`` x ``width`` image into: the targets and the
    operator of one image size serve them all."""
    grids = {backbone_spec(backbone).token_grid(height, width) for backbone in backbones}
    if len(grids) > 1:
        raise SystemExit(f"--backbones {' '.join(backbones)} cut {height}x{width} images into different token grids "
                         f"{sorted(grids)}; benchmark backbones of one patch size at a time")
    return grids.pop()


PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16 tensor-core peak (SXM)


def sample_of(root: Path, size: str) -> TrainingSample:
    scene = read_scene(root, f"bench{size}")
    gaussians = build_reconstructor(GaussiansCfg(device="cuda")).reconstruct(context_views(scene, (0, 1), True))
    image = lambda p: image_to_channels(scene.load_image(p))  # noqa: E731
    mask = lambda p: torch.from_numpy(scene.load_instances(p)).long()  # noqa: E731
    pair = PairGaussians(scene.scene_id, (0, 1), gaussians, scene.camera[[0, 1]], [1], scene.camera[[1]])
    # uint8 and page-locked, as training's batches are on a GPU.
    return TrainingSample(torch.stack([image(0), image(1)]).pin_memory(), torch.stack([mask(0), mask(1)]),
                          image(1).pin_memory(), mask(1), pair, scene.camera[[1]])


def median_ms(function, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        function()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def largest_batch(fits, start: int = 8, step: int = 8, limit: int = 4096) -> int:
    """The largest multiple of ``step`` (from ``start``) for which ``fits(batch)`` is true: double until it fails,
    then bisect. Memory grows with the batch, so ``fits`` is monotone. 0 when not even ``start`` fits."""
    if not fits(start):
        return 0
    low, high = start, None
    while high is None:
        candidate = 2 * low
        if candidate > limit:
            return low
        if fits(candidate):
            low = candidate
        else:
            high = candidate
    while high - low > step:
        middle = (low + high) // 2 // step * step
        if fits(middle):
            low = middle
        else:
            high = middle
    return low


def step_fits(model, optimizer, scheduler, sample: TrainingSample, cfg: TrainCfg, batch_size: int,
              device: torch.device, memory_fraction: float) -> bool:
    """Whether two full steps at ``batch_size`` (the second with the optimiser's state allocated) run within
    ``memory_fraction`` of the GPU's memory. The headroom covers what the timings hold besides a step (the parts'
    outputs) and compiled kernels' different buffers; a batch that only just fits in eager mode fails there."""
    batch = [sample] * batch_size
    torch.cuda.reset_peak_memory_stats()
    try:
        for _ in range(2):
            loss, result = distillation_step(model, batch, cfg, device, bf16_autocast,
                                             targets=teacher_targets(model, batch, cfg, device, bf16_autocast),
                                             with_kl=False)
            learn(loss, result.statistics, model, optimizer, scheduler, cfg.ema_momentum)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() <= memory_fraction * torch.cuda.get_device_properties(device).total_memory
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()


def batch_sizes(requested: list[str]) -> list[str]:
    for value in requested:
        if value != "max" and not (value.isdigit() and int(value) > 0):
            raise SystemExit(f"--batch {value}: give positive integers or 'max' (the largest batch that fits)")
    return requested


def backbone_flops(vit, patches: int, images: int, training: bool) -> float:
    """Model FLOPs (2 per multiply-add) of a ViT's token extraction on ``images`` images of ``patches`` patches.

    Per image: the patch embedding ``2 p c d`` (c = 3 x 14 x 14 pixel values a patch), then per block over the
    n = patches + prefix tokens ``24 n d^2`` for qkv, proj, fc1 and fc2 and ``4 n^2 d`` for attention's two
    products. ``training`` adds what the student's backward computes: its base weights are frozen (no weight
    gradients) and the images need none, so it is the activation gradient alone, one product per linear layer
    (none for the first block's qkv, whose input nothing trainable precedes) and four per attention (dV, dP, dQ,
    dK), i.e. twice the attention's forward. Flash attention's recomputed scores and LoRA's rank-r products are
    work beyond the model's and are not counted.
    """
    width, depth, tokens = vit.embed_dim, len(vit.blocks), patches + vit.num_prefix_tokens
    patch_pixels = vit.patch_embed.proj.in_channels * math.prod(vit.patch_embed.patch_size)
    linear, attention = 24 * tokens * width**2, 4 * tokens**2 * width
    forward = 2 * patches * patch_pixels * width + depth * (linear + attention)
    if not training:
        return float(images * forward)
    first_qkv_input_gradient = 2 * tokens * width * 3 * width
    return float(images * (forward + depth * (linear + 2 * attention) - first_qkv_input_gradient))


def head_flops(width: int, tokens: int, prototypes: int, training: bool) -> float:
    """Model FLOPs of a DINO head (``width`` -> 2048 -> 2048 -> 256 -> ``prototypes``) on ``tokens`` tokens;
    ``training`` adds backward's activation and weight gradients, twice the forward."""
    forward = 2 * tokens * (width * 2048 + 2048 * 2048 + 2048 * 256 + 256 * prototypes)
    return float(3 * forward if training else forward)


def network_flops(vit, patches: int, batch: int, prototypes: int) -> float:
    """Model FLOPs of the network-only step: the teacher's forward on 2 x ``batch`` context images and its head on
    the targets' tokens, the student's forward and backward on ``batch`` targets with its head and the loss's
    products. Checked against torch's FlopCounterMode on the CPU (tests/test_benchmarks.py)."""
    tokens = batch * patches
    return (backbone_flops(vit, patches, 2 * batch, False) + backbone_flops(vit, patches, batch, True)
            + head_flops(vit.embed_dim, tokens, prototypes, False) + head_flops(vit.embed_dim, tokens, prototypes, True))


def bf16_autocast():
    """The training loop's autocast on CUDA."""
    return torch.autocast("cuda", dtype=torch.bfloat16)


def network_targets(model, batch: list[TrainingSample], grid: tuple[int, int], device: torch.device, autocast):
    """The network-only step's teacher targets: the full step's upload of the context images and teacher forward,
    then no 3D part (the first context view's tokens resized to the target grid, every token covered)."""
    uploaded = upload([sample.context_images for sample in batch], device)
    with torch.no_grad(), autocast():
        context_tokens = model.teacher_tokens(uploaded).float()
    resized = F.interpolate(context_tokens[0::2], size=grid, mode="bilinear", align_corners=False)
    return resized, torch.ones(len(batch), *grid, dtype=torch.bool, device=device)


class SizeInputs(NamedTuple):
    """One image size's sample and what the step reads of it on the GPU (the sample carries its composed operator)."""

    sample: TrainingSample
    grid: tuple[int, int]
    gaussians: Gaussians
    camera: Camera
    target_mask: torch.Tensor


class RowTiming(NamedTuple):
    """One (model, size, batch) row: the parts' and steps' median ms, the peak memory and the model FLOPs."""

    timed: dict[str, float]
    peak_gib: float
    flops: float


def step_tables() -> tuple[Table, Table, Table]:
    """The steps mode's tables: the parts of one step, the steps, and the composing of one operator."""
    parts = Table(title="Parts of one step (median ms)")
    for column in ("model", "image", "batch", "teacher fwd", "upsample+lift", "render", "blend+down", "operator",
                   "student fwd+bwd", "optimiser", "EMA"):
        parts.add_column(column, justify="right")
    steps = Table(title="Steps (median ms), samples/s, network share of the bf16 datasheet peak and of the measured "
                        "GEMM ceiling")
    for column in ("model", "image", "batch", "full (render)", "full (operator)", "network only", "operator/network",
                   "samples/s", "TFLOP/step", "network TFLOP/s", "% of peak", "% of GEMM ceiling", "peak GiB"):
        steps.add_column(column, justify="right")
    operators = Table(title="Composing one sample's operator (gsplat)")
    for column in ("image", "Gaussians", "compose ms", "samples/s", "non-zeros", "stored bytes"):
        operators.add_column(column, justify="right")
    return parts, steps, operators


def compose_operator(sample: TrainingSample, size: str, device: torch.device, operators: Table,
                     backbones: list[str]) -> SizeInputs:
    """Times composing the sample's operator (a row of ``operators``) and keeps the operator on the GPU in the
    sample, as training keeps its cached operators."""
    height, width = sample.target_image.shape[-2:]
    grid = token_grid(backbones, height, width)
    gaussians = sample.pair.gaussians.to(device)
    camera = sample.target_camera.to(device=device, dtype=torch.float32)
    masks, target_mask = sample.context_masks.to(device), sample.target_mask.to(device)

    def compose():
        return build_splat_operator(gaussians, camera, masks, target_mask, grid, grid)

    compose_ms = median_ms(compose, 3, warmup=1)
    operator = compose()
    stored = sum(array.nbytes for array in operator.to_arrays().values())
    operators.add_row(size, f"{len(gaussians):,}", f"{compose_ms:.1f}", f"{1e3 / compose_ms:.1f}",
                      f"{operator.nonzeros():,}", f"{stored:,}")
    sample.operator = operator
    return SizeInputs(sample, grid, gaussians, camera, target_mask)


def largest_fitting_batch(cfg: TrainCfg, sample: TrainingSample, device: torch.device, memory_fraction: float) -> int:
    """``--batch max``: the largest batch whose full step fits (:func:`largest_batch` over :func:`step_fits`),
    searched with an eager model of its own, released when it returns, before any timing."""
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    optimizer, scheduler = make_optimizer(model, cfg, 10_000)
    return largest_batch(
        lambda size: step_fits(model, optimizer, scheduler, sample, cfg, size, device, memory_fraction))


def time_parts_and_steps(model, optimizer, scheduler, cfg: TrainCfg, inputs: SizeInputs, batch_size: int,
                         skip_render: bool, repeats: int, device: torch.device) -> dict[str, float] | None:
    """Median ms of each part and of the three steps (keys as the tables read them); None when they run out of
    memory. The plain (render) path's parts and step are left out with ``skip_render``."""
    autocast = bf16_autocast
    render_cfg = TrainCfg(**{**cfg.__dict__, "teacher_splatting": "render"})
    sample, grid, gaussians, camera, target_mask = inputs
    batch = [sample] * batch_size
    contexts = upload([s.context_images for s in batch], device)

    def teacher_forward():
        model.begin_step()
        with autocast():
            return model.teacher_tokens(contexts).float()

    tokens = teacher_forward().clone()  # kept: under CUDA graphs the next replay reuses the output
    index_masks = [s.context_masks.to(device) for s in batch]

    def upsample_lift():
        return [lift_features(mask_aware_upsample(tokens[2 * i : 2 * i + 2], index_masks[i]), gaussians)
                for i in range(batch_size)]

    def render():
        return [render_features(gaussians, features, camera).features for features in lifted]

    lifted = rendered = None
    if not skip_render:
        lifted = upsample_lift()
        rendered = render()

    def blend_downsample():
        return [downsample_to_tokens(blend_with_segments(r.permute(0, 3, 1, 2), target_mask[None], 0.5), grid)
                for r in rendered]

    device_operators = [sample.operator] * batch_size

    def apply():
        return apply_operators(device_operators, tokens, cfg.blending)

    targets = apply()

    def step(targets_fn, step_cfg):
        def run():  # as the training loop runs a step (reading the loss included)
            model.begin_step()
            loss, result = distillation_step(model, batch, step_cfg, device, autocast,
                                             targets=targets_fn(), with_kl=False)
            learn(loss, result.statistics, model, optimizer, scheduler, cfg.ema_momentum)
        return run

    def student_side():
        model.begin_step()
        loss, _ = distillation_step(model, batch, cfg, device, autocast, targets=targets, with_kl=False)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()

    torch.cuda.reset_peak_memory_stats()
    try:
        timed = {
            "teacher": median_ms(teacher_forward, repeats),
            "operator": median_ms(apply, repeats),
            "student": median_ms(student_side, repeats),
            "optimiser": median_ms(optimizer.step, repeats),
            "ema": median_ms(lambda: model.update_teacher(cfg.ema_momentum), repeats),
            "full_operator": median_ms(step(lambda: teacher_targets(model, batch, cfg, device, autocast), cfg),
                                       repeats),
            "network": median_ms(step(lambda: network_targets(model, batch, grid, device, autocast), cfg), repeats),
        }
        if not skip_render:
            timed["upsample"] = median_ms(upsample_lift, repeats)
            timed["render"] = median_ms(render, repeats)
            timed["blend"] = median_ms(blend_downsample, repeats)
            timed["full_render"] = median_ms(
                step(lambda: teacher_targets(model, batch, render_cfg, device, autocast), render_cfg), repeats)
    except torch.cuda.OutOfMemoryError:
        return None
    return timed


def time_row(cfg: TrainCfg, inputs: SizeInputs, batch_size: int, args, device: torch.device) -> RowTiming | None:
    """One row of the steps mode on a fresh model (seeded, compiled as asked); None when it runs out of memory.
    Everything the row allocated is released when it returns."""
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    if args.compile:
        model.compile_backbones(cuda_graphs=args.cuda_graphs)
    optimizer, scheduler = make_optimizer(model, cfg, 10_000)
    timed = time_parts_and_steps(model, optimizer, scheduler, cfg, inputs, batch_size, args.skip_render,
                                 args.repeats, device)
    if timed is None:
        return None
    flops = network_flops(model.teacher.get_base_model(), inputs.grid[0] * inputs.grid[1], batch_size, cfg.prototypes)
    return RowTiming(timed, torch.cuda.max_memory_allocated() / 2**30, flops)


def record_row(parts: Table, step_rows: list, labels: list[str], batch_size: int, row: RowTiming) -> float:
    """Adds a timed row to the parts table and its cells to ``step_rows`` (the share of the GEMM ceiling comes once
    the run's passes are known); returns the network-only step's TFLOP/s."""
    timed = row.timed
    achieved = row.flops / (timed["network"] * 1e-3) / 1e12
    dash = lambda key: f"{timed[key]:.1f}" if key in timed else "-"  # noqa: E731
    parts.add_row(*labels, dash("teacher"), dash("upsample"), dash("render"), dash("blend"), dash("operator"),
                  dash("student"), dash("optimiser"), dash("ema"))
    step_rows.append(([*labels, dash("full_render"), dash("full_operator"), dash("network"),
                       f"{timed['full_operator'] / timed['network']:.3f}",
                       f"{batch_size / timed['full_operator'] * 1e3:.1f}", f"{row.flops / 1e12:.2f}",
                       f"{achieved:.0f}", f"{100 * achieved / peak_tflops():.1f}"], achieved, f"{row.peak_gib:.1f}"))
    return achieved


def time_steps(args) -> None:
    """The parts of one step, the three steps and the composing of one operator, for every (model, size, batch),
    between GEMM-ceiling passes (``train_step.py --help`` says what each column is)."""
    if args.cuda_graphs and not args.compile:
        raise SystemExit("--cuda-graphs replays the compiled backbones: add --compile")
    if args.compile:
        allow_a_compile_per_row()
    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.device("cuda")
    console = Console()
    parts, steps, operators = step_tables()
    ceilings = RunCeiling()
    ceilings.add(gemm_ceiling_tflops(args.repeats))
    step_rows: list[tuple[list[str], float | None, str]] = []  # cells before the share, TFLOP/s (None: OOM), GiB
    for size in args.sizes:
        inputs = compose_operator(sample_of(args.inputs, size), size, device, operators, args.backbones)
        for backbone in args.backbones:
            cfg = TrainCfg(backbone=backbone, weights=args.weights, allow_random_weights=args.weights == "random")
            for requested in args.batch:
                if requested == "max":
                    batch_size = largest_fitting_batch(cfg, inputs.sample, device, args.max_memory_fraction)
                    torch.cuda.empty_cache()
                    if batch_size == 0:
                        step_rows.append(([backbone, size, "max", "OOM at 8", *[""] * 7], None, ""))
                        continue
                    label = f"{batch_size} (max)"
                else:
                    batch_size, label = int(requested), requested
                row = time_row(cfg, inputs, batch_size, args, device)
                torch.cuda.empty_cache()
                if row is None:
                    step_rows.append(([backbone, size, label, "OOM", *[""] * 7], None, ""))
                    continue
                achieved = record_row(parts, step_rows, [backbone, size, label], batch_size, row)
                ceilings.add(gemm_ceiling_tflops(args.repeats))  # the state the GPU was in just after this row
                # A line as each row ends, so that a run cut short still reports what it timed.
                console.print(f"{backbone} {size} batch {label}: network only {row.timed['network']:.1f} ms, "
                              f"{achieved:.0f} TFLOP/s, {100 * achieved / peak_tflops():.1f} % of peak, "
                              f"{ceilings.share(achieved):.1f} % of the highest GEMM ceiling so far")
    for cells, achieved, peak in step_rows:  # shares against the run's highest pass, known only now
        steps.add_row(*cells, "" if achieved is None else f"{ceilings.share(achieved):.1f}", peak)
    console.print(parts)
    console.print(steps)
    console.print(operators)
    console.print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, compile={args.compile}; "
                  f"{ceilings.describe()}")


def allow_a_compile_per_row() -> None:
    """Every (backbone, shape) compiled in one process is one more entry for the same function; past Dynamo's
    default limit of 8 it would silently run eager and the later rows would not be compiled timings."""
    torch._dynamo.config.recompile_limit = 64


def count_flops(args) -> None:
    """torch's own count of the network-only step (matrix products and attention, forward and backward), beside
    the formula's. A mode of its own, apart from the timings: running the compiled loss under a dispatch mode
    leaves later steps of the same process slower."""
    device = torch.device("cuda")
    table = Table(title="FLOPs of the network-only step: formula vs torch's FlopCounterMode")
    for column in ("model", "image", "batch", "formula TFLOP", "counted TFLOP"):
        table.add_column(column, justify="right")
    for size in args.sizes:
        scene = read_scene(args.inputs, f"bench{size}")
        images = torch.stack([image_to_channels(scene.load_image(p)) for p in (0, 1)])
        grid = token_grid(args.backbones, *images.shape[-2:])
        for backbone in args.backbones:
            cfg = TrainCfg(backbone=backbone, weights=args.weights, allow_random_weights=args.weights == "random")
            model = build_model(cfg).to(device)
            optimizer, _ = make_optimizer(model, cfg, 10_000)
            for batch_size in args.batch:
                batch = [TrainingSample(images, None, images[1], None, None, None)] * batch_size
                with FlopCounterMode(display=False) as counter:
                    targets = network_targets(model, batch, grid, device, bf16_autocast)
                    loss, _ = distillation_step(model, batch, cfg, device, bf16_autocast, targets=targets, with_kl=False)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                formula = network_flops(model.teacher.get_base_model(), grid[0] * grid[1], batch_size, cfg.prototypes)
                table.add_row(backbone, size, str(batch_size), f"{formula / 1e12:.2f}",
                              f"{counter.get_total_flops() / 1e12:.2f}")
            del model, optimizer
            torch.cuda.empty_cache()
    Console().print(table)


def kernel_floor(args) -> None:
    """The step's matrix products and attention, each timed alone at the step's shapes with the library kernels
    (cuBLAS through ``torch.matmul``, SDPA's fastest backend), summed with their counts: what the network-only step
    would take if nothing else ran (no LayerNorm, GELU, residual, LoRA, loss rows, optimiser or launch gaps)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = torch.device("cuda")
    table = Table(title="Kernel floor: the network-only step's matrix products and attention alone (bf16, median ms)")
    for column in ("model", "image", "batch", "backbone GEMMs", "attention", "head GEMMs", "logits GEMMs",
                   "sum ms", "formula TFLOP", "% of peak at the floor", "% of GEMM ceiling at the floor"):
        table.add_column(column, justify="right")

    product_ms = functools.partial(matmul_ms, repeats=args.repeats)

    def attention_ms(images: int, heads: int, tokens: int, backward: bool) -> float:
        best = math.inf
        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
            q, k, v = (torch.randn(images, heads, tokens, 64, device=device, dtype=torch.bfloat16, requires_grad=backward)
                       for _ in range(3))

            def run():
                out = F.scaled_dot_product_attention(q, k, v)
                if backward:
                    out.backward(torch.ones_like(out))
            try:
                with sdpa_kernel(backend):
                    best = min(best, median_ms(run, args.repeats))
            except RuntimeError:  # backend not available for this shape or build
                pass
        return best

    ceiling = gemm_ceiling_tflops(args.repeats)
    for size in args.sizes:
        height, width = (int(side) for side in size.split("x"))
        grid = token_grid(backbones, height, width)
        patches = grid[0] * grid[1]
        for backbone in args.backbones:
            cfg = TrainCfg(backbone=backbone, weights="random", allow_random_weights=True)
            vit = build_model(cfg).teacher.get_base_model()
            width_, depth, heads = vit.embed_dim, len(vit.blocks), vit.blocks[0].attn.num_heads
            tokens = patches + vit.num_prefix_tokens
            for batch in args.batch:
                # Per block: qkv, proj, fc1, fc2 as (inner, columns); the student's activation gradient runs each
                # product transposed (its base weights are frozen: no weight gradients).
                products = [(width_, 3 * width_), (width_, width_), (width_, 4 * width_), (4 * width_, width_)]
                teacher = sum(product_ms(2 * batch * tokens, i, o) for i, o in products)
                student = sum(product_ms(batch * tokens, i, o) + product_ms(batch * tokens, o, i) for i, o in products)
                backbone_ms = depth * (teacher + student)
                attention = depth * (attention_ms(2 * batch, heads, tokens, False) + attention_ms(batch, heads, tokens, True))
                rows = batch * patches
                head = [(width_, 2048), (2048, 2048), (2048, 256)]
                # Teacher forward; student forward, activation and weight gradients.
                head_ms = sum(2 * product_ms(rows, i, o) + product_ms(rows, o, i) + product_ms(i, rows, o)
                              for i, o in head)
                # Student and teacher logits, then the bottleneck and prototype gradients.
                logits_ms = (2 * product_ms(rows, 256, cfg.prototypes) + product_ms(rows, cfg.prototypes, 256)
                             + product_ms(cfg.prototypes, rows, 256))
                total = backbone_ms + attention + head_ms + logits_ms
                flops = network_flops(vit, patches, batch, cfg.prototypes)
                table.add_row(backbone, size, str(batch), f"{backbone_ms:.1f}", f"{attention:.1f}", f"{head_ms:.1f}",
                              f"{logits_ms:.1f}", f"{total:.1f}", f"{flops / 1e12:.2f}",
                              f"{100 * flops / (total * 1e-3) / 1e12 / peak_tflops():.1f}",
                              f"{100 * flops / (total * 1e-3) / 1e12 / ceiling.tflops:.1f}")
                torch.cuda.empty_cache()
    Console().print(table)
    Console().print(ceiling.describe())


def attention_backends(args) -> None:
    """Each SDPA backend alone at the step's attention shapes (the backbone's heads, 64 wide, over one image's
    tokens), forward and backward, with its error against a float64 reference. Then the FlashAttention
    implementations torch can hand SDPA's flash backend to (FA3, FA4), where their packages are installed:
    activating one is for the rest of the process, so they come last."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = torch.device("cuda")
    table = Table(title="Attention at the step's shapes (bf16, median ms; backward counted as 2.5x the forward's FLOPs)")
    for column in ("model", "image", "batch", "kernel", "forward ms", "forward TFLOP/s", "backward ms",
                   "backward TFLOP/s", "error out", "error grads"):
        table.add_column(column, justify="right")

    def measure(kernel: str, backend, shape: tuple[int, int, int, int], label: list[str]) -> None:
        images, heads, tokens, width = shape
        generator = torch.Generator(device=device).manual_seed(0)
        q, k, v, grad = (torch.randn(shape, device=device, generator=generator) for _ in range(4))
        # The error of one image against float64, relative to the largest reference value.
        exact = [x[:1].double().requires_grad_() for x in (q, k, v)]
        reference = F.scaled_dot_product_attention(*exact)
        reference.backward(grad[:1].double())
        low = [x.bfloat16().requires_grad_() for x in (q, k, v)]
        grad = grad.bfloat16()
        try:
            with sdpa_kernel(backend):
                single = [x[:1].detach().requires_grad_() for x in low]
                out = F.scaled_dot_product_attention(*single)
                out.backward(grad[:1])
                with torch.no_grad():
                    forward = median_ms(lambda: F.scaled_dot_product_attention(*low), args.repeats)

                def both():
                    F.scaled_dot_product_attention(*low).backward(grad)
                backward = median_ms(both, args.repeats) - forward
        except RuntimeError as error:  # the backend does not take this shape or build
            table.add_row(*label, kernel, "unavailable", str(error).splitlines()[0][:60], "", "", "", "")
            return
        error_out = ((out.double() - reference).abs().max() / reference.abs().max()).item()
        error_grads = max(((x.grad.double() - r.grad).abs().max() / r.grad.abs().max()).item()
                          for x, r in zip(single, exact))
        flops = 4 * images * heads * tokens**2 * width
        table.add_row(*label, kernel, f"{forward:.2f}", f"{flops / forward / 1e9:.0f}", f"{backward:.2f}",
                      f"{2.5 * flops / backward / 1e9:.0f}", f"{error_out:.1e}", f"{error_grads:.1e}")

    shapes = []
    for size in args.sizes:
        height, width = (int(side) for side in size.split("x"))
        grid = token_grid(backbones, height, width)
        for backbone in args.backbones:
            vit = build_model(TrainCfg(backbone=backbone, weights="random", allow_random_weights=True)).teacher.get_base_model()
            heads, tokens = vit.blocks[0].attn.num_heads, grid[0] * grid[1] + vit.num_prefix_tokens
            shapes += [([backbone, size, str(batch)], (batch, heads, tokens, vit.embed_dim // heads)) for batch in args.batch]
    kernels = {"cuDNN": SDPBackend.CUDNN_ATTENTION, "flash (FA2, in torch)": SDPBackend.FLASH_ATTENTION,
               "memory-efficient": SDPBackend.EFFICIENT_ATTENTION}
    for label, shape in shapes:
        for kernel, backend in kernels.items():
            measure(kernel, backend, shape, label)
    notes = []
    for implementation in getattr(torch.nn.attention, "list_flash_attention_impls", lambda: [])():
        try:
            torch.nn.attention.activate_flash_attention_impl(implementation)
        except Exception as error:  # its package is not installed, or does not run on this GPU
            notes.append(f"{implementation}: not available ({type(error).__name__}: {str(error).splitlines()[0][:100]})")
            continue
        for label, shape in shapes:
            measure(f"flash ({implementation})", SDPBackend.FLASH_ATTENTION, shape, label)
    Console().print(table)
    for note in notes:
        Console().print(note)


def kernel_category(name: str) -> str:
    """The part of the step a CUDA kernel belongs to, by its name (cuDNN's and flash's attention, cuBLAS's products,
    the loss rows' Triton kernel, Inductor's generated kernels, copies)."""
    lowered = name.lower()
    if "soft_cross_entropy" in lowered:
        return "loss rows (Triton)"
    if any(key in lowered for key in ("fmha", "flash", "attention", "sdpa")):
        return "attention"
    if any(key in lowered for key in ("gemm", "xmma", "nvjet", "cutlass", "triton_tem_")):  # cuBLAS, or a template
        return "matrix products"
    if name.startswith("triton_"):
        return "Inductor's fused kernels"
    if "memcpy" in lowered or "memset" in lowered:
        return "copies"
    return "other"


def profile_step(args) -> None:
    """Where the network-only step's time goes: its CUDA kernels over ``--repeats`` steps (torch.profiler), summed
    by :func:`kernel_category`, per step, with the slowest kernels by name."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device("cuda")
    console = Console()
    for size in args.sizes:
        scene = read_scene(args.inputs, f"bench{size}")
        images = torch.stack([image_to_channels(scene.load_image(p)) for p in (0, 1)]).pin_memory()
        grid = token_grid(args.backbones, *images.shape[-2:])
        for backbone in args.backbones:
            cfg = TrainCfg(backbone=backbone, weights=args.weights, allow_random_weights=args.weights == "random")
            for batch_size in args.batch:
                torch.manual_seed(0)
                model = build_model(cfg).to(device)
                if args.compile:
                    allow_a_compile_per_row()
                    model.compile_backbones()
                optimizer, scheduler = make_optimizer(model, cfg, 10_000)
                batch = [TrainingSample(images, None, images[1], None, None, None)] * batch_size

                def run():
                    targets = network_targets(model, batch, grid, device, bf16_autocast)
                    loss, result = distillation_step(model, batch, cfg, device, bf16_autocast, targets=targets,
                                                     with_kl=False)
                    learn(loss, result.statistics, model, optimizer, scheduler, cfg.ema_momentum)

                step_ms = median_ms(run, args.repeats, warmup=3)
                with profile(activities=[ProfilerActivity.CUDA]) as profiler:
                    for _ in range(args.repeats):
                        run()
                    torch.cuda.synchronize()
                kernels = [event for event in profiler.key_averages() if event.self_device_time_total > 0]
                by_category: dict[str, float] = {}
                for event in kernels:
                    category = kernel_category(event.key)
                    by_category[category] = by_category.get(category, 0.0) + event.self_device_time_total / 1e3
                total = sum(by_category.values())
                table = Table(title=f"{backbone}, {size}, batch {batch_size}: kernel time of the network-only step "
                                    f"(ms a step; the step takes {step_ms:.1f} ms)")
                for column in ("kernels", "ms a step", "share"):
                    table.add_column(column, justify="right")
                for category, ms in sorted(by_category.items(), key=lambda item: -item[1]):
                    table.add_row(category, f"{ms / args.repeats:.1f}", f"{100 * ms / total:.0f} %")
                table.add_row("all kernels", f"{total / args.repeats:.1f}", "100 %")
                console.print(table)
                slowest = Table(title="The slowest kernels (ms a step)")
                for column in ("kernel", "category", "calls a step", "ms a step"):
                    slowest.add_column(column, justify="right" if column != "kernel" else "left")
                for event in sorted(kernels, key=lambda event: -event.self_device_time_total)[: args.slowest]:
                    slowest.add_row(event.key[:70], kernel_category(event.key), f"{event.count / args.repeats:g}",
                                    f"{event.self_device_time_total / 1e3 / args.repeats:.2f}")
                console.print(slowest)
                del model, optimizer, scheduler
                torch.cuda.empty_cache()


def matmul_ms(rows: int, inner: int, columns: int, repeats: int) -> float:
    """Median ms of one bf16 ``[rows, inner] @ [inner, columns]`` product on the GPU (cuBLAS)."""
    a = torch.randn(rows, inner, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(inner, columns, device="cuda", dtype=torch.bfloat16)
    return median_ms(lambda: a @ b, repeats)


def matmul_tflops(rows: int, inner: int, columns: int, repeats: int) -> float:
    """TFLOP/s of one bf16 ``[rows, inner] @ [inner, columns]`` product (:func:`matmul_ms`)."""
    return 2 * rows * inner * columns / (matmul_ms(rows, inner, columns, repeats) * 1e-3) / 1e12


# Sides of the products searched for the GEMM ceiling: every (rows, inner, columns) from these, 64 shapes.
CEILING_SIDES = (4096, 8192, 12288, 16384)


class GemmCeiling(NamedTuple):
    """The fastest bf16 product found: its throughput and its shape (rows, inner, columns)."""

    tflops: float
    shape: tuple[int, int, int]

    def describe(self) -> str:
        rows, inner, columns = self.shape
        peak = peak_tflops()
        share = "" if math.isnan(peak) else f", {100 * self.tflops / peak:.0f} % of the {peak:.0f} TFLOP/s datasheet peak"
        return f"GEMM ceiling {self.tflops:.0f} TFLOP/s ([{rows}, {inner}] @ [{inner}, {columns}]{share})"


def gemm_ceiling_tflops(repeats: int) -> GemmCeiling:
    """The GPU's bf16 matrix throughput as this process measures it: the fastest of 64 large products (every
    (rows, inner, columns) from ``CEILING_SIDES``, cuBLAS), in the manner of a maximum-achievable-matmul search.

    Why beside the datasheet peak: cuBLAS reaches about 70-80 % of that figure at its most favourable shapes, and
    by how much depends on the machine's clocks and power limit. Why many shapes: the fastest is not always
    square, and the maximum over a search can only raise the ceiling, so the step's share of it errs low.
    """
    best = GemmCeiling(0.0, (0, 0, 0))
    for shape in itertools.product(CEILING_SIDES, repeat=3):
        tflops = matmul_tflops(*shape, repeats)
        if tflops > best.tflops:
            best = GemmCeiling(tflops, shape)
    torch.cuda.empty_cache()
    return best


class RunCeiling:
    """Every GEMM-ceiling search of one run, and the highest of them, which every share in the run is taken against.

    Why more than one pass: two searches seconds apart moved by 7 % on an H200, with the clocks and power state.
    A step timed between two passes ran in the same state as one of them or between; the highest pass is the
    denominator that flatters the step least.
    """

    def __init__(self) -> None:
        self.passes: list[GemmCeiling] = []

    def add(self, ceiling: GemmCeiling) -> None:
        self.passes.append(ceiling)

    def highest(self) -> GemmCeiling:
        if not self.passes:
            raise ValueError("no GEMM-ceiling pass measured yet: search once before taking a share of it")
        return max(self.passes, key=lambda ceiling: ceiling.tflops)

    def share(self, achieved_tflops: float) -> float:
        """Per cent of the highest pass."""
        return 100 * achieved_tflops / self.highest().tflops

    def describe(self) -> str:
        passes = ", ".join(f"{ceiling.tflops:.0f}" for ceiling in self.passes)
        return f"{len(self.passes)} GEMM-ceiling passes ({passes} TFLOP/s); shares against the highest: " \
               f"{self.highest().describe()}"


def peak_tflops() -> float:
    """The datasheet's dense bf16 peak of this process's GPU; nan for a GPU the table lacks, or none."""
    if not torch.cuda.is_available():
        return float("nan")
    name = torch.cuda.get_device_name()
    return next((value for key, value in PEAK_BF16_TFLOPS.items() if key in name), float("nan"))


def requested_batches(args) -> list:
    """``--batch`` checked: the steps mode keeps its strings (``max`` searches), every other mode takes sizes."""
    requested = batch_sizes(args.batch)
    if args.batch_search:
        return requested
    if "max" in requested:
        raise SystemExit(f"--batch max only applies to the timed steps (the steps mode); give {args.mode} sizes")
    return [int(value) for value in requested]


def build_parser() -> argparse.ArgumentParser:
    """One subcommand per mode; the options two or more modes share are declared once, as parent parsers."""
    shapes = argparse.ArgumentParser(add_help=False)
    shapes.add_argument("--sizes", nargs="+", default=["448x448", "576x880"], help="HxW image sizes")
    shapes.add_argument("--backbones", nargs="+", default=["dinov2_vits14"])
    scenes = argparse.ArgumentParser(add_help=False)
    scenes.add_argument("--inputs", type=Path, required=True,
                        help="the scenes that benchmarks/precompute.py --write-inputs wrote")
    scenes.add_argument("--weights", default="random")
    repeated = argparse.ArgumentParser(add_help=False)
    repeated.add_argument("--repeats", type=int, default=5)
    compiled = argparse.ArgumentParser(add_help=False)
    compiled.add_argument("--compile", action="store_true", help="torch.compile the backbones (train.compile)")

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True, metavar="MODE")

    def mode(name: str, run, summary: str, parents: list[argparse.ArgumentParser],
             batch_search: bool = False) -> argparse.ArgumentParser:
        subcommand = modes.add_parser(name, parents=[shapes, *parents], help=summary, description=run.__doc__)
        subcommand.add_argument("--batch", nargs="+", default=["8"],
                                help="batch sizes, or max: the largest that fits" if batch_search else "batch sizes")
        subcommand.set_defaults(run=run, batch_search=batch_search)
        return subcommand

    steps = mode("steps", time_steps, "time the parts and the full and network-only steps (the main table)",
                 [scenes, repeated, compiled], batch_search=True)
    steps.add_argument("--max-memory-fraction", type=float, default=0.85,
                       help="--batch max: the largest batch whose step peaks within this share of the GPU's memory")
    steps.add_argument("--skip-render", action="store_true", help="do not time the plain (render) path")
    steps.add_argument("--cuda-graphs", action="store_true",
                       help="with --compile: replay the compiled backbones as CUDA graphs (train.cuda_graphs)")
    mode("count-flops", count_flops, "count the network-only step's FLOPs with torch's FlopCounterMode, beside "
         "the formula", [scenes])
    mode("kernel-floor", kernel_floor, "time the step's matrix products and attention alone and print their sum",
         [repeated])
    mode("attention", attention_backends, "time each attention kernel at the step's shapes, with its error "
         "against float64", [repeated])
    profile = mode("profile", profile_step, "profile the network-only step's CUDA kernels and print their time by "
                   "part", [scenes, repeated, compiled])
    profile.add_argument("--slowest", type=int, default=12, help="how many of the slowest kernels to list")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    assert torch.cuda.is_available(), "this benchmark times the GPU path"
    args.batch = requested_batches(args)
    args.run(args)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
