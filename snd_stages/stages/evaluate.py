"""``snd eval``: probe the baseline and every fine-tuned model side by side, with identical settings and seeds.

Usage::

    snd eval --config pipeline.yaml                       # baseline vs the run of this config's train section
    snd eval --set eval.runs=[data/runs/<key>] --set eval.probes=[depth,correspondence]
    snd eval --set eval.dataset=scannetpp --set eval.scannetpp_root=/data/scannetpp --set eval.max_depth=20

Data (``eval.dataset``):

- ``demo``: the held-out scenes of ``data.root`` (its val split, never sampled for training); the first
  ``eval.probe_train_scenes`` of them train the probes, the others test them (every ``frame_stride``-th frame).
- ``scannetpp``: the same reader and the same protocol on ScanNet++ as FiT3D prepares it, under
  ``eval.scannetpp_root`` (default ``data.root``): the scenes of FiT3D's held-out list ``metadata/nvs_sem_val.txt``,
  the first ``probe_train_scenes`` of them train the probes, the others test them; frames marked ``is_bad`` are
  left out. Depth comes from each scene's ``depth/`` folder; normals from its ``normals/`` folder or, where there is
  none (real ScanNet++ has none), are fitted to the depth (:mod:`snd_stages.scenes.normals`). Segmentation needs
  ``semantic_segmentation/`` in every probe scene and ``metadata/semantic_classes.txt``; without them (real
  ScanNet++ DSLR data has no 2D semantic labels: FiT3D renders its own from the annotated meshes) the probe is
  skipped and the report says so. FiT3D's own ScanNet++ protocol trains the probes on the 230 training scenes
  instead; training scenes are what the fine-tuning saw, so held-out scenes are used here for both.
- ``nyuv2``: the labeled ``.mat``'s official train/test splits (no correspondence: single views).

Probes, on frozen features (``reference/method.md`` §2, with a scaled-down iteration budget):

- depth: FiT3D's linear bin probe (256 bins, SigLoss + 0.5 gradient loss, last block without final norm + CLS);
- depth_dense (opt-in): Probe3D's multi-block dense probe on four blocks, same loss and metrics;
- normals: linear probe with the uncertainty-aware angular loss (last block, no final norm);
- segmentation: linear probe on the final-normed last block, mIoU over the dataset's semantic classes;
- correspondence: Probe3D's cosine nearest neighbour + ratio test, top-k, recall at 5/10/20 px at
  ``correspondence_scale`` of the image size, and recall@10 binned by relative rotation.

Features come from the artifact store (:mod:`snd_stages.probes.cache`): the backbone runs once per model, frame
set and feature spec, and a later eval with other probe settings reuses its output. So does the probes' ground
truth (:mod:`snd_stages.probes.ground_truth`): depth is decoded and normals are fitted once per frame set.

Writes ``<report_dir>/report.json``, ``report.md`` (a summary table of one metric per probe, then every metric of
every model with deltas against the baseline or ``eval.reference``, then notes)
and PNG figures (depth and normal predictions vs truth, correspondences coloured by error, PCA feature maps).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image, ImageDraw
from rich.progress import Progress

from ..config import TRAIN_OBSERVATION_ONLY, DataCfg, EvalCfg, TrainCfg, dump_sections
from ..errors import ConfigError, DataError
from ..models.checkpoints import finished_run_manifest, read_run_manifest, run_of
from ..probes.backbone import (
    DENSE_FEATURES,
    DEPTH_FEATURES,
    MULTI_BLOCK_FEATURES,
    SEGMENTATION_FEATURES,
    Features,
    ProbeBackbone,
)
from ..probes.cache import CacheUse, FeatureSet, FrameSet, probe_features
from ..probes.correspondence import correspondence_probe, held_out_pairs, pairs_frame_set
from ..probes.ground_truth import FrameTruth, GroundTruthRequest, load_ground_truth
from ..probes.heads import DenseDepthProbe, DepthBinHead, NormalHead, SegmentationHead, depth_loss, segmentation_loss, uncertainty_angular_loss
from ..probes.metrics import depth_metrics, normal_metrics, segmentation_confusion
from ..progress import track
from ..report.statistics import CONFIDENCE, Measurement, Resampling, class_iou, excludes_zero, interval, mean_iou
from ..runtime import resolve_device
from ..scenes.correspondence import CorrespondencePair, read_scannet1500
from ..scenes.layout import Scene, list_scene_ids, read_scene
from ..scenes.normals import normals_from_depth_plane_fit
from ..scenes.nyuv2 import NYU_HEIGHT, NYU_WIDTH, NYUv2Labeled, eigen_crop_mask
from ..store import Store, file_sha256, file_stamp, write_text_atomic
from ..visualize import pca_rgb

MIN_DEPTH = 1e-3
IGNORE_LABEL = 255
# Which tokens each frame probe reads (correspondence reads DENSE_FEATURES of the pairs' views).
PROBE_FEATURES = {"depth": DEPTH_FEATURES, "depth_dense": MULTI_BLOCK_FEATURES, "normals": DENSE_FEATURES,
                  "segmentation": SEGMENTATION_FEATURES}


@dataclass
class ProbeFrames:
    """Frames with their ground truth. Images are loaded on demand (only feature extraction needs them).

    Attributes:
        names: one per frame.
        load_image: ``index -> [H, W, 3]`` uint8 RGB.
        image_size: (H, W) of every frame.
        identity: fingerprint of the images' source, for feature cache keys.
        depth: ``[N, H, W]`` float32 metres, 0 = invalid.
        normals: ``[N, 3, H, W]`` float16 camera-frame unit normals, or None when no probe needs them.
        semantics: ``[N, H, W]`` uint8 classes (255 = ignore), or None when no probe needs them.
        depth_region: where depth is scored (``[H, W]`` bool, e.g. NYUv2's Eigen crop); None = everywhere.
        fitted_normals: how many frames' normals were fitted to their depth.
    """

    names: list[str]
    load_image: Callable[[int], np.ndarray] = field(repr=False)
    image_size: tuple[int, int]
    identity: object
    depth: torch.Tensor
    normals: torch.Tensor | None = None
    semantics: torch.Tensor | None = None
    depth_region: torch.Tensor | None = None
    fitted_normals: int = 0

    def __len__(self) -> int:
        return len(self.names)

    def frame_set(self, name: str, count: int | None = None) -> FrameSet:
        """The frames (the first ``count`` of them) as a feature cache's frame set."""
        names = tuple(self.names[:count])
        identity = self.identity[: len(names)] if isinstance(self.identity, list) else self.identity
        return FrameSet(name, names, self.load_image, self.image_size, identity)


def load_nyuv2_frames(cfg: EvalCfg, split: str, probes: list[str], device, progress: Progress | None = None,
                      store: Store | None = None, config_yaml: str = "") -> ProbeFrames:
    """Every ``frame_stride``-th frame of NYUv2's official ``split``; normals fitted to depth (no GT normals).

    With a ``store`` the ground truth is cached there (:mod:`snd_stages.probes.ground_truth`).
    """
    if cfg.nyuv2_mat is None:
        raise ConfigError("eval.dataset = 'nyuv2' needs eval.nyuv2_mat: the path of nyu_depth_v2_labeled.mat")
    data = NYUv2Labeled(cfg.nyuv2_mat, cfg.nyuv2_splits, {40: cfg.nyuv2_mapping_40, 13: cfg.nyuv2_mapping_13})
    camera = data.camera()
    indices = [int(index) for index in data.split(split)[:: cfg.frame_stride]]
    with_normals, with_semantics = "normals" in probes, "segmentation" in probes

    def compute(i: int) -> FrameTruth:
        frame_depth = data.depth(indices[i])
        normals = semantics = None
        if with_normals:
            fitted = normals_from_depth_plane_fit(frame_depth, camera, device=device)
            normals = torch.from_numpy(fitted).permute(2, 0, 1).to(torch.float16)
        if with_semantics:
            semantics = torch.from_numpy(data.labels(indices[i], cfg.nyuv2_classes).astype(np.uint8))
        return FrameTruth(torch.from_numpy(frame_depth), normals, semantics, fitted=with_normals)

    # Depth is scored inside the Eigen crop, which only exists for the dataset's own 480x640 frames.
    region = None
    if (data.height, data.width) == (NYU_HEIGHT, NYU_WIDTH):
        region = eigen_crop_mask(data.height, data.width)
    mat = Path(cfg.nyuv2_mat)
    identity = {"nyuv2_mat": mat.name, "stamp": file_stamp(mat)}
    # The .mat (2.8 GB) is known by name, size and time; the small splits and class mapping files by content.
    source = {**identity, "splits": _small_file_identity(cfg.nyuv2_splits),
              "camera": camera.intrinsics.tolist() if with_normals else None,
              "mappings": {"classes": cfg.nyuv2_classes, "40": _small_file_identity(cfg.nyuv2_mapping_40),
                           "13": _small_file_identity(cfg.nyuv2_mapping_13)} if with_semantics else None}
    names = [f"nyuv2/{index}" for index in indices]
    request = GroundTruthRequest(f"nyuv2 {split}", tuple(names), (data.height, data.width), cfg.frame_stride, source,
                                 normals=with_normals, classes=cfg.nyuv2_classes if with_semantics else None,
                                 fits_normals=with_normals)
    truth = load_ground_truth(request, compute, store, config_yaml, region, progress)
    return ProbeFrames(names, lambda i: data.image(indices[i]), (data.height, data.width), identity, truth.depth,
                       truth.normals, truth.semantics, truth.region, fitted_normals=truth.fitted_normals)


def load_frames(root: Path, scene_ids: list[str], stride: int, probes: list[str], classes: int, device,
                progress: Progress | None = None, role: str = "frames", store: Store | None = None,
                config_yaml: str = "") -> ProbeFrames:
    """Every ``stride``-th good frame (not marked ``is_bad``) of each scene, with the ground truth ``probes`` need.

    Normals come from the scene's ``normals/`` folder, else they are fitted to its depth. Semantic classes outside
    ``[0, classes)`` become 255 (ignored). With a ``store`` the ground truth is cached there
    (:mod:`snd_stages.probes.ground_truth`).
    """
    with_normals, with_semantics = "normals" in probes, "segmentation" in probes
    entries, image_files, source = [], [], []
    size = None
    for scene_id in scene_ids:
        scene = read_scene(root, scene_id)
        if not scene.has("depth"):
            raise DataError(f"scene {scene.directory} has no depth/ folder, which the probes need as ground truth "
                            "(uint16 millimetre PNGs named <image>.png)")
        if size is not None and size != (scene.camera.height, scene.camera.width):
            raise DataError(f"scene {scene.directory} has {scene.camera.height}x{scene.camera.width} images, the "
                            f"scene before it {size[0]}x{size[1]}; the probes need one image size")
        size = (scene.camera.height, scene.camera.width)
        good = [position for position in range(len(scene)) if not scene.frames[position].is_bad]
        for position in good[::stride]:
            entries.append((scene, position))
            name = f"{scene_id}/{scene.frames[position].name}"
            image_files.append([name, file_stamp(scene.path("images", position))])
            source.append(_ground_truth_files(scene, position, name, with_normals, with_semantics))
    if not entries:
        raise DataError(f"the scenes {scene_ids} of {root} have no good frames")

    def compute(i: int) -> FrameTruth:
        scene, position = entries[i]
        frame_depth = scene.load_depth(position)
        normals = semantics = None
        fitted = False
        if with_normals:
            if scene.has("normals"):
                frame_normals = scene.load_normals(position)
            else:
                frame_normals = normals_from_depth_plane_fit(frame_depth, scene.camera[position], device=device)
                fitted = True
            normals = torch.from_numpy(frame_normals).permute(2, 0, 1).to(torch.float16)
        if with_semantics:
            labels = scene.load_semantics(position)
            labels = np.where((labels >= 0) & (labels < classes), labels, IGNORE_LABEL)
            semantics = torch.from_numpy(labels.astype(np.uint8))
        return FrameTruth(torch.from_numpy(frame_depth), normals, semantics, fitted)

    names = [name for name, _ in image_files]
    request = GroundTruthRequest(role, tuple(names), size, stride, source, normals=with_normals,
                                 classes=classes if with_semantics else None,
                                 fits_normals=with_normals and not all(scene.has("normals") for scene, _ in entries))
    truth = load_ground_truth(request, compute, store, config_yaml, progress=progress)
    loaders = [functools.partial(scene.load_image, position) for scene, position in entries]
    return ProbeFrames(names, lambda i: loaders[i](), size, image_files, truth.depth, truth.normals, truth.semantics,
                       fitted_normals=truth.fitted_normals)


def _ground_truth_files(scene: Scene, position: int, name: str, normals: bool, semantics: bool) -> list:
    """What one frame's ground truth is computed from: the name, size and modification time of each of its files
    (None: missing, which computing it reports), and the intrinsics its normals are fitted with where the scene
    has no normals."""
    record = [name, ["depth", file_stamp(scene.path("depth", position))]]
    if normals:
        if scene.has("normals"):
            record.append(["normals", file_stamp(scene.path("normals", position))])
        else:
            record.append(["fitted normals", scene.camera[position].intrinsics.tolist()])
    if semantics:
        record.append(["semantics", file_stamp(scene.path("semantic_segmentation", position))])
    return record


def _small_file_identity(path: Path | None) -> dict | None:
    """Name and sha256 of a small input file; None where it is unset or missing (reading it reports that)."""
    if path is None or not Path(path).is_file():
        return None
    return {"name": Path(path).name, "sha256": file_sha256(path)}


def class_count(root: Path) -> int:
    classes_file = Path(root) / "metadata" / "semantic_classes.txt"
    if not classes_file.is_file():
        raise DataError(f"{classes_file} is missing: the segmentation probe needs the list of semantic classes")
    count = len([line for line in classes_file.read_text().splitlines() if line.strip()])
    if not 1 <= count < IGNORE_LABEL:
        raise DataError(f"{classes_file} lists {count} classes; the segmentation probe takes 1 to {IGNORE_LABEL - 1} "
                        f"(label {IGNORE_LABEL} means ignore): list only the classes to score, e.g. a benchmark's top 100")
    return count


def missing_semantics(root: Path, scene_ids: list[str]) -> str | None:
    """Why the scenes cannot train and test a segmentation probe, or None when they can."""
    lacking = [scene_id for scene_id in scene_ids
               if not (Path(root) / "scenes" / scene_id / "semantic_segmentation").is_dir()]
    if lacking:
        return (f"{len(lacking)} of the {len(scene_ids)} probe scenes have no semantic_segmentation/ folder "
                f"(first: {lacking[0]})")
    if not (Path(root) / "metadata" / "semantic_classes.txt").is_file():
        return f"{Path(root) / 'metadata' / 'semantic_classes.txt'} is missing"
    return None


def _scannet1500_identity(pairs_file: Path, root: Path) -> dict:
    colour_files = sorted((str(p.relative_to(root)), file_stamp(p))
                          for p in Path(root).glob("*/color/*") if p.is_file())
    return {"pairs_file_sha256": hashlib.sha256(Path(pairs_file).read_bytes()).hexdigest(),
            "colour_files": colour_files}


def _scene_images_identity(root: Path, scene_ids: list[str]) -> list:
    files = []
    for scene_id in scene_ids:
        scene = read_scene(root, scene_id)
        files += [[f"{scene_id}/{frame.name}", file_stamp(scene.path("images", position))]
                  for position, frame in enumerate(scene.frames)]
    return files


# ---------------------------------------------------------------------------------------------------------------
# Probes
# ---------------------------------------------------------------------------------------------------------------


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


def _fit_seeds(make_head: Callable[[], torch.nn.Module], loss_of, inputs_of, count: int, cfg: EvalCfg, device,
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
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(_warmup_cosine, warmup=warmup,
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
            _clip_per_seed(list(parameters.values()), 35.0)  # FiT3D's gradient clip
            optimizer.step()
            scheduler.step()
    with torch.no_grad():
        for index, head in enumerate(heads):
            for name, stacked in parameters.items():
                head.get_parameter(name).copy_(stacked[index])
    return [head.eval() for head in heads]


def _clip_per_seed(parameters: list[torch.Tensor], max_norm: float) -> None:
    """``torch.nn.utils.clip_grad_norm_`` applied to each seed's slice of stacked ``[seeds, ...]`` parameters."""
    grads = [parameter.grad for parameter in parameters if parameter.grad is not None]
    if not grads:
        return
    norms = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(grad.flatten(1), dim=1)
                                                  for grad in grads]), dim=0)
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for grad in grads:
        grad.mul_(scale.reshape(-1, *[1] * (grad.ndim - 1)))


