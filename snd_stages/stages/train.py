"""``snd train``: Splat-and-Distill distillation with an online EMA teacher.

Usage::

    snd train --config pipeline.yaml                      # resumes an interrupted run of the same config
    snd train --set train.steps=200 --set train.blending=1.0
    snd train --resume data/runs/<key>/checkpoints/step-000100.pt
    torchrun --nproc-per-node 4 -m snd_stages.cli train --config pipeline.yaml   # 4 GPUs, same global batch

One step, per sample of the batch (see ``reference/method.md`` §1):

1. the teacher (no gradient) embeds the two context images -> patch tokens;
2. mask-aware upsampling to the Gaussians' image size, with each context view's segments;
3. lifting: each Gaussian takes its source pixel's feature;
4. splatting to the target camera (gsplat on CUDA, the torch twin on CPU);
5. semantic blending with the target's segments; bilinear downsampling to the student's token grid;
   tokens no Gaussian reached are zeroed (and still averaged, as in the reference);
6. per-token cross-entropy between the teacher head (stop-grad) and the student head on the target image
   (``train.loss: cosine``: 1 - cosine of the tokens themselves, no heads).
The teacher follows the student by EMA every ``ema_every`` steps, after backward and before the optimiser step
(``train.teacher: frozen``: never).

The run directory ``<runs_root>/<key>/`` (key = training config + input artifact keys) holds
``checkpoints/step-NNNNNN.pt`` (everything needed to continue exactly), ``metrics.csv``, ``pictures/``,
``config.yaml``, the learning curves (``validation.csv``, TensorBoard events, ``curves.png``: see
:mod:`snd_stages.probes.learning_curves`), and at the end ``student.safetensors`` / ``teacher.safetensors``
(LoRA merged, timm-loadable) and ``manifest.json``.

Under torchrun the step's global batch (``train.batch_size``) is split over the processes and DDP averages the
student's gradients (see :mod:`snd_stages.distributed`); rank 0 writes every file, and a checkpoint of any
number of processes resumes with any other.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from rich.progress import Progress
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import distributed
from ..artifacts.gaussians import PairGaussians, pair_unit_name, read_pair
from ..artifacts.masks import MaskReader
from ..artifacts.operators import operator_unit_name, read_operator
from ..artifacts.runs import (
    STUDENT_EXPORT,
    TEACHER_EXPORT,
    RunInputs,
    latest_checkpoint,
    load_checkpoint,
    publish_run,
    read_run_manifest,
    run_inputs,
    run_spec,
    save_checkpoint,
    teacher_operators,
    training_lock,
)
from ..config import DataCfg, SamplingCfg, TrainCfg, dump_sections
from ..reconstruct import GaussiansCfg
from ..masks import MasksCfg
from ..errors import ArtifactError, ConfigError
from ..geometry import Camera, image_to_channels, unit_range
from ..models.backbones import backbone_spec
from ..models.checkpoints import build_model
from ..models.distill import StudentTeacher, ema_schedule
from ..models.losses import cosine_distillation_loss, prototype_cross_entropy
from ..models.lora import export_backbone
from ..models.tokens import token_rows
from ..probes.learning_curves import LearningCurves
from ..runtime import resolve_device
from ..scenes.layout import Scene, read_scene
from ..scenes.sampling import ViewSample
from ..splat.operator import SplatOperator, apply_operators, splat_tokens
from ..splat.quirks import render_inputs
from ..store import Artifact, ArtifactSpec, Store, write_text_atomic
from ..visualize import pca_basis, pca_rgb

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TrainingSample:
    """Everything one distillation sample needs, on the CPU.

    Attributes:
        context_images: ``[2, 3, H, W]`` uint8 RGB, as stored; :func:`upload` makes them float in [0, 1] on the
            device, so a quarter of the bytes cross to the GPU.
        context_masks: ``[2, H, W]`` segment labels.
        target_image: ``[3, H, W]`` uint8 RGB.
        target_mask: ``[H, W]``.
        pair: the stored Gaussians and cameras of the context pair (None on the operator path).
        target_camera: ``[1]`` camera of the target frame (None on the operator path).
        operator: the sample's precomputed teacher operator (``train.teacher_splatting: operator``), else None.
    """

    context_images: torch.Tensor
    context_masks: torch.Tensor
    target_image: torch.Tensor
    target_mask: torch.Tensor
    pair: PairGaussians | None
    target_camera: Camera | None
    operator: SplatOperator | None = None


@functools.lru_cache(maxsize=2)
def epoch_order(seed: int, epoch: int, count: int) -> np.ndarray:
    """The sample order of one epoch; cached, since every step of the epoch reads it."""
    return np.random.default_rng([seed, epoch]).permutation(count)


class LeastRecentlyUsed:
    """A cache of loaded values that drops the least recently used ones beyond ``capacity``, counted in ``size``
    units (1 per value by default; bytes for decoded frames). A value larger than the whole capacity is returned
    without being kept."""

    def __init__(self, capacity: int, size: Callable[[Any], int] = lambda value: 1):
        self.capacity = capacity
        self.size = 0  # of the values kept
        self._size_of = size
        self._values: OrderedDict[Hashable, Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self._values)

    def get(self, key: Hashable, load: Callable[[], Any]) -> Any:
        """The value of ``key``, loaded with ``load()`` if it is not kept."""
        if key in self._values:
            self._values.move_to_end(key)
            return self._values[key]
        value = load()
        size = self._size_of(value)
        if size <= self.capacity:
            self._values[key] = value
            self.size += size
            while self.size > self.capacity:
                _, dropped = self._values.popitem(last=False)
                self.size -= self._size_of(dropped)
        return value


class TrainingData:
    """Samples in an order that is a function of (seed, step) only, read from the precomputed artifacts."""

    def __init__(self, samples: list[ViewSample], dataset_root: Path, gaussians: Artifact, masks: Artifact,
                 seed: int, cached_pairs: int = 64, operators: Artifact | None = None,
                 operator_device: torch.device | str = "cpu", cached_operators: int = 4096, pin_memory: bool = False,
                 cached_frame_bytes: int = 2 * 2**30):
        if not samples:
            raise ArtifactError("the sample list is empty; rerun snd sample-views")
        self.samples = samples
        self.dataset_root = dataset_root
        self.gaussians = gaussians
        self.operators = operators
        self.seed = seed
        self._scenes: dict[str, Scene] = {}
        self._pairs = LeastRecentlyUsed(cached_pairs)
        self._mask = MaskReader(masks)
        # Operators are small (tens to hundreds of kB) and reused every epoch: keep them, already on the device.
        self._operators = LeastRecentlyUsed(cached_operators)
        self._operator_device = operator_device
        # Page-locked images upload asynchronously (``non_blocking``) and several times faster than pageable ones.
        self._pin_memory = pin_memory
        # Decoded frames (uint8 image, int32 mask), by bytes. A frame serves many samples (as a context or a target
        # of several pairs) and every epoch; decoding its PNG and reading its mask again took longer than a small
        # image's whole step on a GPU.
        self._frames = LeastRecentlyUsed(cached_frame_bytes, size=lambda frame: frame[0].nbytes + frame[1].nbytes)

    def indices(self, step: int, batch_size: int) -> list[int]:
        """Sample indices of ``step``: consecutive slices of per-epoch permutations seeded by (seed, epoch)."""
        count = len(self.samples)
        chosen = []
        for offset in range(step * batch_size, (step + 1) * batch_size):
            epoch, position = divmod(offset, count)
            chosen.append(int(epoch_order(self.seed, epoch, count)[position]))
        return chosen

    def batch(self, step: int, batch_size: int, world: distributed.World | None = None) -> list[TrainingSample]:
        """The samples of ``step``; with ``world``, only that rank's slice of the global batch of ``batch_size``."""
        indices = self.indices(step, batch_size)
        return [self.load(index) for index in (indices if world is None else world.shard(indices))]

    def batches(self, steps: range, batch_size: int, world: distributed.World | None = None
                ) -> Iterator[list[TrainingSample]]:
        """:meth:`batch` of each step in ``steps``, the next one read in a background thread meanwhile.

        Decoding images and reading masks and operators then overlaps the step on the device instead of
        preceding it. The batches are the same as :meth:`batch`'s; an error while reading a batch is raised when
        that batch is due. Only the background thread touches this object's caches while the iteration runs.
        """
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="snd-batches") as reader:
            upcoming = reader.submit(self.batch, steps[0], batch_size, world) if steps else None
            for position in range(len(steps)):
                current = upcoming.result()
                if position + 1 < len(steps):
                    upcoming = reader.submit(self.batch, steps[position + 1], batch_size, world)
                yield current

    def load(self, index: int) -> TrainingSample:
        sample = self.samples[index]
        scene = self._scene(sample.scene)
        target = sample.targets[0]
        if self.operators is not None:  # the operator replaces the Gaussians: no need to read a million of them
            pair, target_camera = None, None
            operator = self._operator(operator_unit_name(sample.scene, sample.context, target))
        else:
            pair, operator = self._pair(pair_unit_name(sample.scene, sample.context)), None
            target_index = pair.target_index(target)
            target_camera = pair.target_camera[target_index : target_index + 1]
        contexts = [self._frame(scene, p) for p in sample.context]
        target_frame = self._frame(scene, target)
        # New tensors (the stack, the clone): a sample never shares memory with the cached frames.
        context_images = torch.stack([image for image, _ in contexts])
        target_image = target_frame[0].clone()
        if self._pin_memory:
            context_images, target_image = context_images.pin_memory(), target_image.pin_memory()
        return TrainingSample(
            context_images=context_images,
            context_masks=torch.stack([torch.from_numpy(mask) for _, mask in contexts]).long(),
            target_image=target_image,
            target_mask=torch.from_numpy(target_frame[1]).long(),
            pair=pair,
            target_camera=target_camera,
            operator=operator,
        )

    def _frame(self, scene: Scene, position: int) -> tuple[torch.Tensor, np.ndarray]:
        """Frame ``position``'s ``[3, H, W]`` uint8 image (channels first, as samples carry it) and ``[H, W]``
        stored (int32) mask, decoded once while they fit in the cache; callers copy them into new tensors, never
        changing the cached ones."""
        return self._frames.get((scene.scene_id, position),
                                lambda: (image_to_channels(scene.load_image(position)),
                                         self._mask.stored(scene.scene_id, position)))

    def _scene(self, scene_id: str) -> Scene:
        if scene_id not in self._scenes:
            self._scenes[scene_id] = read_scene(self.dataset_root, scene_id)
        return self._scenes[scene_id]

    def _operator(self, name: str) -> SplatOperator:
        return self._operators.get(
            name, lambda: read_operator(self.operators.load_unit(name)).to(self._operator_device))

    def _pair(self, name: str) -> PairGaussians:
        return self._pairs.get(name, lambda: read_pair(self.gaussians.load_unit(name)))


