"""``snd eval``: probe the baseline and every fine-tuned model side by side, with identical settings and seeds.

Usage::

    snd eval --config pipeline.yaml                       # baseline vs the run of this config's train section
    snd eval --set eval.runs=[data/runs/<key>] --set eval.probes=[depth,correspondence]

Data: the held-out scenes of ``data.root`` (its val split, never sampled for training); the first
``eval.probe_train_scenes`` of them train the probes, the others test them (every ``frame_stride``-th frame).
Probes, on frozen features (``reference/method.md`` §2, with a scaled-down iteration budget):

- depth: FiT3D's linear bin probe (256 bins, SigLoss + 0.5 gradient loss, last block without final norm + CLS);
- depth_dense (opt-in): Probe3D's multi-block dense probe on four blocks, same loss and metrics;
- normals: linear probe with the uncertainty-aware angular loss (last block, no final norm);
- segmentation: linear probe on the final-normed last block, mIoU over the dataset's semantic classes;
- correspondence: Probe3D's cosine nearest neighbour + ratio test, top-k, recall at 5/10/20 px at
  ``correspondence_scale`` of the image size, and recall@10 binned by relative rotation.

Writes ``<report_dir>/report.json``, ``report.md`` (one table, baseline beside each model with deltas) and PNG
figures (depth and normal predictions vs truth, correspondences coloured by error, PCA feature maps).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from rich.progress import Progress

from ..config import DataCfg, EvalCfg, TrainCfg, dump_sections
from ..errors import ConfigError, DataError
from ..geometry import image_to_tensor, pixel_centers, transform_points, unproject_depth
from ..probes.backbone import (
    DENSE_FEATURES,
    DEPTH_FEATURES,
    MULTI_BLOCK_FEATURES,
    SEGMENTATION_FEATURES,
    Features,
    FeatureSpec,
    ProbeBackbone,
)
from ..probes.heads import DenseDepthProbe, DepthBinHead, NormalHead, SegmentationHead, depth_loss, segmentation_loss, uncertainty_angular_loss
from ..probes.metrics import (
    binned_recall,
    correspondence_recall,
    depth_metrics,
    match_features,
    normal_metrics,
    reprojection_errors,
    segmentation_confusion,
    segmentation_scores,
)
from ..progress import track
from ..runtime import resolve_device
from ..scenes.correspondence import CorrespondencePair, pairs_from_scene, read_scannet1500
from ..scenes.layout import list_scene_ids, read_scene
from ..scenes.normals import normals_from_depth_plane_fit
from ..scenes.nyuv2 import NYU_HEIGHT, NYU_WIDTH, NYUv2Labeled, eigen_crop_mask
from ..store import write_text_atomic
from ..visualize import pca_rgb

MIN_DEPTH = 1e-3


@dataclass
class ProbeFrames:
    """Frames with their ground truth, stacked: ``images [N, 3, H, W]``, ``depth [N, H, W]``,
    ``normals [N, 3, H, W]`` (camera frame), ``semantics [N, H, W]`` (255 = ignore), and the region where depth is
    scored (``[H, W]`` bool, e.g. NYUv2's Eigen crop; None = everywhere)."""

    images: torch.Tensor
    depth: torch.Tensor
    normals: torch.Tensor
    semantics: torch.Tensor
    names: list[str]
    depth_region: torch.Tensor | None = None


def load_nyuv2_frames(cfg: EvalCfg, split: str) -> ProbeFrames:
    """Every ``frame_stride``-th frame of NYUv2's official ``split``; normals fitted to depth (no GT normals)."""
    if cfg.nyuv2_mat is None:
        raise ConfigError("eval.dataset = 'nyuv2' needs eval.nyuv2_mat: the path of nyu_depth_v2_labeled.mat")
    data = NYUv2Labeled(cfg.nyuv2_mat, cfg.nyuv2_splits, {40: cfg.nyuv2_mapping_40, 13: cfg.nyuv2_mapping_13})
    camera = data.camera()
    images, depth, normals, semantics, names = [], [], [], [], []
    for index in data.split(split)[:: cfg.frame_stride]:
        frame_depth = data.depth(int(index))
        images.append(image_to_tensor(data.image(int(index))))
        depth.append(torch.from_numpy(frame_depth))
        normals.append(torch.from_numpy(normals_from_depth_plane_fit(frame_depth, camera)).permute(2, 0, 1).float())
        semantics.append(torch.from_numpy(data.labels(int(index), cfg.nyuv2_classes).astype(np.int64)))
        names.append(f"nyuv2/{int(index)}")
    # Depth is scored inside the Eigen crop, which only exists for the dataset's own 480x640 frames.
    region = None
    if (data.height, data.width) == (NYU_HEIGHT, NYU_WIDTH):
        region = torch.from_numpy(eigen_crop_mask(data.height, data.width))
    return ProbeFrames(torch.stack(images), torch.stack(depth), torch.stack(normals), torch.stack(semantics), names,
                       region)


def load_frames(root: Path, scene_ids: list[str], stride: int) -> ProbeFrames:
    images, depth, normals, semantics, names = [], [], [], [], []
    for scene_id in scene_ids:
        scene = read_scene(root, scene_id)
        for kind in ("depth", "normals", "semantic_segmentation"):
            if not scene.has(kind):
                raise DataError(f"scene {scene.directory} has no {kind}/ folder, which the probes need as ground truth")
        for position in range(0, len(scene), stride):
            images.append(image_to_tensor(scene.load_image(position)))
            depth.append(torch.from_numpy(scene.load_depth(position)))
            normals.append(torch.from_numpy(scene.load_normals(position)).permute(2, 0, 1))
            semantics.append(torch.from_numpy(scene.load_semantics(position)))
            names.append(f"{scene_id}/{scene.frames[position].name}")
    return ProbeFrames(torch.stack(images), torch.stack(depth), torch.stack(normals), torch.stack(semantics), names)


def class_count(root: Path) -> int:
    classes_file = Path(root) / "metadata" / "semantic_classes.txt"
    if not classes_file.is_file():
        raise DataError(f"{classes_file} is missing: the segmentation probe needs the list of semantic classes")
    return len([line for line in classes_file.read_text().splitlines() if line.strip()])


def extract(backbone: ProbeBackbone, images: torch.Tensor, spec: FeatureSpec, batch: int = 8) -> Features:
    """Features of many images, batched (all images share one size)."""
    parts = [backbone.features(images[i : i + batch], spec) for i in range(0, len(images), batch)]
    return Features(torch.cat([p.tokens.cpu() for p in parts]), parts[0].padding, parts[0].image_size)


# ---------------------------------------------------------------------------------------------------------------
# Probes
# ---------------------------------------------------------------------------------------------------------------


def _fit(head: torch.nn.Module, loss_of, count: int, cfg: EvalCfg, device) -> torch.nn.Module:
    """AdamW with a cosine schedule on random minibatches drawn by a seeded generator (same for every model)."""
    head.to(device).train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.probe_learning_rate, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.probe_steps)
    generator = torch.Generator().manual_seed(cfg.seed)
    for step in range(cfg.probe_steps):
        batch = torch.randint(0, count, (min(cfg.probe_batch_size, count),), generator=generator)
        loss = loss_of(head, batch, warmup=step < 100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 35.0)  # FiT3D's gradient clip
        optimizer.step()
        scheduler.step()
    return head.eval()