def _warmup_cosine(step: int, warmup: int, steps: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


class _MultiBlockDepth(torch.nn.Module):
    """Probe3D's dense probe on features holding ``blocks`` equally wide blocks concatenated along channels."""

    def __init__(self, channels: int, blocks: int, max_depth: float):
        super().__init__()
        self.blocks = blocks
        self.probe = DenseDepthProbe([channels // blocks] * blocks, max_depth=max_depth)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.probe(list(features.chunk(self.blocks, dim=1)))


def _scores(score, heads: Sequence[torch.nn.Module]):
    """``score(head) -> (per-unit rows, predictions)`` for every seed's head: ``([seeds][units] rows, the first
    seed's predictions)`` (the figures show the first seed's probe)."""
    rows, first = [], None
    with torch.no_grad():
        for head in heads:
            head_rows, predictions = score(head)
            rows.append(head_rows)
            first = predictions if first is None else first
    return rows, first


def _means(rows: list[list[dict]]) -> dict[str, Measurement]:
    """Per-image metric rows ``[seeds][images]`` as one mean-over-images measurement per metric."""
    return {key: Measurement.of_means(np.array([[row[key] for row in seed] for seed in rows], dtype=np.float64))
            for key in rows[0][0]}


def _seeds_text(seeds: Sequence[int]) -> str:
    return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"


def depth_probe(train: tuple[FeatureSet, ProbeFrames], test: tuple[FeatureSet, ProbeFrames], cfg: EvalCfg, device,
                seeds: Sequence[int] = (0,), dense: bool = False, description: str = "depth probe",
                progress: Progress | None = None) -> tuple[dict[str, Measurement], list[torch.Tensor]]:
    """FiT3D's linear bin probe, or (``dense``) Probe3D's multi-block dense probe; same loss and metrics.

    Returns every depth metric as a per-image measurement over ``seeds``, and the first seed's predictions.
    """
    features, frames = train
    test_features, test_frames = test
    depth = frames.depth.to(device)

    def make_head():
        if dense:
            return _MultiBlockDepth(features.channels, len(MULTI_BLOCK_FEATURES.blocks), cfg.max_depth)
        return DepthBinHead(features.channels, max_depth=cfg.max_depth)

    def inputs_of(batches):
        return features.batch(batches, device), depth[batches.to(device)]

    def loss_of(head, tokens, target, warmup):
        prediction = features.crop(head(tokens))[:, 0]
        valid = (target > MIN_DEPTH) & (target < cfg.max_depth)
        return depth_loss(prediction, target, valid, warmup=warmup)

    def score(head):
        predictions, rows = [], []
        for index in range(len(test_frames)):
            prediction = test_features.crop(head(test_features.batch([index], device)))[0, 0].cpu()
            target = test_frames.depth[index]
            valid = (target > MIN_DEPTH) & (target < cfg.max_depth)
            if test_frames.depth_region is not None:
                valid &= test_frames.depth_region
            rows.append(depth_metrics(prediction, target, valid))
            predictions.append(prediction)
        return rows, predictions

    heads = _fit_seeds(make_head, loss_of, inputs_of, len(frames), cfg, device, seeds,
                       f"{description} · {_seeds_text(seeds)}", progress)
    rows, predictions = _scores(score, heads)
    return _means(rows), predictions


def normals_probe(train: tuple[FeatureSet, ProbeFrames], test: tuple[FeatureSet, ProbeFrames], cfg: EvalCfg, device,
                  seeds: Sequence[int] = (0,), description: str = "normals probe",
                  progress: Progress | None = None) -> tuple[dict[str, Measurement], list[torch.Tensor]]:
    """SnD's linear normal probe: every angular metric as a per-image measurement, the first seed's predictions."""
    features, frames = train
    test_features, test_frames = test
    padded = features.padded_size
    normals, depth = frames.normals.to(device), frames.depth.to(device)

    def inputs_of(batches):
        on_device = batches.to(device)
        return features.batch(batches, device), normals[on_device].float(), depth[on_device] > 0

    def loss_of(head, tokens, truth, valid, warmup):
        predicted, kappa = head(tokens, size=padded)
        return uncertainty_angular_loss(features.crop(predicted), features.crop(kappa), truth, valid)

    def score(head):
        predictions, rows = [], []
        for index in range(len(test_frames)):
            predicted, _ = head(test_features.batch([index], device), size=padded)
            prediction = F.normalize(test_features.crop(predicted), dim=1)[0].cpu()
            valid = test_frames.depth[index] > 0
            truth = test_frames.normals[index].float()
            rows.append(normal_metrics(prediction.permute(1, 2, 0), truth.permute(1, 2, 0), valid))
            predictions.append(prediction)
        return rows, predictions

    heads = _fit_seeds(lambda: NormalHead(features.channels), loss_of, inputs_of, len(frames), cfg, device, seeds,
                       f"{description} · {_seeds_text(seeds)}", progress)
    rows, predictions = _scores(score, heads)
    return _means(rows), predictions


def segmentation_probe(train: tuple[FeatureSet, ProbeFrames], test: tuple[FeatureSet, ProbeFrames], classes: int,
                       cfg: EvalCfg, device, seeds: Sequence[int] = (0,), description: str = "segmentation probe",
                       progress: Progress | None = None) -> dict[str, Measurement]:
    """FiT3D's linear segmentation probe: mIoU (confusion summed over the test images, mmseg's convention) and pixel
    accuracy, as measurements whose parts are each image's per-class intersection, label and prediction areas."""
    features, frames = train
    test_features, test_frames = test
    labels = frames.semantics.to(device)

    def inputs_of(batches):
        return features.batch(batches, device), labels[batches.to(device)].long()

    def loss_of(head, tokens, truth, warmup):
        return segmentation_loss(features.crop(head(tokens)), truth, ignore_index=IGNORE_LABEL)

    def score(head):
        confusions = []
        for index in range(len(test_frames)):
            logits = test_features.crop(head(test_features.batch([index], device)))
            confusions.append(segmentation_confusion(logits.argmax(1)[0].cpu(), test_frames.semantics[index].long(),
                                                     classes, ignore_index=IGNORE_LABEL).double().numpy())
        return confusions, None

    heads = _fit_seeds(lambda: SegmentationHead(features.channels, classes), loss_of, inputs_of, len(frames), cfg,
                       device, seeds, f"{description} · {_seeds_text(seeds)}", progress)
    confusions = np.array(_scores(score, heads)[0])  # [seeds, images, classes (truth), classes (predicted)]
    intersection = np.diagonal(confusions, axis1=2, axis2=3)
    areas = np.concatenate([intersection, confusions.sum(3), confusions.sum(2)], axis=-1)
    return {"miou": Measurement(areas, mean_iou, "miou"),
            "pixel_accuracy": Measurement.of_rates(intersection.sum(-1), confusions.sum((2, 3)))}


# ---------------------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalReport:
    """What ``snd eval`` wrote, and how each model's features were obtained (``feature_uses``)."""

    report_dir: Path
    results: dict
    figures: list[Path]
    feature_uses: list[CacheUse] = field(default_factory=list)


def scenes_root(data: DataCfg, cfg: EvalCfg) -> Path:
    """Where the held-out scenes are read: ``eval.scannetpp_root`` for ScanNet++ when set, else ``data.root``."""
    if cfg.dataset == "scannetpp" and cfg.scannetpp_root is not None:
        return Path(cfg.scannetpp_root)
    return Path(data.root)


def evaluate(data: DataCfg, train: TrainCfg, cfg: EvalCfg, runs: list[Path], progress: Progress | None = None,
             store: Store | None = None) -> EvalReport:
    """Probe the baseline (``train.backbone`` with ``eval.baseline_weights``) and each run; write the report.

    With a ``store``, features and ground truth are cached there (:mod:`snd_stages.probes.cache`,
    :mod:`snd_stages.probes.ground_truth`); without one they are computed and kept in memory, as the same values
    (features as float16), so the scores are the same either way.
    """
    device = resolve_device(cfg.device, "eval.device")
    reference_position = reference_index(cfg.reference, runs)
    for run in runs:  # a damaged or unfinished run stops the eval before any work
        if Path(run).suffix != ".pt":
            finished_run_manifest(Path(run))
    pairs: list[CorrespondencePair] = []
    pairs_identity = None
    notes: list[str] = []
    probes = list(cfg.probes)
    config_yaml = dump_sections(data=data, train=train, eval=cfg)
    if cfg.dataset == "nyuv2":
        train_ids, test_ids = ["nyuv2 train split"], ["nyuv2 test split"]
        probes = [probe for probe in probes if probe != "correspondence"]  # single views: no pairs
        train_frames = load_nyuv2_frames(cfg, "train", probes, device, progress, store, config_yaml)
        test_frames = load_nyuv2_frames(cfg, "test", probes, device, progress, store, config_yaml)
        classes = cfg.nyuv2_classes
    else:
        root = scenes_root(data, cfg)
        scene_ids = list_scene_ids(root, "val")
        if len(scene_ids) <= cfg.probe_train_scenes:
            raise ConfigError(
                f"eval.probe_train_scenes = {cfg.probe_train_scenes} leaves no test scene among the {len(scene_ids)} "
                f"held-out scenes of {root} (metadata/nvs_sem_val.txt); lower it or add held-out scenes"
                + (" (demo.eval_scenes)" if cfg.dataset == "demo" else "")
            )
        train_ids, test_ids = scene_ids[: cfg.probe_train_scenes], scene_ids[cfg.probe_train_scenes :]
        classes = 0
        if "segmentation" in probes:
            reason = missing_semantics(root, train_ids + test_ids)
            if reason is None:
                classes = class_count(root)
            else:
                probes.remove("segmentation")
                why = (" Real ScanNet++ DSLR scenes carry no 2D semantic labels; FiT3D renders them from the annotated "
                       "meshes." if cfg.dataset == "scannetpp" else "")
                notes.append(f"segmentation skipped: {reason}.{why}")
        train_frames = load_frames(root, train_ids, cfg.frame_stride, probes, classes, device, progress, "train",
                                   store, config_yaml)
        test_frames = load_frames(root, test_ids, cfg.frame_stride, probes, classes, device, progress, "test",
                                  store, config_yaml)
        if "correspondence" in probes:
            pairs = held_out_pairs(root, test_ids, cfg.correspondence_pairs, cfg.correspondence_gap, cfg.seed)
            pairs_identity = {"scenes": _scene_images_identity(root, test_ids)}

    if "correspondence" in cfg.probes and (cfg.scannet1500_pairs is not None or cfg.scannet1500_root is not None):
        if cfg.scannet1500_pairs is None or cfg.scannet1500_root is None:
            raise ConfigError("ScanNet-1500 needs both eval.scannet1500_pairs and eval.scannet1500_root")
        pairs = read_scannet1500(cfg.scannet1500_pairs, cfg.scannet1500_root)[: cfg.correspondence_pairs]
        pairs_identity = _scannet1500_identity(cfg.scannet1500_pairs, cfg.scannet1500_root)
        probes = list(dict.fromkeys([*probes, "correspondence"]))
    fitted = train_frames.fitted_normals + test_frames.fitted_normals
    if "normals" in probes and fitted:
        notes.append(f"normals: {fitted} of the {len(train_frames) + len(test_frames)} frames have no ground-truth "
                     "normals; theirs were fitted to the depth by local least-squares planes "
                     "(snd_stages/scenes/normals.py).")

    torch.manual_seed(cfg.seed)  # a random-weights baseline (smoke runs) is then the same model every time
    models = [ProbeBackbone(train.backbone, cfg.baseline_weights, f"DINOv2 {train.backbone} ({cfg.baseline_weights})",
                            device, allow_random=cfg.baseline_weights == "random")]
    models += [ProbeBackbone.from_run(run, device=device) for run in runs]
    for backbone, settings in zip(models[1:], distinguishing_settings(runs)):
        if settings:  # e.g. an ablation row: say what sets it apart from the runs beside it
            backbone.label = f"{backbone.label} · {', '.join(settings)}"
    reference = models[reference_position].label
    results: dict = {"protocol": {"dataset": cfg.dataset, "probes": probes,
                                  **_protocol(cfg, train_ids, test_ids, train_frames, test_frames, len(pairs))},
                     "models": {}, "reference": reference, "notes": notes}
    memory_bytes = cfg.feature_memory_gb * 2**30
    frame_specs = [PROBE_FEATURES[probe] for probe in probes if probe in PROBE_FEATURES]
    outputs, uses, measurements = {}, [], {}

    def features_of(backbone, frame_set, specs):
        sets, used = probe_features(backbone, frame_set, specs, store, config_yaml, memory_bytes, progress)
        uses.extend(used)
        return sets

    samples_seen = [0] + [_samples_seen(run) for run in runs]
    for backbone, seen in zip(track(models, "probing models", progress, unit="model"), samples_seen):
        scores, predictions = {}, {}
        train_sets = features_of(backbone, train_frames.frame_set("train"), frame_specs) if frame_specs else {}
        test_sets = features_of(backbone, test_frames.frame_set("test"), frame_specs) if frame_specs else {}
        for probe in probes:
            label = f"{probe} probe · {backbone.label}"
            if probe in PROBE_FEATURES:
                train_pair = (train_sets[PROBE_FEATURES[probe]], train_frames)
                test_pair = (test_sets[PROBE_FEATURES[probe]], test_frames)
            if probe == "depth":
                scores["depth"], predictions["depth"] = depth_probe(train_pair, test_pair, cfg, device, cfg.seeds,
                                                                    description=label, progress=progress)
            elif probe == "depth_dense":
                scores["depth_dense"], _ = depth_probe(train_pair, test_pair, cfg, device, cfg.seeds, dense=True,
                                                       description=label, progress=progress)
            elif probe == "normals":
                scores["normals"], predictions["normals"] = normals_probe(train_pair, test_pair, cfg, device, cfg.seeds,
                                                                          description=label, progress=progress)
            elif probe == "segmentation":
                scores["segmentation"] = segmentation_probe(train_pair, test_pair, classes, cfg, device, cfg.seeds,
                                                            description=label, progress=progress)
            elif probe == "correspondence":
                pair_sets = features_of(backbone, pairs_frame_set(pairs, pairs_identity), [DENSE_FEATURES])
                scores["correspondence"], predictions["correspondence"] = correspondence_probe(
                    pair_sets[DENSE_FEATURES], pairs, cfg, device, f"correspondence · {backbone.label}", progress)
        # PCA picture of the first test frame's final-normed last block (a one-frame set unless segmentation has it).
        if SEGMENTATION_FEATURES not in test_sets:
            test_sets = features_of(backbone, test_frames.frame_set("first test frame", 1), [SEGMENTATION_FEATURES])
        predictions["pca"] = test_sets[SEGMENTATION_FEATURES].view(0)
        measurements[backbone.label] = scores
        results["models"][backbone.label] = {"backbone": backbone.name, "weights": backbone.weights,
                                             "samples_seen": seen}
        outputs[backbone.label] = predictions
    summarise(results, measurements, cfg)
    notes += short_run_notes(results)

    report_dir = Path(cfg.report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(report_dir / "report.json", json.dumps(results, indent=1))
    write_text_atomic(report_dir / "report.md", markdown_report(results))
    figures = save_figures(report_dir, test_frames, outputs)
    write_text_atomic(report_dir / "config.yaml", config_yaml)
    return EvalReport(report_dir, results, figures, uses)


def reference_index(reference: Path | None, runs: Sequence[Path]) -> int:
    """Position of ``eval.reference`` among the probed models (0 = the baseline, then ``runs`` in order)."""
    if reference is None:
        return 0
    for index, run in enumerate(runs, start=1):
        if Path(run).resolve() == Path(reference).resolve():
            return index
    raise ConfigError(f"eval.reference = {reference} is not one of the probed runs ({', '.join(map(str, runs))}); "
                      "name one of eval.runs, or leave it null for deltas against the baseline")


# The sections of a run's config.yaml that decide what it learned (data.root is left out: the same scenes may lie in
# another folder on another machine).
RUN_SECTIONS = ("sampling", "gaussians", "masks", "train")


def distinguishing_settings(runs: Sequence[Path]) -> list[list[str]]:
    """For each run (a run directory or one of its checkpoints), the settings ``section.key=value`` in which it
    differs from what most of the compared runs use (ties go to the earlier run), e.g. ``train.blending=1.0`` for an
    ablation row beside the default run. Settings that only observe a run (``TRAIN_OBSERVATION_ONLY``) never count.
    A run without a readable config.yaml gets nothing and does not count in what most runs use."""
    flat: list[dict | None] = []
    for run in runs:
        try:
            config = yaml.safe_load((run_of(run) / "config.yaml").read_text())
        except (OSError, yaml.YAMLError):
            config = None
        flat.append(None if not isinstance(config, dict) else {
            f"{section}.{key}": json.dumps(value, sort_keys=True)
            for section in RUN_SECTIONS for key, value in (config.get(section) or {}).items()
            if not (section == "train" and key in TRAIN_OBSERVATION_ONLY)})
    readable = [settings for settings in flat if settings is not None]
    keys = sorted(set().union(*readable)) if readable else []
    common = {key: collections.Counter(s.get(key) for s in readable).most_common(1)[0][0] for key in keys}
    return [[] if settings is None else
            [f"{key}={_setting_text(settings.get(key))}" for key in keys if settings.get(key) != common[key]]
            for settings in flat]


def _setting_text(encoded: str | None) -> str:
    value = None if encoded is None else json.loads(encoded)
    return value if isinstance(value, str) else json.dumps(value)


def _protocol(cfg: EvalCfg, train_ids, test_ids, train_frames: ProbeFrames, test_frames: ProbeFrames, pairs: int) -> dict:
    height, width = train_frames.image_size
    return {
        "probe_train_scenes": train_ids, "test_scenes": test_ids,
        "probe_train_frames": len(train_frames.names), "test_frames": len(test_frames.names),
        "image_size": [height, width], "probe_steps": cfg.probe_steps, "probe_batch_size": cfg.probe_batch_size,
        "probe_learning_rate": cfg.probe_learning_rate,
        "probe_warmup_fraction": cfg.probe_warmup_fraction, "seeds": list(cfg.seeds), "seed": cfg.seed,
        "features": {"depth": DEPTH_FEATURES.describe(), "depth_dense": MULTI_BLOCK_FEATURES.describe(),
                     "normals": DENSE_FEATURES.describe(),
                     "segmentation": SEGMENTATION_FEATURES.describe(), "correspondence": DENSE_FEATURES.describe()},
        "correspondence": {"pairs": pairs, "scale": cfg.correspondence_scale, "top_k": cfg.correspondence_top_k,
                           "gap": list(cfg.correspondence_gap),
                           "source": "ScanNet-1500" if cfg.scannet1500_pairs is not None else "held-out scenes"},
    }


# Fewer distillation samples than this (steps x batch) are not expected to change a probe's score. On the GPU
# demo (192x256, ViT-S/14), 8,000 samples moved nothing; with 64,000 every probe improved beyond its interval,
# and the held-out correspondence recall had made most of its gain by 32,000.
SAMPLES_FOR_AN_EFFECT = 32_000


def _samples_seen(run_dir: Path) -> int | None:
    """Distillation samples (steps x batch) of a finished run, from its manifest; None where it does not say."""
    try:
        manifest = read_run_manifest(Path(run_dir)) or {}
        return int(manifest["steps"]) * int(manifest["params"]["batch_size"])
    except (ValueError, KeyError, TypeError):
        return None


def short_run_notes(results: dict) -> list[str]:
    """A plain warning for each model trained too briefly to be expected to differ from the baseline."""
    notes = []
    for label, model in list(results["models"].items())[1:]:
        seen = model.get("samples_seen")
        if seen is not None and seen < SAMPLES_FOR_AN_EFFECT:
            notes.append(f"{label} saw {seen:,} distillation samples (steps x batch): too few to expect any change "
                         f"from the baseline (on the GPU demo, gains showed after some {SAMPLES_FOR_AN_EFFECT:,}; a CPU "
                         "run is a smoke test of the pipeline, not of the method). Its deltas are noise.")
    return notes


def summarise(results: dict, measurements: dict[str, dict[str, dict[str, Measurement]]], cfg: EvalCfg) -> None:
    """Point estimates, per-seed scores, 95 % intervals and per-unit parts of every model's metrics, and each
    model's paired deltas against ``results["reference"]`` (the baseline unless ``eval.reference`` names a run),
    into ``results`` (:mod:`snd_stages.report.statistics`).

    One resampling per probe is drawn from ``eval.seed`` and shared by every model, which makes the deltas paired.
    """
    labels = list(measurements)
    rng = np.random.default_rng(cfg.seed)
    resamplings = {}
    for probe, metrics in measurements[labels[0]].items():
        seeds, units = next(iter(metrics.values())).parts.shape[:2]
        resamplings[probe] = Resampling.draw(seeds, units, cfg.bootstrap_replicates, rng)
    replicates = {}
    for label in labels:
        model = results["models"][label]
        model.update({"intervals": {}, "per_seed": {}, "per_unit": {}})
        for probe, metrics in measurements[label].items():
            for metric, m in metrics.items():
                replicates[(label, probe, metric)] = m.replicates(resamplings[probe])
            model[probe] = {metric: _finite(m.estimate()) for metric, m in metrics.items()}
            model["intervals"][probe] = {metric: interval(replicates[(label, probe, metric)], CONFIDENCE)
                                         for metric in metrics}
            model["per_seed"][probe] = {metric: [_finite(v) for v in m.per_seed()] for metric, m in metrics.items()}
            model["per_unit"][probe] = {metric: m.to_json() for metric, m in metrics.items()}
            if probe == "segmentation":
                model[probe]["per_class_iou"] = _per_class_iou(metrics["miou"])
    reference = results.get("reference", labels[0])
    results["deltas"] = {}
    for label in labels:
        if label == reference:
            continue
        deltas = results["deltas"][label] = {}
        for probe, metrics in measurements[label].items():
            if probe not in measurements[reference]:
                continue
            deltas[probe] = {}
            for metric in metrics:
                difference = replicates[(label, probe, metric)] - replicates[(reference, probe, metric)]
                bounds = interval(difference, CONFIDENCE)
                value = results["models"][label][probe][metric]
                base = results["models"][reference][probe][metric]
                deltas[probe][metric] = {"delta": None if value is None or base is None else value - base,
                                         "interval": bounds, "excludes_zero": excludes_zero(bounds)}
    results["statistics"] = {
        "seeds": list(cfg.seeds), "bootstrap_replicates": cfg.bootstrap_replicates, "confidence": CONFIDENCE,
        "method": "mean over probe seeds of each seed's score on all test units; percentile intervals from a "
                  "two-level bootstrap redrawing seeds and test units (images, or pairs for correspondence) with "
                  "replacement; deltas paired on the same draws",
    }


def _finite(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _per_class_iou(miou: Measurement) -> list[float | None]:
    """Each class's IoU on all test images, averaged over seeds (None for a class absent everywhere)."""
    iou = class_iou(miou.parts.sum(axis=1))  # [seeds, classes]
    return [_finite(float(np.nanmean(column))) if np.isfinite(column).any() else None for column in iou.T]


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------

# (probe, metric, higher is better, format)
REPORTED = [
    ("depth", "rmse", False, "{:.4f}"), ("depth", "abs_rel", False, "{:.4f}"), ("depth", "delta1", True, "{:.3f}"),
    ("depth_dense", "rmse", False, "{:.4f}"), ("depth_dense", "abs_rel", False, "{:.4f}"),
    ("depth_dense", "delta1", True, "{:.3f}"),
    ("normals", "rmse", False, "{:.2f}"), ("normals", "mean", False, "{:.2f}"), ("normals", "within_11_25", True, "{:.1f}"),
    ("normals", "within_22_5", True, "{:.1f}"), ("normals", "within_30", True, "{:.1f}"),
    ("segmentation", "miou", True, "{:.4f}"),
    ("correspondence", "recall_5px", True, "{:.3f}"), ("correspondence", "recall_10px", True, "{:.3f}"),
    ("correspondence", "recall_20px", True, "{:.3f}"),
]


def _signed(fmt: str, value: float) -> str:
    return ("+" if value >= 0 else "−") + fmt.format(abs(value))


# The one metric per probe that the summary table shows (the full table has them all).
HEADLINE = [("depth", "rmse"), ("depth_dense", "rmse"), ("normals", "rmse"), ("segmentation", "miou"),
            ("correspondence", "recall_10px")]


def markdown_report(results: dict) -> str:
    labels = list(results["models"])
    baseline = labels[0]
    reference = results.get("reference", baseline)
    compared = [label for label in labels if label != reference]
    protocol = results["protocol"]
    statistics = results.get("statistics", {})
    seeds = statistics.get("seeds", [protocol.get("seed")])
    lines = [
        "# 3D-awareness probes", "",
        f"Probes trained on {protocol['probe_train_frames']} frames of {', '.join(protocol['probe_train_scenes'])}, "
        f"tested on {protocol['test_frames']} frames of {', '.join(protocol['test_scenes'])} "
        f"({protocol['image_size'][0]}x{protocol['image_size'][1]}); {protocol['probe_steps']} AdamW steps per probe, "
        f"batch {protocol['probe_batch_size']}, probe seeds {', '.join(map(str, seeds))}; correspondence on "
        f"{protocol['correspondence']['pairs']} pairs at scale {protocol['correspondence']['scale']}. "
        "Every model gets identical probe settings, seeds and test data. Arrows: which direction is better.", "",
        f"Each cell: the mean over probe seeds, then its {round(100 * statistics.get('confidence', CONFIDENCE))} % "
        "interval over seeds and test images (pairs for correspondence; two-level bootstrap, "
        f"{statistics.get('bootstrap_replicates', 0):,} replicates). Each Δ is taken against {reference}, with its "
        "own paired interval; a **bold** Δ is one whose interval excludes 0.", "",
    ]
    formats = {(probe, metric): (higher, fmt) for probe, metric, higher, fmt in REPORTED}
    headline = [(probe, metric) for probe, metric in HEADLINE
                if results["models"][baseline].get(probe, {}).get(metric) is not None]
    lines += ["| model | " + " | ".join(f"{probe} {metric} {'↑' if formats[(probe, metric)][0] else '↓'}"
                                        for probe, metric in headline) + " |",
              "|---|" + "---|" * len(headline)]
    for label in labels:
        cells = []
        for probe, metric in headline:
            fmt = formats[(probe, metric)][1]
            value = results["models"][label].get(probe, {}).get(metric)
            cell = "–" if value is None else fmt.format(value)
            if label != reference:
                cell += f" (Δ {_delta_text(results, label, probe, metric, fmt)})"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| " + " | ".join(["probe", "metric", *labels, *(f"Δ {label}" for label in compared)]) + " |",
              "|---|---|" + "---|" * (len(labels) + len(compared))]
    binned = [("correspondence", key, True, "{:.3f}") for key in results["models"][baseline].get("correspondence", {})
              if key.startswith("recall_10px_rotation_")]
    for probe, metric, higher, fmt in REPORTED + binned:
        values = [results["models"][label].get(probe, {}).get(metric) for label in labels]
        if values[0] is None:
            continue
        cells = []
        for label, value in zip(labels, values):
            bounds = results["models"][label].get("intervals", {}).get(probe, {}).get(metric, [None, None])
            cells.append("–" if value is None else fmt.format(value) + _bounds_text(fmt, bounds, signed=False))
        cells += [_delta_text(results, label, probe, metric, fmt) for label in compared]
        lines.append(f"| {probe} | {metric} {'↑' if higher else '↓'} | " + " | ".join(cells) + " |")
    lines += ["", "Features (stored as float16): " + "; ".join(f"{k}: {v}" for k, v in protocol["features"].items()) + "."]
    if results.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {note}" for note in results["notes"]]
    return "\n".join(lines) + "\n"


def _delta_text(results: dict, label: str, probe: str, metric: str, fmt: str) -> str:
    """``+0.050 [+0.027, +0.073]``, bold when the interval excludes 0; ``–`` where there is none."""
    delta = results.get("deltas", {}).get(label, {}).get(probe, {}).get(metric)
    if delta is None or delta["delta"] is None:
        return "–"
    text = _signed(fmt, delta["delta"])
    return (f"**{text}**" if delta["excludes_zero"] else text) + _bounds_text(fmt, delta["interval"], signed=True)


def _bounds_text(fmt: str, bounds, signed: bool) -> str:
    if not bounds or bounds[0] is None:
        return ""
    show = (lambda v: _signed(fmt, v)) if signed else fmt.format
    return f" [{show(bounds[0])}, {show(bounds[1])}]"


def _colour_map(values: np.ndarray, low: float, high: float) -> np.ndarray:
    import matplotlib

    scaled = np.clip((values - low) / max(high - low, 1e-9), 0, 1)
    return (matplotlib.colormaps["magma_r"](scaled)[..., :3] * 255).astype(np.uint8)


def save_figures(report_dir: Path, frames: ProbeFrames, outputs: dict) -> list[Path]:
    figures = []
    image = np.asarray(frames.load_image(0))
    labels = list(outputs)
    if all("depth" in outputs[label] for label in labels):
        truth = frames.depth[0].numpy()
        high = float(truth.max())
        panels = [image, _colour_map(truth, 0, high)] + [_colour_map(outputs[l]["depth"][0].numpy(), 0, high) for l in labels]
        figures.append(_save(report_dir / "depth.png", panels, ["image", "truth"] + labels))
    if all("normals" in outputs[label] for label in labels):
        to_rgb = lambda n: ((n.clamp(-1, 1) + 1) / 2 * 255).round().byte().numpy()  # noqa: E731
        panels = [image, to_rgb(frames.normals[0].float().permute(1, 2, 0))]
        panels += [to_rgb(outputs[l]["normals"][0].permute(1, 2, 0)) for l in labels]
        figures.append(_save(report_dir / "normals.png", panels, ["image", "truth"] + labels))
    if all("correspondence" in outputs[label] and outputs[label]["correspondence"] for label in labels):
        rows = [_correspondence_picture(*outputs[l]["correspondence"]) for l in labels]
        figures.append(_save(report_dir / "correspondence.png", rows, labels, vertical=True))
    pca_panels = [_pca_picture(outputs[l]["pca"], image.shape[:2]) for l in labels]
    figures.append(_save(report_dir / "pca.png", [image] + pca_panels, ["image"] + labels))
    return figures


def _pca_picture(features: Features, size) -> np.ndarray:
    picture = pca_rgb(features.tokens[0])
    return np.asarray(Image.fromarray(picture).resize((size[1], size[0]), Image.NEAREST))


def _correspondence_picture(pair: CorrespondencePair, pixels0, pixels1, errors, shown: int = 80) -> np.ndarray:
    """Both images side by side, every n-th of the top matches as a line from green (0 px) to red (>= 20 px)."""
    image0, image1 = pair.load_image(0), pair.load_image(1)
    width = image0.shape[1]
    canvas = Image.fromarray(np.concatenate([image0, image1], axis=1))
    draw = ImageDraw.Draw(canvas)
    for index in range(0, len(errors), max(1, len(errors) // shown)):
        badness = min(float(errors[index]) / 20.0, 1.0)
        (x0, y0), (x1, y1) = pixels0[index].tolist(), pixels1[index].tolist()
        draw.line([(x0, y0), (x1 + width, y1)], fill=(int(255 * badness), int(255 * (1 - badness)), 0), width=1)
    return np.asarray(canvas)


def _save(path: Path, panels: list[np.ndarray], titles: list[str], vertical: bool = False) -> Path:
    """Panels side by side (or stacked), each under a title strip that names it."""
    titled = []
    for panel, title in zip(panels, titles):
        strip = Image.new("RGB", (panel.shape[1], 14), (255, 255, 255))
        ImageDraw.Draw(strip).text((2, 1), title[: max(4, panel.shape[1] // 6)], fill=(0, 0, 0))
        titled.append(np.concatenate([np.asarray(strip), panel[..., :3]], axis=0))
    Image.fromarray(np.concatenate(titled, axis=0 if vertical else 1)).save(path)
    return path
