"""The dense frame probes: depth (FiT3D's linear bins, or Probe3D's multi-block probe), surface normals and
semantic segmentation, each fitted once per seed on frozen features and scored per test image."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress

from ..config import EvalCfg
from ..report.statistics import Measurement, mean_iou
from ..scenes.layout import IGNORE_LABEL
from .backbone import MULTI_BLOCK_FEATURES
from .features import FeatureSet, ModelFeatures
from .fitting import fit_label, fit_seeds, fitted_per_model, mean_measurements, seed_scores
from .frames import MIN_DEPTH, ProbeFrames
from .heads import (DenseDepthProbe, DepthBinHead, NormalHead, SegmentationHead, depth_loss, segmentation_loss,
                    uncertainty_angular_loss)
from .metrics import depth_metrics, normal_metrics, segmentation_confusion


class _MultiBlockDepth(torch.nn.Module):
    """Probe3D's dense probe on features holding ``blocks`` equally wide blocks concatenated along channels."""

    def __init__(self, channels: int, blocks: int, max_depth: float):
        super().__init__()
        self.blocks = blocks
        self.probe = DenseDepthProbe([channels // blocks] * blocks, max_depth=max_depth)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.probe(list(features.chunk(self.blocks, dim=1)))


Frames = tuple[Sequence[FeatureSet], ProbeFrames]  # every model's features of the same frames, and the frames


def depth_probe(train: Frames, test: Frames, cfg: EvalCfg, device, seeds: Sequence[int] = (0,), dense: bool = False,
                description: str = "depth probe", progress: Progress | None = None
                ) -> list[tuple[dict[str, Measurement], list[torch.Tensor]]]:
    """FiT3D's linear bin probe, or (``dense``) Probe3D's multi-block dense probe; same loss and metrics.

    For each model (of ``train``'s feature sets, all fitted together): every depth metric as a per-image measurement
    over ``seeds``, and the first seed's predictions.
    """
    train_sets, frames = train
    test_sets, test_frames = test
    depth = frames.depth.to(device)

    def fit(features: ModelFeatures, fit_seeds_list: list[int]):
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

        return fit_seeds(make_head, loss_of, inputs_of, len(frames), cfg, device, fit_seeds_list,
                         fit_label(description, features, seeds), progress)

    def score(test_features: FeatureSet, head):
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

    results = []
    for test_features, heads in zip(test_sets, fitted_per_model(train_sets, seeds, fit)):
        rows, predictions = seed_scores(functools.partial(score, test_features), heads)
        results.append((mean_measurements(rows), predictions))
    return results


def normals_probe(train: Frames, test: Frames, cfg: EvalCfg, device, seeds: Sequence[int] = (0,),
                  description: str = "normals probe", progress: Progress | None = None
                  ) -> list[tuple[dict[str, Measurement], list[torch.Tensor]]]:
    """SnD's linear normal probe, for each model: every angular metric as a per-image measurement, the first seed's
    predictions."""
    train_sets, frames = train
    test_sets, test_frames = test
    normals, depth = frames.normals.to(device), frames.depth.to(device)

    def fit(features: ModelFeatures, fit_seeds_list: list[int]):
        padded = features.padded_size

        def inputs_of(batches):
            on_device = batches.to(device)
            return features.batch(batches, device), normals[on_device].float(), depth[on_device] > 0

        def loss_of(head, tokens, truth, valid, warmup):
            predicted, kappa = head(tokens, size=padded)
            return uncertainty_angular_loss(features.crop(predicted), features.crop(kappa), truth, valid)

        return fit_seeds(lambda: NormalHead(features.channels), loss_of, inputs_of, len(frames), cfg, device,
                         fit_seeds_list, fit_label(description, features, seeds), progress)

    def score(test_features: FeatureSet, head):
        predictions, rows = [], []
        for index in range(len(test_frames)):
            predicted, _ = head(test_features.batch([index], device), size=test_features.padded_size)
            prediction = F.normalize(test_features.crop(predicted), dim=1)[0].cpu()
            valid = test_frames.depth[index] > 0
            truth = test_frames.normals[index].float()
            rows.append(normal_metrics(prediction.permute(1, 2, 0), truth.permute(1, 2, 0), valid))
            predictions.append(prediction)
        return rows, predictions

    results = []
    for test_features, heads in zip(test_sets, fitted_per_model(train_sets, seeds, fit)):
        rows, predictions = seed_scores(functools.partial(score, test_features), heads)
        results.append((mean_measurements(rows), predictions))
    return results


def segmentation_probe(train: Frames, test: Frames, classes: int, cfg: EvalCfg, device, seeds: Sequence[int] = (0,),
                       description: str = "segmentation probe", progress: Progress | None = None
                       ) -> list[dict[str, Measurement]]:
    """FiT3D's linear segmentation probe, for each model: mIoU (confusion summed over the test images, mmseg's
    convention) and pixel accuracy, as measurements whose parts are each image's per-class intersection, label and
    prediction areas."""
    train_sets, frames = train
    test_sets, test_frames = test
    labels = frames.semantics.to(device)

    def fit(features: ModelFeatures, fit_seeds_list: list[int]):
        def inputs_of(batches):
            return features.batch(batches, device), labels[batches.to(device)].long()

        def loss_of(head, tokens, truth, warmup):
            return segmentation_loss(features.crop(head(tokens)), truth, ignore_index=IGNORE_LABEL)

        return fit_seeds(lambda: SegmentationHead(features.channels, classes), loss_of, inputs_of, len(frames), cfg,
                         device, fit_seeds_list, fit_label(description, features, seeds), progress)

    def score(test_features: FeatureSet, head):
        confusions = []
        for index in range(len(test_frames)):
            logits = test_features.crop(head(test_features.batch([index], device)))
            confusions.append(segmentation_confusion(logits.argmax(1)[0].cpu(), test_frames.semantics[index].long(),
                                                     classes, ignore_index=IGNORE_LABEL).double().numpy())
        return confusions, None

    results = []
    for test_features, heads in zip(test_sets, fitted_per_model(train_sets, seeds, fit)):
        # [seeds, images, classes (truth), classes (predicted)]
        confusions = np.array(seed_scores(functools.partial(score, test_features), heads)[0])
        intersection = np.diagonal(confusions, axis1=2, axis2=3)
        areas = np.concatenate([intersection, confusions.sum(3), confusions.sum(2)], axis=-1)
        results.append({"miou": Measurement(areas, mean_iou, "miou"),
                        "pixel_accuracy": Measurement.of_rates(intersection.sum(-1), confusions.sum((2, 3)))})
    return results