class _MultiBlockDepth(torch.nn.Module):
    """Probe3D's dense probe on features holding ``blocks`` equally wide blocks concatenated along channels."""

    def __init__(self, channels: int, blocks: int, max_depth: float):
        super().__init__()
        self.blocks = blocks
        self.probe = DenseDepthProbe([channels // blocks] * blocks, max_depth=max_depth)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.probe(list(features.chunk(self.blocks, dim=1)))


def depth_probe(train: tuple[Features, ProbeFrames], test: tuple[Features, ProbeFrames], cfg: EvalCfg, device,
                dense: bool = False):
    """FiT3D's linear bin probe, or (``dense``) Probe3D's multi-block dense probe; same loss and metrics."""
    features, frames = train
    torch.manual_seed(cfg.seed)
    channels = features.tokens.shape[1]
    if dense:
        head = _MultiBlockDepth(channels, len(MULTI_BLOCK_FEATURES.blocks), cfg.max_depth)
    else:
        head = DepthBinHead(channels, max_depth=cfg.max_depth)

    def loss_of(head, batch, warmup):
        prediction = features.crop(head(features.tokens[batch].to(device)))[:, 0]
        target = frames.depth[batch].to(device)
        valid = (target > MIN_DEPTH) & (target < cfg.max_depth)
        return depth_loss(prediction, target, valid, warmup=warmup)

    _fit(head, loss_of, len(frames.images), cfg, device)
    test_features, test_frames = test
    predictions, per_image = [], []
    with torch.no_grad():
        for index in range(len(test_frames.images)):
            prediction = test_features.crop(head(test_features.tokens[index : index + 1].to(device)))[0, 0].cpu()
            target = test_frames.depth[index]
            valid = (target > MIN_DEPTH) & (target < cfg.max_depth)
            if test_frames.depth_region is not None:
                valid &= test_frames.depth_region
            per_image.append(depth_metrics(prediction, target, valid))
            predictions.append(prediction)
    return _mean(per_image), predictions


def normals_probe(train, test, cfg: EvalCfg, device):
    features, frames = train
    torch.manual_seed(cfg.seed)
    head = NormalHead(features.tokens.shape[1])
    padded = _padded_size(features)

    def loss_of(head, batch, warmup):
        normals, kappa = head(features.tokens[batch].to(device), size=padded)
        valid = frames.depth[batch].to(device) > 0
        return uncertainty_angular_loss(features.crop(normals), features.crop(kappa), frames.normals[batch].to(device), valid)

    _fit(head, loss_of, len(frames.images), cfg, device)
    test_features, test_frames = test
    predictions, per_image = [], []
    with torch.no_grad():
        for index in range(len(test_frames.images)):
            normals, _ = head(test_features.tokens[index : index + 1].to(device), size=padded)
            prediction = F.normalize(test_features.crop(normals), dim=1)[0].cpu()
            valid = test_frames.depth[index] > 0
            per_image.append(normal_metrics(prediction.permute(1, 2, 0), test_frames.normals[index].permute(1, 2, 0), valid))
            predictions.append(prediction)
    return _mean(per_image), predictions


def segmentation_probe(train, test, classes: int, cfg: EvalCfg, device):
    features, frames = train
    torch.manual_seed(cfg.seed)
    head = SegmentationHead(features.tokens.shape[1], classes)

    def loss_of(head, batch, warmup):
        logits = features.crop(head(features.tokens[batch].to(device)))
        return segmentation_loss(logits, frames.semantics[batch].to(device))

    _fit(head, loss_of, len(frames.images), cfg, device)
    test_features, test_frames = test
    confusion = torch.zeros(classes, classes, dtype=torch.long)
    with torch.no_grad():
        for index in range(len(test_frames.images)):
            logits = test_features.crop(head(test_features.tokens[index : index + 1].to(device)))
            confusion += segmentation_confusion(logits.argmax(1)[0].cpu(), test_frames.semantics[index], classes)
    scores = segmentation_scores(confusion)
    return {"miou": float(scores["miou"]), "pixel_accuracy": float(scores["pixel_accuracy"]),
            "per_class_iou": [None if math.isnan(v) else float(v) for v in scores["per_class_iou"]]}


def pair_correspondences(backbone: ProbeBackbone, pair: CorrespondencePair, cfg: EvalCfg):
    """Probe3D's procedure on one pair: (pixel errors of the top-k matches at the matching scale, and the matched
    points' pixel coordinates in each full-size image)."""
    views = []
    for view in (0, 1):
        image = image_to_tensor(pair.load_image(view))[None]
        camera = (pair.camera0, pair.camera1)[view]
        height, width = image.shape[-2:]
        small = (max(1, round(height * cfg.correspondence_scale)), max(1, round(width * cfg.correspondence_scale)))
        depth = torch.from_numpy(pair.load_depth(view))[None, None]
        depth = F.interpolate(depth, size=small, mode="nearest")[0, 0].double()
        small_camera = camera.resized(*small)
        valid = depth > 0
        points = unproject_depth(depth, small_camera)[valid]  # world = camera 0's frame
        # Features at each valid point's pixel centre, sampled bilinearly from the dense (cropped) feature map.
        features = backbone.features(image, DENSE_FEATURES)
        dense = features.crop(features.tokens)  # [1, C, H, W]
        centres = pixel_centers(*small, dtype=torch.float32)[valid]
        grid = torch.stack([centres[:, 0] / small[1] * 2 - 1, centres[:, 1] / small[0] * 2 - 1], dim=-1)
        sampled = F.grid_sample(dense, grid[None, None].to(dense.device), mode="bilinear", align_corners=False)
        full_resolution = centres * torch.tensor([width / small[1], height / small[0]])  # for drawing
        views.append((points, sampled[0, :, 0].T.cpu(), full_resolution, small_camera))
    (points0, features0, pixels0, _), (points1, features1, pixels1, camera1) = views
    index0, index1, _ = match_features(features0, features1, top_k=cfg.correspondence_top_k)
    world_to_camera1 = camera1.world_to_camera
    errors = reprojection_errors(
        transform_points(world_to_camera1, points0[index0]), transform_points(world_to_camera1, points1[index1]),
        camera1.intrinsics,
    )
    return errors.float(), pixels0[index0], pixels1[index1]


def correspondence_probe(backbone: ProbeBackbone, pairs: list[CorrespondencePair], cfg: EvalCfg):
    errors, rotations, first = [], [], None
    for pair in pairs:
        pair_errors, pixels0, pixels1 = pair_correspondences(backbone, pair, cfg)
        errors.append(pair_errors)
        rotations.append(torch.full_like(pair_errors, pair.rotation_degrees))
        if first is None:
            first = (pair, pixels0, pixels1, pair_errors)
    all_errors, all_rotations = torch.cat(errors), torch.cat(rotations)
    binned = {f"recall_10px_rotation_{bin_name}": value for bin_name, value in binned_recall(all_errors, all_rotations).items()}
    return {**correspondence_recall(all_errors), **binned}, first


# ---------------------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalReport:
    report_dir: Path
    results: dict
    figures: list[Path]


def evaluate(data: DataCfg, train: TrainCfg, cfg: EvalCfg, runs: list[Path], progress: Progress | None = None) -> EvalReport:
    """Probe the baseline (``train.backbone`` with ``eval.baseline_weights``) and each run; write the report."""
    device = resolve_device(cfg.device, "eval.device")
    pairs: list[CorrespondencePair] = []
    if cfg.dataset == "nyuv2":
        train_ids, test_ids = ["nyuv2 train split"], ["nyuv2 test split"]
        train_frames, test_frames = load_nyuv2_frames(cfg, "train"), load_nyuv2_frames(cfg, "test")
        classes = cfg.nyuv2_classes
        probes = [probe for probe in cfg.probes if probe != "correspondence"]  # single views: no pairs
    else:
        scene_ids = list_scene_ids(data.root, "val")
        if len(scene_ids) <= cfg.probe_train_scenes:
            raise ConfigError(
                f"eval.probe_train_scenes = {cfg.probe_train_scenes} leaves no test scene among the {len(scene_ids)} "
                f"held-out scenes of {data.root}; lower it or add held-out scenes (demo.eval_scenes)"
            )
        train_ids, test_ids = scene_ids[: cfg.probe_train_scenes], scene_ids[cfg.probe_train_scenes :]
        train_frames = load_frames(data.root, train_ids, cfg.frame_stride)
        test_frames = load_frames(data.root, test_ids, cfg.frame_stride)
        classes = class_count(data.root) if "segmentation" in cfg.probes else 0
        probes = list(cfg.probes)
        if "correspondence" in probes:
            per_scene = math.ceil(cfg.correspondence_pairs / len(test_ids))
            for index, scene_id in enumerate(test_ids):
                pairs += pairs_from_scene(read_scene(data.root, scene_id), per_scene, *cfg.correspondence_gap,
                                          cfg.seed + index)
            pairs = pairs[: cfg.correspondence_pairs]

    if "correspondence" in cfg.probes and (cfg.scannet1500_pairs is not None or cfg.scannet1500_root is not None):
        if cfg.scannet1500_pairs is None or cfg.scannet1500_root is None:
            raise ConfigError("ScanNet-1500 needs both eval.scannet1500_pairs and eval.scannet1500_root")
        pairs = read_scannet1500(cfg.scannet1500_pairs, cfg.scannet1500_root)[: cfg.correspondence_pairs]
        probes = list(dict.fromkeys([*probes, "correspondence"]))

    torch.manual_seed(cfg.seed)  # a random-weights baseline (smoke runs) is then the same model every time
    models = [ProbeBackbone(train.backbone, cfg.baseline_weights, f"DINOv2 {train.backbone} ({cfg.baseline_weights})",
                            device, allow_random=cfg.baseline_weights == "random")]
    models += [ProbeBackbone.from_run(run, device=device) for run in runs]
    results: dict = {"protocol": {"dataset": cfg.dataset, "probes": probes,
                                  **_protocol(cfg, train_ids, test_ids, train_frames, test_frames, len(pairs))},
                     "models": {}}
    outputs = {}
    for backbone in track(models, "probing models", progress, unit="model"):
        scores, predictions = {}, {}
        specs = {"depth": DEPTH_FEATURES, "depth_dense": MULTI_BLOCK_FEATURES, "normals": DENSE_FEATURES,
                 "segmentation": SEGMENTATION_FEATURES}
        cached = {}
        for probe in probes:
            if probe in specs and specs[probe] not in cached:
                cached[specs[probe]] = (extract(backbone, train_frames.images, specs[probe]),
                                        extract(backbone, test_frames.images, specs[probe]))
            if probe == "depth":
                train_features, test_features = cached[DEPTH_FEATURES]
                scores["depth"], predictions["depth"] = depth_probe(
                    (train_features, train_frames), (test_features, test_frames), cfg, device)
            elif probe == "depth_dense":
                train_features, test_features = cached[MULTI_BLOCK_FEATURES]
                scores["depth_dense"], _ = depth_probe(
                    (train_features, train_frames), (test_features, test_frames), cfg, device, dense=True)
            elif probe == "normals":
                train_features, test_features = cached[DENSE_FEATURES]
                scores["normals"], predictions["normals"] = normals_probe(
                    (train_features, train_frames), (test_features, test_frames), cfg, device)
            elif probe == "segmentation":
                train_features, test_features = cached[SEGMENTATION_FEATURES]
                scores["segmentation"] = segmentation_probe(
                    (train_features, train_frames), (test_features, test_frames), classes, cfg, device)
            elif probe == "correspondence":
                scores["correspondence"], predictions["correspondence"] = correspondence_probe(backbone, pairs, cfg)
        predictions["pca"] = extract(backbone, test_frames.images[:1], SEGMENTATION_FEATURES)
        results["models"][backbone.label] = {"backbone": backbone.name, "weights": backbone.weights, **scores}
        outputs[backbone.label] = predictions

    report_dir = Path(cfg.report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(report_dir / "report.json", json.dumps(results, indent=1))
    write_text_atomic(report_dir / "report.md", markdown_report(results))
    figures = save_figures(report_dir, test_frames, outputs)
    write_text_atomic(report_dir / "config.yaml", dump_sections(data=data, train=train, eval=cfg))
    return EvalReport(report_dir, results, figures)


def _protocol(cfg: EvalCfg, train_ids, test_ids, train_frames: ProbeFrames, test_frames: ProbeFrames, pairs: int) -> dict:
    height, width = train_frames.images.shape[-2:]
    return {
        "probe_train_scenes": train_ids, "test_scenes": test_ids,
        "probe_train_frames": len(train_frames.names), "test_frames": len(test_frames.names),
        "image_size": [height, width], "probe_steps": cfg.probe_steps, "probe_batch_size": cfg.probe_batch_size,
        "probe_learning_rate": cfg.probe_learning_rate, "seed": cfg.seed,
        "features": {"depth": DEPTH_FEATURES.describe(), "depth_dense": MULTI_BLOCK_FEATURES.describe(),
                     "normals": DENSE_FEATURES.describe(),
                     "segmentation": SEGMENTATION_FEATURES.describe(), "correspondence": DENSE_FEATURES.describe()},
        "correspondence": {"pairs": pairs, "scale": cfg.correspondence_scale, "top_k": cfg.correspondence_top_k,
                           "gap": list(cfg.correspondence_gap),
                           "source": "ScanNet-1500" if cfg.scannet1500_pairs is not None else "held-out scenes"},
    }


def _mean(per_image: list[dict]) -> dict:
    return {key: float(np.nanmean([row[key] for row in per_image])) for key in per_image[0]}


def _padded_size(features: Features) -> tuple[int, int]:
    top, bottom, left, right = features.padding
    return features.image_size[0] + top + bottom, features.image_size[1] + left + right


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


def markdown_report(results: dict) -> str:
    labels = list(results["models"])
    baseline = labels[0]
    protocol = results["protocol"]
    lines = [
        "# 3D-awareness probes", "",
        f"Probes trained on {protocol['probe_train_frames']} frames of {', '.join(protocol['probe_train_scenes'])}, "
        f"tested on {protocol['test_frames']} frames of {', '.join(protocol['test_scenes'])} "
        f"({protocol['image_size'][0]}x{protocol['image_size'][1]}); {protocol['probe_steps']} AdamW steps per probe, "
        f"batch {protocol['probe_batch_size']}, seed {protocol['seed']}; correspondence on "
        f"{protocol['correspondence']['pairs']} pairs at scale {protocol['correspondence']['scale']}. "
        "Every model gets identical probe settings and seeds. Arrows: which direction is better.", "",
        "| probe | metric | " + " | ".join(labels) + " | " + " | ".join(f"Δ {label}" for label in labels[1:]) + " |",
        "|---|---|" + "---|" * (2 * len(labels) - 1),
    ]
    binned = [("correspondence", key, True, "{:.3f}") for key in results["models"][baseline].get("correspondence", {})
              if key.startswith("recall_10px_rotation_")]
    for probe, metric, higher, fmt in REPORTED + binned:
        rows = [results["models"][label].get(probe, {}).get(metric) for label in labels]
        rows = [None if value is not None and math.isnan(value) else value for value in rows]
        if rows[0] is None:
            continue
        deltas = [value - rows[0] if value is not None else None for value in rows[1:]]
        arrow = "↑" if higher else "↓"
        cells = [fmt.format(v) if v is not None else "–" for v in rows]
        delta_cells = [(("+" if d >= 0 else "") + fmt.format(d)) if d is not None else "–" for d in deltas]
        lines.append(f"| {probe} | {metric} {arrow} | " + " | ".join(cells + delta_cells) + " |")
    lines += ["", "Features: " + "; ".join(f"{k}: {v}" for k, v in protocol["features"].items()) + "."]
    return "\n".join(lines) + "\n"


def _colour_map(values: np.ndarray, low: float, high: float) -> np.ndarray:
    import matplotlib

    scaled = np.clip((values - low) / max(high - low, 1e-9), 0, 1)
    return (matplotlib.colormaps["magma_r"](scaled)[..., :3] * 255).astype(np.uint8)


def save_figures(report_dir: Path, frames: ProbeFrames, outputs: dict) -> list[Path]:
    figures = []
    image = (frames.images[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    labels = list(outputs)
    if all("depth" in outputs[label] for label in labels):
        truth = frames.depth[0].numpy()
        high = float(truth.max())
        panels = [image, _colour_map(truth, 0, high)] + [_colour_map(outputs[l]["depth"][0].numpy(), 0, high) for l in labels]
        figures.append(_save(report_dir / "depth.png", panels, ["image", "truth"] + labels))
    if all("normals" in outputs[label] for label in labels):
        to_rgb = lambda n: ((n.clamp(-1, 1) + 1) / 2 * 255).round().byte().numpy()  # noqa: E731
        panels = [image, to_rgb(frames.normals[0].permute(1, 2, 0))]
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