# ---------------------------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------------------------


def upload(images: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """uint8 host images concatenated (dim 0) on ``device``, as float in [0, 1] (:func:`unit_range`).

    Each is copied on its own, so page-locked ones go asynchronously (a concatenation on the host would land in
    pageable memory first), and as uint8: at 574x868 and batch 64 the float images took 23 ms a step to copy.
    """
    not_uint8 = sorted({str(image.dtype) for image in images if image.dtype != torch.uint8})
    if not_uint8:
        raise TypeError(f"upload takes uint8 images (as stored, see image_to_channels), got {', '.join(not_uint8)}")
    return unit_range(torch.cat([image.to(device, non_blocking=True) for image in images]))


@torch.no_grad()
def teacher_targets(model: StudentTeacher, batch: list[TrainingSample], cfg: TrainCfg, device: torch.device,
                    autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """Splatted, blended, downsampled teacher features at each target view, and their token coverage.

    Returns:
        (``[B, C, h, w]`` float32 targets, ``[B, h, w]`` bool coverage)
    """
    contexts = upload([sample.context_images for sample in batch], device)
    with autocast():
        context_tokens = model.teacher_tokens(contexts).float()  # [2B, C, h, w]
    if cfg.teacher_splatting == "operator":
        return apply_operators([sample.operator.to(device) for sample in batch], context_tokens, cfg.blending)
    targets, coverages = [], []
    backbone = backbone_spec(cfg.backbone)
    for index, sample in enumerate(batch):
        gaussians, camera = render_inputs(sample.pair.gaussians.to(device), sample.target_camera, cfg.reference_quirks)
        target, coverage = splat_tokens(
            context_tokens[2 * index : 2 * index + 2], gaussians, camera, sample.context_masks.to(device),
            sample.target_mask.to(device), backbone.token_grid(*sample.target_image.shape[-2:]), cfg.blending,
            cfg.mask_aware_upsampling,
        )
        targets.append(target)
        coverages.append(coverage)
    return torch.stack(targets), torch.stack(coverages)


class StudentSide(nn.Module):
    """The student's part of a step as one module: LoRA backbone and head, which own every trainable parameter.

    Under several processes this is what DDP wraps (:func:`student_side`): its forward is the only place where
    trainable parameters are used, so DDP's backward hooks see the whole gradient and average it over the ranks
    while backward still runs; the teacher (no gradient, updated by EMA) stays outside. It computes
    :meth:`StudentTeacher.student_tokens`, then the head on the covered tokens up to its prototype layer, whose
    product with the bottleneck :func:`prototype_cross_entropy` forms a chunk at a time.
    """

    def __init__(self, model: StudentTeacher):
        super().__init__()
        self.student = model.student
        self.student_head = model.student_head
        self.backbone_spec = model.backbone_spec
        self.patch_tokens = model.patch_tokens

    def forward(self, images: torch.Tensor, coverage: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Student tokens, the head's bottleneck with uncovered tokens zeroed (still counted), and its prototypes.

        Args:
            images: ``[B, 3, H, W]`` target images in [0, 1].
            coverage: ``[B, h, w]`` bool, the teacher's token coverage.

        Returns:
            (``[B, C, h, w]`` tokens, ``[B*h*w, D]`` normalised bottleneck, rows in (b, y, x) order, ``[K, D]``
            prototypes); the logits are ``bottleneck @ prototypes.T``. Without heads (``train.loss: cosine``) the
            tokens alone, then None, None.
        """
        tokens = self.patch_tokens(self.student, self.backbone_spec, images)
        if self.student_head is None:
            return tokens, None, None
        covered = coverage[:, None].to(tokens.dtype)
        return tokens, self.student_head.bottleneck(token_rows(tokens * covered)), self.student_head.prototypes()


def student_side(model: StudentTeacher, world: distributed.World) -> nn.Module:
    """:class:`StudentSide`, wrapped in DistributedDataParallel when there are several processes.

    Each rank's loss is the mean over its own samples (all ranks have as many samples, of as many tokens), and
    DDP averages the gradients, so every rank steps with the gradient of the global batch's mean loss, as one
    process would. The parameters stay bitwise equal on every rank (same averaged gradient, same Adam step),
    hence so does the teacher that follows them; :meth:`distributed.World.assert_replicas_agree` checks this at
    the end of a run.
    """
    side = StudentSide(model)
    if not world.distributed:
        return side
    device_ids = [world.local_rank] if world.device.type == "cuda" else None
    # No buffers to keep in step (the ViT and the head have none that training changes).
    return DistributedDataParallel(side, device_ids=device_ids, broadcast_buffers=False)


@dataclass
class StepResult:
    """What a step gives besides its loss: statistics still on the device (reading them would make the host wait
    for the forward to finish before it could queue backward; :func:`learn` reads them once backward is queued)
    and the feature maps of the step's picture.

    ``statistics`` is float64 ``[loss, kl, coverage]``. ``kl`` = loss - teacher entropy: the part of the loss the
    student can remove (the loss itself stays near log K while the teacher's prototypes are near uniform, as they
    are early on); NaN on steps that do not compute it, and under ``train.loss: cosine`` (no distributions).
    """

    statistics: torch.Tensor
    targets: torch.Tensor
    student: torch.Tensor


def distillation_step(model: StudentTeacher, batch: list[TrainingSample], cfg: TrainCfg, device: torch.device,
                      autocast, targets: tuple[torch.Tensor, torch.Tensor] | None = None,
                      student_forward: nn.Module | None = None, with_kl: bool = True) -> tuple[torch.Tensor, StepResult]:
    """Forward of one step: returns the loss (with graph; the mean over ``batch``'s tokens) and what to log.

    Nothing here waits for the device. ``targets`` (teacher targets and coverage) replaces
    :func:`teacher_targets`, e.g. to time the network alone. ``student_forward`` is the student side to run
    (:func:`student_side`); by default :class:`StudentSide`. ``with_kl=False`` skips the teacher-entropy reduction
    over the [tokens, K] logits that only the log needs (``kl`` is then NaN).
    """
    targets, coverage = teacher_targets(model, batch, cfg, device, autocast) if targets is None else targets
    images = upload([sample.target_image[None] for sample in batch], device)
    student_forward = StudentSide(model) if student_forward is None else student_forward
    with autocast():
        student, student_bottleneck, student_prototypes = student_forward(images, coverage)
        if cfg.loss == "cosine":
            loss, teacher_entropy = cosine_distillation_loss(student, targets, coverage), None
        else:
            # Uncovered tokens are zeroed on both sides and still averaged (the reference's "head(0) vs head(0)").
            covered = coverage[:, None].to(student.dtype)
            with torch.no_grad():
                teacher_bottleneck = model.teacher_head.bottleneck(token_rows((targets * covered).to(student.dtype)))
            loss, teacher_entropy = prototype_cross_entropy(
                student_bottleneck, student_prototypes, teacher_bottleneck, model.teacher_head.prototypes(),
                with_teacher_entropy=with_kl,
            )
    value = loss.detach().double()
    kl = value - teacher_entropy.double() if teacher_entropy is not None else torch.full_like(value, math.nan)
    statistics = torch.stack([value, kl, coverage.double().mean()])
    return loss, StepResult(statistics, targets, student.detach().float())


def learn(loss: torch.Tensor, statistics: torch.Tensor, model: StudentTeacher, optimizer: torch.optim.Optimizer,
          scheduler, ema_momentum: float | None) -> tuple[float, float, float]:
    """The rest of a step after :func:`distillation_step`: backward, then, if the loss is finite, the EMA update
    (when ``ema_momentum`` is given) and the optimiser and schedule steps.

    ``statistics`` (the step's, or their mean over the ranks) are copied to the host as soon as the forward has
    made them and read once backward is queued, so the device never idles while the host checks the loss. A
    non-finite loss changes nothing that lasts: its gradients stay in ``.grad`` (cleared by the next step), the
    weights, the teacher and the optimiser's state are left as they were.

    Returns:
        (loss, kl, coverage) on the host.
    """
    on_host = statistics.to("cpu", non_blocking=True)  # page-locked: a device-to-host copy that does not block
    forward_done = torch.cuda.Event() if statistics.is_cuda else None
    if forward_done is not None:
        forward_done.record()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # under DDP, also averages the gradients over the ranks
    if forward_done is not None:
        forward_done.synchronize()
    value, kl, coverage = on_host.tolist()
    if math.isfinite(value):
        if ema_momentum is not None:  # after backward, before the optimiser step, as in the reference
            model.update_teacher(ema_momentum)
        optimizer.step()
        scheduler.step()
    return value, kl, coverage


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    skipped: bool
    steps: int
    start_step: int
    final_loss: float | None
    student_path: Path
    teacher_path: Path


def make_optimizer(model: StudentTeacher, train: TrainCfg, steps: int):
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=train.learning_rate)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=train.learning_rate, total_steps=steps + 1, pct_start=train.warmup_fraction,
        anneal_strategy="cos", cycle_momentum=False,
    )
    return optimizer, scheduler


def train(
    data: DataCfg,
    sampling: SamplingCfg,
    gaussians_cfg: GaussiansCfg,
    masks_cfg: MasksCfg,
    train_cfg: TrainCfg,
    store: Store,
    resume: str = "auto",
    force: bool = False,
    progress: Progress | None = None,
) -> TrainResult:
    """Train (or resume, or find finished) the run of this configuration.

    Under torchrun every process calls this; they form one process group for the duration of the call (left
    again on an error too, see :func:`snd_stages.distributed.process_group`), and only rank 0 writes files and
    advances ``progress``. Every rank returns the same result once rank 0 has written the run's files.
    """
    device = resolve_device(train_cfg.device, "train.device")
    with distributed.process_group(device) as world, contextlib.ExitStack() as held:
        return _train(data, sampling, gaussians_cfg, masks_cfg, train_cfg, store, world, resume, force,
                      progress if world.is_main else None, held)


@dataclass(frozen=True)
class _Run:
    """A run about to be trained: what it reads, its identity and where it lives."""

    inputs: RunInputs
    spec: ArtifactSpec
    run_dir: Path
    steps: int

    @property
    def student_path(self) -> Path:
        return self.run_dir / STUDENT_EXPORT

    @property
    def teacher_path(self) -> Path:
        return self.run_dir / TEACHER_EXPORT

    def result(self, skipped: bool, start_step: int, final_loss: float | None) -> TrainResult:
        return TrainResult(self.run_dir, skipped, self.steps, start_step, final_loss, self.student_path,
                           self.teacher_path)


def _train(data: DataCfg, sampling: SamplingCfg, gaussians_cfg: GaussiansCfg, masks_cfg: MasksCfg,
           train_cfg: TrainCfg, store: Store, world: distributed.World, resume: str, force: bool,
           progress: Progress | None, held: contextlib.ExitStack) -> TrainResult:
    run = _prepare(data, sampling, gaussians_cfg, masks_cfg, train_cfg, store, world, force, held)
    manifest = read_run_manifest(run.run_dir) if resume == "auto" else None
    if manifest is not None:
        return run.result(True, run.steps, manifest.get("final_loss"))
    if world.is_main:
        (run.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        write_text_atomic(run.run_dir / "config.yaml", dump_sections(
            data=data, sampling=sampling, gaussians=gaussians_cfg, masks=masks_cfg, train=train_cfg))
    model, optimizer, scheduler, start_step = _build(train_cfg, run, resume, world)
    final_loss = _loop(model, optimizer, scheduler, start_step, run, data, train_cfg, store, world, progress)
    _finish(model, run, train_cfg, final_loss, world)
    return run.result(False, start_step, final_loss)


def _prepare(data: DataCfg, sampling: SamplingCfg, gaussians_cfg: GaussiansCfg, masks_cfg: MasksCfg,
             train_cfg: TrainCfg, store: Store, world: distributed.World, force: bool,
             held: contextlib.ExitStack) -> _Run:
    """Check the settings against the inputs before any work, take the run's lock, apply ``--force``."""
    inputs = run_inputs(data, sampling, gaussians_cfg, masks_cfg, store)
    device = world.device
    if train_cfg.cuda_graphs and (device.type != "cuda" or world.distributed):
        raise ConfigError(f"train.cuda_graphs = true needs one process on a CUDA device, not {world.size} on "
                          f"{device.type}: set train.cuda_graphs=false (train.compile alone still applies)")
    samples = inputs.samples.samples
    if train_cfg.batch_size > len(samples):  # checked before any work: a larger batch cannot be drawn
        raise ConfigError(f"train.batch_size = {train_cfg.batch_size} is more than the {len(samples)} "
                          "training samples, so every batch would repeat samples; lower it, or draw more samples "
                          "(sampling.samples_per_scene)")
    spec = run_spec(train_cfg, inputs)
    world.local_batch_size(train_cfg.batch_size)  # a global batch that does not split stops every rank here
    run_dir = Path(train_cfg.runs_root) / spec.key
    if world.is_main:  # the ranks of one torchrun are one training; another command is not
        held.enter_context(training_lock(run_dir))
    if force and world.is_main:
        shutil.rmtree(run_dir, ignore_errors=True)
    world.barrier()  # every rank then finds the run directory in the same state, whatever --force removed
    return _Run(inputs, spec, run_dir, train_cfg.steps)


def _build(train_cfg: TrainCfg, run: _Run, resume: str, world: distributed.World):
    """The model, optimiser and schedule, restored from a checkpoint where there is one; and the first step."""
    torch.manual_seed(train_cfg.seed)
    model = build_model(train_cfg).to(world.device)
    optimizer, scheduler = make_optimizer(model, train_cfg, run.steps)
    start_step = 0
    # Every rank reads the same checkpoint (nothing is written before the first step's gradient all-reduce, which
    # waits for all of them): a checkpoint holds no per-rank state, so any number of processes can resume it.
    checkpoint = latest_checkpoint(run.run_dir) if resume == "auto" else Path(resume)
    if checkpoint is not None:
        start_step = load_checkpoint(checkpoint, model, optimizer, scheduler, run.spec.key)
        if world.is_main:
            log.info("resumed from %s at step %d", checkpoint, start_step)
    world.seed_dropout(train_cfg.seed, start_step)
    if train_cfg.compile:
        model.compile_backbones(cuda_graphs=train_cfg.cuda_graphs)
    return model, optimizer, scheduler, start_step


def _loop(model: StudentTeacher, optimizer, scheduler, start_step: int, run: _Run, data: DataCfg,
          train_cfg: TrainCfg, store: Store, world: distributed.World, progress: Progress | None) -> float | None:
    """The training steps from ``start_step``, with their logs, validation, pictures and checkpoints; the last
    step's loss."""
    device, steps, run_dir = world.device, run.steps, run.run_dir
    samples, gaussians, masks = run.inputs.samples, run.inputs.gaussians, run.inputs.masks
    student_forward = student_side(model, world)
    operators = (teacher_operators(train_cfg, run.inputs, store) if train_cfg.teacher_splatting == "operator"
                 else None)
    training_data = TrainingData(samples.samples, samples.dataset_root, gaussians, masks, train_cfg.seed,
                                 operators=operators, operator_device=device, pin_memory=device.type == "cuda",
                                 cached_frame_bytes=train_cfg.frame_cache_mb * 2**20)
    use_bf16 = train_cfg.precision == "bf16" or (train_cfg.precision == "auto" and device.type == "cuda")

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    curves = LearningCurves(run_dir, data, train_cfg, start_step, device) if world.is_main else None
    final_loss = None
    task = progress.add_task("distilling", total=steps, completed=start_step, rate="") if progress else None
    model.train()
    if curves is not None and start_step == 0 and curves.due(0, steps):
        curves.validate(model, 0)  # the pretrained model: where the curve starts
    started = time.perf_counter()
    for step, batch in zip(range(start_step, steps),
                           training_data.batches(range(start_step, steps), train_cfg.batch_size, world)):
        logged = step % train_cfg.log_every == 0 or step + 1 == steps
        model.begin_step()
        loss, result = distillation_step(model, batch, train_cfg, device, autocast, student_forward=student_forward,
                                         with_kl=logged)
        # What is checked and logged is the global batch's mean, the same on every rank (so all of them stop
        # together below: one rank alone would leave the others waiting in the next step's gradient all-reduce).
        momentum = (ema_schedule(step, train_cfg.ema_every, train_cfg.ema_momentum) if train_cfg.teacher == "ema"
                    else None)
        loss_value, kl, coverage = learn(loss, world.mean(result.statistics), model, optimizer, scheduler, momentum)
        if not math.isfinite(loss_value):
            # learn made no update: nothing of this step reaches the weights, the teacher or a checkpoint.
            culprits = ", ".join(
                f"#{index} ({sample.scene}, context {list(sample.context)}, targets {list(sample.targets)})"
                for index in training_data.indices(step, train_cfg.batch_size)
                for sample in [training_data.samples[index]]
            )
            kept = latest_checkpoint(run_dir)
            raise ArtifactError(
                f"loss is {loss_value} in step {step + 1} of {steps}, samples {culprits}; "
                f"{f'the last good checkpoint {kept} is kept' if kept else 'no checkpoint was written yet'}: check "
                "these samples' inputs (snd check-geometry) or lower train.learning_rate, then rerun to resume"
            )
        final_loss = loss_value
        done = step + 1
        if not world.is_main:
            continue
        elapsed = time.perf_counter() - started
        rate = (done - start_step) * train_cfg.batch_size / max(elapsed, 1e-9)
        if logged:
            curves.log_training({"step": done, "loss": loss_value, "kl": kl, "coverage": coverage,
                                 "lr": scheduler.get_last_lr()[0], "samples_per_s": rate, "elapsed_s": elapsed})
        if curves.due(done, steps):
            curves.validate(model, done)
        if step % train_cfg.picture_every == 0 or done == steps:
            save_picture(run_dir / "pictures" / f"step-{done:06d}.png", batch[0].target_image, result)
        if done % train_cfg.checkpoint_every == 0 or done == steps:
            save_checkpoint(run_dir, done, model, optimizer, scheduler, run.spec.key, train_cfg.keep_checkpoints)
        if progress is not None:
            progress.update(task, completed=done, rate=f"{rate:.2f} samples/s, loss {loss_value:.4f}")
    if curves is not None:
        curves.close()
    return final_loss


def _finish(model: StudentTeacher, run: _Run, train_cfg: TrainCfg, final_loss: float | None,
            world: distributed.World) -> None:
    """Check that the ranks agree, then export both backbones and publish the run's manifest (rank 0)."""
    teacher_tensors, _ = model.ema_pairs()
    world.assert_replicas_agree([*model.trainable_parameters(), *teacher_tensors],
                                "the student's LoRA and head or the teacher's EMA tensors")
    if world.is_main:
        export_backbone(model.student, run.student_path)
        export_backbone(model.teacher, run.teacher_path)
        publish_run(run.run_dir, run.spec, run.steps, final_loss, train_cfg.backbone,
                    [run.student_path.name, run.teacher_path.name])
    world.barrier()  # the other ranks return once the run's files are complete


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints, metrics, pictures
# ---------------------------------------------------------------------------------------------------------------


def save_picture(path: Path, image: torch.Tensor, result: StepResult) -> None:
    """target image (``[3, H, W]`` uint8) | PCA of the teacher's splatted target | PCA of the student, one shared
    PCA basis."""
    teacher, student = result.targets[0].float().cpu(), result.student[0].float().cpu()
    basis = pca_basis(teacher)
    height, width = image.shape[-2:]
    panels = [image.permute(1, 2, 0).numpy()]
    for features in (teacher, student):
        panel = Image.fromarray(pca_rgb(features, basis)).resize((width, height), Image.NEAREST)
        panels.append(np.asarray(panel))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(panels, axis=1)).save(path)
