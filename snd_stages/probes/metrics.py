"""Scores of the probes: depth, surface normals, semantic segmentation and multi-view correspondence.

Every function is a pure function of torch tensors for **one image** (or one image pair); the caller averages
per-image values over a data set (NaN-aware), except segmentation, whose confusion matrices are summed over the
data set before scoring (mmseg's convention). The definitions follow the reference implementations named in each
docstring (``reference/method.md`` §2):

- depth: FiT3D's evaluation, i.e. DINOv2's depth toolbox ``metrics()``;
- normals: Probe3D's ``evaluate_surface_norm`` (angular error in degrees), reported in percent;
- segmentation: mmseg's ``mean_iou`` (IoU NaN where a class has no pixel in prediction or label, nanmean);
- correspondence: Probe3D's ScanNet-pair procedure (cosine nearest neighbour, Lowe ratio weight, top-k, 0→1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..geometry import angle_between_degrees, rotation_angle_degrees

NORMAL_THRESHOLDS_DEG = (11.25, 22.5, 30.0)
RECALL_THRESHOLDS_PX = (5.0, 10.0, 20.0)
ROTATION_BINS_DEG = ((0.0, 15.0), (15.0, 30.0), (30.0, 60.0), (60.0, 180.0))


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shapes differ: {shapes}")


def depth_metrics(pred: Tensor, target: Tensor, valid: Tensor) -> dict[str, float]:
    """Depth errors of one image over its valid pixels, as FiT3D's (DINOv2 depth toolbox) ``metrics()``.

    With ``p`` the prediction and ``t`` the ground truth at the ``n`` valid pixels:

    - ``delta{k}`` = fraction with ``max(t / p, p / t) < 1.25 ** k``, k = 1, 2, 3;
    - ``abs_rel`` = mean ``|t - p| / t``; ``sq_rel`` = mean ``(t - p)² / t``;
    - ``rmse`` = sqrt(mean ``(t - p)²``); ``rmse_log`` = sqrt(mean ``(ln t - ln p)²``);
    - ``log10`` = mean ``|log10 t - log10 p|``;
    - ``silog`` = 100 · sqrt(mean ``e²`` − (mean ``e``)²) with ``e = ln p - ln t`` (population variance).

    The protocol's valid mask is ``min_depth < t < max_depth``; building it is the caller's job, and so is clamping
    the prediction to ``[min_depth, max_depth]`` if the protocol asks for it. Predictions must be positive.

    Args:
        pred: ``[H, W]`` predicted metric depth.
        target: ``[H, W]`` ground-truth metric depth.
        valid: ``[H, W]`` bool, pixels that count.

    Returns:
        dict of floats: delta1, delta2, delta3, abs_rel, sq_rel, rmse, rmse_log, log10, silog. All NaN when no pixel
        is valid.
    """
    _check_same_shape(pred=pred, target=target, valid=valid)
    keys = ("delta1", "delta2", "delta3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog")
    valid = valid.bool()
    if not valid.any():
        return {key: math.nan for key in keys}
    p = pred[valid].double()
    t = target[valid].double()
    ratio = torch.maximum(t / p, p / t)
    log_error = torch.log(p) - torch.log(t)
    silog_variance = (log_error.pow(2).mean() - log_error.mean().pow(2)).clamp(min=0.0)
    values = {
        "delta1": (ratio < 1.25).double().mean(),
        "delta2": (ratio < 1.25**2).double().mean(),
        "delta3": (ratio < 1.25**3).double().mean(),
        "abs_rel": ((t - p).abs() / t).mean(),
        "sq_rel": ((t - p).pow(2) / t).mean(),
        "rmse": (t - p).pow(2).mean().sqrt(),
        "rmse_log": log_error.pow(2).mean().sqrt(),
        "log10": (torch.log10(t) - torch.log10(p)).abs().mean(),
        "silog": 100.0 * silog_variance.sqrt(),
    }
    return {key: float(values[key]) for key in keys}


def angular_error_degrees(pred: Tensor, target: Tensor) -> Tensor:
    """Angle between normal vectors in degrees; neither needs to be unit length.

    Args:
        pred: ``[..., 3]`` predicted normals.
        target: ``[..., 3]`` ground-truth normals.

    Returns:
        ``[...]`` angles in [0, 180].
    """
    return angle_between_degrees(pred, target)


def normal_metrics(
    pred: Tensor, target: Tensor, valid: Tensor, thresholds: Sequence[float] = NORMAL_THRESHOLDS_DEG
) -> dict[str, float]:
    """Angular errors of one image's surface normals, as Probe3D's ``evaluate_surface_norm``.

    ``e`` is the angle between ``pred`` and ``target`` in degrees at the valid pixels (the protocol's mask is
    GT depth > 0): ``rmse`` = sqrt(mean e²), ``mean``, ``median`` (lower median, torch's), and
    ``within_<t>`` = 100 · fraction of pixels with ``e < t`` for t = 11.25, 22.5, 30 (keys ``within_11_25``,
    ``within_22_5``, ``within_30``). Probe3D reports fractions; these are percent.

    Args:
        pred: ``[H, W, 3]`` predicted normals (any length).
        target: ``[H, W, 3]`` ground-truth normals.
        valid: ``[H, W]`` bool.

    Returns:
        dict of floats; all NaN when no pixel is valid.
    """
    if pred.shape != target.shape or pred.shape[:-1] != valid.shape or pred.shape[-1] != 3:
        raise ValueError(f"expected [H, W, 3] x2 and [H, W], got {pred.shape}, {target.shape}, {valid.shape}")
    keys = ["rmse", "mean", "median"] + [_threshold_key("within", t) for t in thresholds]
    valid = valid.bool()
    if not valid.any():
        return {key: math.nan for key in keys}
    error = angular_error_degrees(pred[valid], target[valid])
    values = {"rmse": error.pow(2).mean().sqrt(), "mean": error.mean(), "median": error.median()}
    for threshold in thresholds:
        values[_threshold_key("within", threshold)] = 100.0 * (error < threshold).double().mean()
    return {key: float(values[key]) for key in keys}


def _threshold_key(prefix: str, threshold: float, unit: str = "") -> str:
    text = f"{threshold:g}".replace(".", "_")
    return f"{prefix}_{text}{unit}"


def segmentation_confusion(pred: Tensor, target: Tensor, classes: int, ignore_index: int = 255) -> Tensor:
    """Confusion matrix of one label map: rows are ground-truth classes, columns predicted classes.

    Pixels whose label is ``ignore_index`` (or outside ``[0, classes)``) are skipped. Sum the matrices of all
    images, then call :func:`segmentation_scores` (mmseg accumulates areas over the whole data set).

    Args:
        pred: ``[H, W]`` integer predicted classes in ``[0, classes)``.
        target: ``[H, W]`` integer labels.
        classes: number of classes.
        ignore_index: label value that does not count.

    Returns:
        ``[classes, classes]`` int64 counts.
    """
    _check_same_shape(pred=pred, target=target)
    target = target.long().flatten()
    pred = pred.long().flatten()
    keep = (target != ignore_index) & (target >= 0) & (target < classes)
    if ((pred[keep] < 0) | (pred[keep] >= classes)).any():
        raise ValueError(f"predicted classes must lie in [0, {classes})")
    flat = target[keep] * classes + pred[keep]
    return torch.bincount(flat, minlength=classes * classes).reshape(classes, classes)


def segmentation_scores(confusion: Tensor) -> dict[str, object]:
    """mIoU, per-class IoU and pixel accuracy of a (summed) confusion matrix, as mmseg's ``mean_iou``.

    IoU_c = TP_c / (GT_c + Pred_c − TP_c). A class with an empty union (absent from both labels and predictions)
    gets NaN and is left out of the mean (``nanmean``); a class that is only predicted counts with IoU 0.
    ``pixel_accuracy`` = Σ TP / Σ counted pixels.

    Args:
        confusion: ``[classes, classes]`` counts, rows ground truth, columns prediction.

    Returns:
        dict: ``miou`` (float), ``per_class_iou`` (list of floats, NaN for absent classes), ``pixel_accuracy``.
    """
    confusion = confusion.double()
    intersection = confusion.diagonal()
    union = confusion.sum(dim=1) + confusion.sum(dim=0) - intersection
    iou = torch.where(union > 0, intersection / union.clamp(min=1.0), torch.full_like(union, math.nan))
    present = ~torch.isnan(iou)
    total = confusion.sum()
    return {
        "miou": float(iou[present].mean()) if present.any() else math.nan,
        "per_class_iou": [float(value) for value in iou],
        "pixel_accuracy": float(intersection.sum() / total) if total > 0 else math.nan,
    }


def match_features(
    features0: Tensor, features1: Tensor, top_k: int = 1000, chunk_size: int = 2048
) -> tuple[Tensor, Tensor, Tensor]:
    """Probe3D's ratio-test matching of view 0's points to view 1's, in one direction (0→1).

    Features are L2-normalised; ``d = 1 − cos`` is the cosine distance. Every point of view 0 takes its two nearest
    neighbours in view 1, ``d1 ≤ d2``; its weight is ``1 − max(d1, 1e-9) / max(d2, 1e-9)`` (1 = unique, 0 = the two
    neighbours tie); the ``top_k`` points of view 0 with the largest weights are kept. The search runs in chunks of
    ``chunk_size`` rows of view 0, so 20k x 20k points need only ``chunk_size · N1`` floats at a time.

    Args:
        features0: ``[N0, C]`` features of view 0's points.
        features1: ``[N1, C]`` features of view 1's points, ``N1 ≥ 2``.
        top_k: matches kept (all of them when ``N0 < top_k``).
        chunk_size: rows of view 0 per similarity block.

    Returns:
        ``index0 [M]`` (into view 0), ``index1 [M]`` (into view 1) and ``weight [M]``, sorted by decreasing weight,
        ``M = min(top_k, N0)``.
    """
    if features0.ndim != 2 or features1.ndim != 2 or features0.shape[1] != features1.shape[1]:
        raise ValueError(f"expected [N0, C] and [N1, C], got {tuple(features0.shape)}, {tuple(features1.shape)}")
    if features1.shape[0] < 2:
        raise ValueError("the ratio test needs at least 2 points in view 1")
    normed1 = torch.nn.functional.normalize(features1.float(), dim=-1)
    nearest = []
    weights = []
    for start in range(0, features0.shape[0], chunk_size):
        normed0 = torch.nn.functional.normalize(features0[start : start + chunk_size].float(), dim=-1)
        similarity, index = (normed0 @ normed1.T).topk(2, dim=1)
        distance = (1.0 - similarity).clamp(min=1e-9)
        nearest.append(index[:, 0])
        weights.append(1.0 - distance[:, 0] / distance[:, 1])
    all_nearest = torch.cat(nearest)
    all_weights = torch.cat(weights)
    weight, index0 = all_weights.topk(min(top_k, all_weights.shape[0]))
    return index0, all_nearest[index0], weight


def correspondence_recall(
    errors_px: Tensor, thresholds: Sequence[float] = RECALL_THRESHOLDS_PX
) -> dict[str, float]:
    """Fraction of correspondences whose reprojection error is below each threshold (strictly less).

    Probe3D averages over all correspondences of all pairs: concatenate the pairs' errors before calling.

    Args:
        errors_px: ``[M]`` errors in pixels (Probe3D: in the 0.25-scaled 120x160 image).
        thresholds: pixel thresholds.

    Returns:
        ``{"recall_5px": ..., "recall_10px": ..., "recall_20px": ...}``; NaN when ``M = 0``.
    """
    errors = errors_px.double().flatten()
    return {
        _threshold_key("recall", t, "px"): float((errors < t).double().mean()) if errors.numel() else math.nan
        for t in thresholds
    }


def binned_recall(
    errors_px: Tensor,
    rotation_deg: Tensor | float,
    threshold: float = 10.0,
    bins: Sequence[tuple[float, float]] = ROTATION_BINS_DEG,
) -> dict[str, float]:
    """Recall at ``threshold`` pixels of the correspondences in each relative-rotation bin.

    A correspondence falls in bin ``[lo, hi)`` by the GT relative rotation of its pair (Probe3D's
    ``compute_binned_performance``); the last bin also takes ``rotation == hi`` so a 180° turn is not dropped.

    Args:
        errors_px: ``[M]`` errors in pixels.
        rotation_deg: ``[M]`` relative rotation (degrees) of each correspondence's pair, or one number for all.
        threshold: pixel threshold.
        bins: ``(lo, hi)`` degree ranges.

    Returns:
        ``{"0-15": recall, "15-30": ..., ...}``; NaN for an empty bin.
    """
    errors = errors_px.double().flatten()
    rotation = torch.as_tensor(rotation_deg, dtype=torch.float64).flatten().expand_as(errors)
    hits = (errors < threshold).double()
    result = {}
    for position, (low, high) in enumerate(bins):
        inside = (rotation >= low) & ((rotation < high) | ((position == len(bins) - 1) & (rotation == high)))
        result[f"{low:g}-{high:g}"] = float(hits[inside].mean()) if inside.any() else math.nan
    return result


def relative_rotation_degrees(world_to_camera0: Tensor, world_to_camera1: Tensor) -> float:
    """Geodesic angle of the relative rotation between two cameras, in degrees.

    ``R = R1 R0ᵀ`` (camera 0 to camera 1); its angle by :func:`snd_stages.geometry.rotation_angle_degrees`, which
    keeps full precision near 0° and 180°.

    Args:
        world_to_camera0: ``[4, 4]`` (or ``[3, 3]``) rigid world-to-camera transform of view 0.
        world_to_camera1: same for view 1.
    """
    rotation0 = world_to_camera0[:3, :3].double()
    rotation1 = world_to_camera1[:3, :3].double()
    return rotation_angle_degrees(rotation1 @ rotation0.T)


def reprojection_errors(
    points0_in_camera1: Tensor, points1_in_camera1: Tensor, intrinsics: Tensor
) -> Tensor:
    """Pixel distance between two sets of camera-1 points once projected with ``intrinsics``.

    Probe3D's error: ``‖π(K, R x0 + t) − π(K, x1)‖`` with ``(R, t)`` the GT pose of view 0 in view 1.

    Args:
        points0_in_camera1: ``[M, 3]`` matched points of view 0 moved into camera 1's frame.
        points1_in_camera1: ``[M, 3]`` their matches, in camera 1's frame.
        intrinsics: ``[3, 3]`` K of the image the errors are measured in.

    Returns:
        ``[M]`` pixel errors.
    """

    def project(points: Tensor) -> Tensor:
        uvw = points.double() @ intrinsics.double().T
        return uvw[:, :2] / uvw[:, 2:3].clamp(min=1e-9)

    return (project(points0_in_camera1) - project(points1_in_camera1)).norm(dim=-1)
