"""Fitting probe heads on frozen features: every model's and every seed's head in one vmapped step, with repeatable
kernels."""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from collections.abc import Sequence
from typing import Callable

import numpy as np
import torch
from rich.progress import Progress

from ..config import EvalCfg
from ..progress import track
from ..report.statistics import Measurement
from .features import FeatureSet, ModelFeatures, stackable_groups


@contextlib.contextmanager
def repeatable_kernels(device: torch.device):
    """Kernels that give the same bits on every run (and float32 without TF32 on CUDA), restored afterwards.

    A probe's fit is thousands of small steps: a nondeterministic kernel's rounding there became a different
    depth score (0.640 against 0.619 RMSE, same features and seed). cuDNN's autotuned convolutions and TF32
    products are what remain once the resizes are matrix products (:mod:`snd_stages.probes.resize`).
    """
    if torch.device(device).type != "cuda":
        yield
        return
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.matmul.allow_tf32, torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    # warn_only: an op without a deterministic CUDA kernel warns (naming itself) instead of stopping an eval.
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
         torch.backends.cuda.matmul.allow_tf32) = saved[:4]
        torch.use_deterministic_algorithms(saved[4], warn_only=saved[5])


def fit_seeds(make_head: Callable[[], torch.nn.Module], loss_of, inputs_of, count: int, cfg: EvalCfg, device,
               seeds: Sequence[int], description: str = "probe",
               progress: Progress | None = None) -> list[torch.nn.Module]:
    """One head per seed, fitted together: AdamW, a linear warm-up then a cosine decay to 0, each seed on its own
    random minibatches (a generator seeded with the seed: the same draws for every model). The loss's own warm-up
    (FiT3D's SigLoss mean term) runs for its first ``min(100, steps // 10)`` steps.

    Each seed's head is initialised after ``torch.manual_seed(seed)``, as a fit of its own would be. The heads'
    parameters are stacked on a leading seed axis and the per-seed losses computed under ``torch.func.vmap``:
    a probe step is a few hundred small kernels, and on a GPU their launches, not their arithmetic, set the pace,
    so one step for all seeds costs about what one seed's step did. The fits stay independent: the sum of the
    per-seed losses gives each head exactly its own gradient, AdamW is elementwise and the gradient clip is taken
    per seed, so a seed's head is the one it gets alone, up to the rounding of kernels that see a larger batch
    (tested).

    Args:
        make_head: builds one untrained head.
        loss_of: ``(head, *inputs, warmup) -> scalar`` loss of one seed's minibatch; ``head`` is called like the
            module. It runs under vmap: no data-dependent shapes or branches.
        inputs_of: ``[seeds, batch]`` frame indices -> tensors on ``device`` with leading ``[seeds, batch]`` axes.
        count: frames to draw from.

    Returns:
        the fitted heads, in ``seeds`` order, in eval mode.
    """
    heads = []
    for seed in seeds:
        torch.manual_seed(seed)
        heads.append(make_head().to(device).train())
    parameters, buffers = torch.func.stack_module_state(heads)
    template = copy.deepcopy(heads[0]).to("meta")
    optimizer = torch.optim.AdamW(parameters.values(), lr=cfg.probe_learning_rate, weight_decay=0.01)
    warmup = max(1, round(cfg.probe_steps * cfg.probe_warmup_fraction))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(warmup_cosine, warmup=warmup,
                                                                               steps=cfg.probe_steps))
    loss_warmup = min(100, cfg.probe_steps // 10)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    batch_size = min(cfg.probe_batch_size, count)

    def seed_loss(in_warmup: bool, seed_parameters, seed_buffers, *inputs):
        def head(*args, **kwargs):
            return torch.func.functional_call(template, (seed_parameters, seed_buffers), args, kwargs)
        return loss_of(head, *inputs, warmup=in_warmup)

    with repeatable_kernels(device):
        for step in track(range(cfg.probe_steps), description, progress, unit="step"):
            batches = torch.stack([torch.randint(0, count, (batch_size,), generator=generator)
                                   for generator in generators])
            losses = torch.func.vmap(functools.partial(seed_loss, step < loss_warmup))(parameters, buffers,
                                                                                       *inputs_of(batches))
            optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            clip_per_seed(list(parameters.values()), 35.0)  # FiT3D's gradient clip
            optimizer.step()
            scheduler.step()
    with torch.no_grad():
        for index, head in enumerate(heads):
            for name, stacked in parameters.items():
                head.get_parameter(name).copy_(stacked[index])
    return [head.eval() for head in heads]


def fitted_per_model(train_sets: Sequence[FeatureSet], seeds: Sequence[int],
                     fit: Callable[[ModelFeatures, list[int]], list[torch.nn.Module]]) -> list[list[torch.nn.Module]]:
    """``heads[model][seed]``: the heads of every model fitted together, ``fit(features, fits' seeds)`` once per group
    of models whose features stack (usually one: every model of an eval shares its backbone's grid).

    The fits are model-major (``seeds`` for the first model, then for the next) and each is seeded by its seed alone,
    so a model's heads are those :func:`fit_seeds` gives it on its own: the same initialisation, the same minibatches
    and its own gradient (tested). On a GPU the step of all models costs about what one model's did.
    """
    heads: list[list[torch.nn.Module]] = [[] for _ in train_sets]
    for group in stackable_groups(train_sets):
        fitted = fit(ModelFeatures([train_sets[model] for model in group], len(seeds)), list(seeds) * len(group))
        for position, model in enumerate(group):
            heads[model] = fitted[position * len(seeds) : (position + 1) * len(seeds)]
    return heads


def clip_per_seed(parameters: list[torch.Tensor], max_norm: float) -> None:
    """``torch.nn.utils.clip_grad_norm_`` applied to each seed's slice of stacked ``[seeds, ...]`` parameters."""
    grads = [parameter.grad for parameter in parameters if parameter.grad is not None]
    if not grads:
        return
    norms = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(grad.flatten(1), dim=1)
                                                  for grad in grads]), dim=0)
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for grad in grads:
        grad.mul_(scale.reshape(-1, *[1] * (grad.ndim - 1)))


def warmup_cosine(step: int, warmup: int, steps: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def seed_scores(score, heads: Sequence[torch.nn.Module]):
    """``score(head) -> (per-unit rows, predictions)`` for every seed's head: ``([seeds][units] rows, the first
    seed's predictions)`` (the figures show the first seed's probe)."""
    rows, first = [], None
    with torch.no_grad():
        for head in heads:
            head_rows, predictions = score(head)
            rows.append(head_rows)
            first = predictions if first is None else first
    return rows, first


def mean_measurements(rows: list[list[dict]]) -> dict[str, Measurement]:
    """Per-image metric rows ``[seeds][images]`` as one mean-over-images measurement per metric."""
    return {key: Measurement.of_means(np.array([[row[key] for row in seed] for seed in rows], dtype=np.float64))
            for key in rows[0][0]}


def seeds_text(seeds: Sequence[int]) -> str:
    return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"


def fit_label(description: str, features: ModelFeatures, seeds: Sequence[int]) -> str:
    """What a fit's progress bar says: the probe, how many models it fits together, their seeds."""
    models = len(features.sets)
    return f"{description}{f' · {models} models' if models > 1 else ''} · {seeds_text(seeds)}"
