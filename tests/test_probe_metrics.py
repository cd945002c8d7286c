"""Probe scores on hand-computed cases: depth, normals, segmentation, correspondence matching and recall."""

from __future__ import annotations

import math

import pytest
import torch

from snd_stages.geometry import (
    Camera,
    invert_rigid,
    project_points,
    rotation_angle_degrees,
    transform_points,
    unproject_depth,
)
from snd_stages.probes.metrics import (
    angular_error_degrees,
    binned_recall,
    correspondence_recall,
    depth_metrics,
    match_features,
    normal_metrics,
    relative_rotation_degrees,
    reprojection_errors,
    segmentation_confusion,
    segmentation_scores,
)


def test_depth_metrics_on_a_two_by_two_case():
    target = torch.tensor([[1.0, 2.0], [4.0, 8.0]])
    pred = torch.tensor([[1.0, 2.5], [4.0, 0.0]])  # the zero is masked out
    valid = torch.tensor([[True, True], [True, False]])
    scores = depth_metrics(pred, target, valid)
    # errors 0, 0.5, 0 over 3 pixels
    assert scores["rmse"] == pytest.approx(math.sqrt(0.25 / 3))
    assert scores["abs_rel"] == pytest.approx((0.5 / 2) / 3)
    assert scores["sq_rel"] == pytest.approx((0.25 / 2) / 3)
    assert scores["delta1"] == pytest.approx(2 / 3)  # 2.5 / 2 = 1.25 is not < 1.25
    assert scores["delta2"] == pytest.approx(1.0)
    log_ratio = math.log(1.25)
    assert scores["rmse_log"] == pytest.approx(math.sqrt(log_ratio**2 / 3))
    assert scores["log10"] == pytest.approx(math.log10(1.25) / 3)
    expected_silog = 100 * math.sqrt(log_ratio**2 / 3 - (log_ratio / 3) ** 2)
    assert scores["silog"] == pytest.approx(expected_silog)


def test_depth_metrics_perfect_and_empty():
    target = torch.rand(5, 6) + 0.5
    perfect = depth_metrics(target.clone(), target, torch.ones(5, 6, dtype=torch.bool))
    assert perfect["rmse"] == 0 and perfect["abs_rel"] == 0 and perfect["delta1"] == 1 and perfect["silog"] == 0
    empty = depth_metrics(target, target, torch.zeros(5, 6, dtype=torch.bool))
    assert all(math.isnan(value) for value in empty.values())


def test_depth_metrics_silog_ignores_a_global_scale():
    target = torch.rand(4, 4) + 1.0
    scores = depth_metrics(2.0 * target, target, torch.ones(4, 4, dtype=torch.bool))
    assert scores["silog"] == pytest.approx(0.0, abs=1e-5)
    assert scores["abs_rel"] == pytest.approx(1.0)
    assert scores["delta3"] == 0.0  # 2 > 1.25³ ≈ 1.95


def test_normal_metrics_with_a_ninety_degree_error():
    target = torch.zeros(2, 2, 3)
    target[..., 2] = 1.0
    pred = target.clone() * 3.0  # length does not matter
    pred[0, 0] = torch.tensor([1.0, 0.0, 0.0])  # 90°
    pred[0, 1] = torch.tensor([0.0, math.sin(math.radians(20)), math.cos(math.radians(20))])  # 20°
    valid = torch.ones(2, 2, dtype=torch.bool)
    scores = normal_metrics(pred, target, valid)
    assert scores["mean"] == pytest.approx((90 + 20) / 4, abs=1e-4)
    assert scores["rmse"] == pytest.approx(math.sqrt((90**2 + 20**2) / 4), abs=1e-4)
    assert scores["median"] == pytest.approx(0.0, abs=1e-4)
    assert scores["within_11_25"] == pytest.approx(50.0)
    assert scores["within_22_5"] == pytest.approx(75.0)
    assert scores["within_30"] == pytest.approx(75.0)
    valid[0, 0] = False
    assert normal_metrics(pred, target, valid)["mean"] == pytest.approx(20 / 3, abs=1e-4)


def test_segmentation_miou_skips_absent_classes_and_counts_false_positives():
    target = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 255]])
    pred = torch.tensor([[0, 0, 1, 3], [0, 1, 1, 2]])  # class 2 absent from both except the ignored pixel
    confusion = segmentation_confusion(pred, target, classes=4)
    assert confusion.tolist() == [[3, 1, 0, 0], [0, 2, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
    scores = segmentation_scores(confusion)
    iou = scores["per_class_iou"]
    assert iou[0] == pytest.approx(3 / 4)  # TP 3, GT 4, pred 3
    assert iou[1] == pytest.approx(2 / 4)  # TP 2, GT 3, pred 3
    assert math.isnan(iou[2])  # only predicted on an ignored pixel: union 0
    assert iou[3] == 0.0  # predicted, never true: counts as 0
    assert scores["miou"] == pytest.approx((0.75 + 0.5 + 0.0) / 3)
    assert scores["pixel_accuracy"] == pytest.approx(5 / 7)


def test_correspondence_recall_and_binned_recall():
    errors = torch.tensor([1.0, 4.9, 5.0, 9.0, 15.0, 30.0, 0.0, 100.0])
    recall = correspondence_recall(errors)
    assert recall == {"recall_5px": 3 / 8, "recall_10px": 5 / 8, "recall_20px": 6 / 8}
    rotation = torch.tensor([5.0, 5.0, 20.0, 20.0, 45.0, 45.0, 90.0, 180.0])
    binned = binned_recall(errors, rotation, threshold=10)
    assert binned == {"0-15": 1.0, "15-30": 1.0, "30-60": 0.0, "60-180": 0.5}
    single = binned_recall(errors[:2], 40.0)
    assert single["30-60"] == 1.0 and math.isnan(single["0-15"])
    assert math.isnan(correspondence_recall(torch.zeros(0))["recall_5px"])


def rotation_about(axis: torch.Tensor, degrees: float) -> torch.Tensor:
    axis = axis / axis.norm()
    angle = math.radians(degrees)
    cross = torch.tensor([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]], dtype=torch.float64)
    return torch.eye(3, dtype=torch.float64) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross


def test_relative_rotation_of_a_thirty_degree_turn():
    base = torch.eye(4, dtype=torch.float64)
    base[:3, :3] = rotation_about(torch.tensor([0.3, -1.0, 0.2], dtype=torch.float64), 70.0)
    base[:3, 3] = torch.tensor([1.0, 2.0, 3.0])
    turn = torch.eye(4, dtype=torch.float64)
    turn[:3, :3] = rotation_about(torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64), 30.0)
    turn[:3, 3] = torch.tensor([0.5, -0.2, 0.1])  # translation does not matter
    assert relative_rotation_degrees(base, turn @ base) == pytest.approx(30.0, abs=1e-6)
    assert relative_rotation_degrees(base, base) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("degrees", [1e-5, 0.01, 30.0, 90.0, 179.99, 180.0 - 1e-5, 180.0])
def test_rotation_angle_keeps_its_precision_near_zero_and_half_a_turn(degrees):
    # acos of (trace - 1) / 2 is off by about sqrt(machine epsilon) radians (~1e-6 degrees) near 0 and 180 degrees.
    rotation = rotation_about(torch.tensor([0.3, -1.0, 0.2], dtype=torch.float64), degrees)
    assert rotation_angle_degrees(rotation) == pytest.approx(degrees, rel=1e-9, abs=1e-11)
    assert rotation_angle_degrees(rotation.numpy()) == pytest.approx(degrees, rel=1e-9, abs=1e-11)


@pytest.mark.parametrize("degrees", [1e-6, 1e-3, 45.0, 180.0 - 1e-6])
def test_angle_between_normals_keeps_its_precision_near_zero_and_opposite(degrees):
    first = torch.tensor([[0.0, 0.0, 2.0]], dtype=torch.float64)  # lengths need not be 1
    radians = math.radians(degrees)
    second = torch.tensor([[0.5 * math.sin(radians), 0.0, 0.5 * math.cos(radians)]], dtype=torch.float64)
    assert float(angular_error_degrees(second, first)[0]) == pytest.approx(degrees, rel=1e-9, abs=1e-11)


def plane_views(height: int = 36, width: int = 48):
    """Two views of the plane z = 3 (world = camera 0): view 1 is rotated 12° and steps back to see all of view 0."""
    K = torch.tensor([[40.0, 0.0, width / 2], [0.0, 40.0, height / 2], [0.0, 0.0, 1.0]], dtype=torch.float64)
    world_to_camera0 = torch.eye(4, dtype=torch.float64)
    camera_to_world1 = torch.eye(4, dtype=torch.float64)
    camera_to_world1[:3, :3] = rotation_about(torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), 12.0)
    camera_to_world1[:3, 3] = torch.tensor([-0.6, 0.1, -2.0])
    camera0 = Camera(K, world_to_camera0, height, width)
    camera1 = Camera(K, invert_rigid(camera_to_world1), height, width)
    depth0 = torch.full((height, width), 3.0, dtype=torch.float64)
    # z-depth of the plane along each pixel ray of view 1
    rays1 = unproject_depth(torch.ones(height, width, dtype=torch.float64), camera1) - camera_to_world1[:3, 3]
    depth1 = (3.0 - camera_to_world1[2, 3]) / rays1[..., 2]
    points0 = unproject_depth(depth0, camera0).reshape(-1, 3)
    points1 = unproject_depth(depth1, camera1).reshape(-1, 3)
    return camera0, camera1, points0, points1


def fourier_features(points: torch.Tensor, frequencies: torch.Tensor) -> torch.Tensor:
    angles = points @ frequencies
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float()


def match_errors(camera1: Camera, points0, points1, features0, features1, top_k=300):
    index0, index1, weight = match_features(features0, features1, top_k=top_k, chunk_size=512)
    assert index0.shape == index1.shape == weight.shape == (top_k,)
    assert (weight[:-1] >= weight[1:]).all()
    in_camera1_0 = transform_points(camera1.world_to_camera, points0[index0])
    in_camera1_1 = transform_points(camera1.world_to_camera, points1[index1])
    return reprojection_errors(in_camera1_0, in_camera1_1, camera1.intrinsics)


def test_features_of_true_3d_positions_match_perfectly_and_random_ones_do_not():
    camera0, camera1, points0, points1 = plane_views()
    uv, depth = project_points(points0, camera1)
    assert (depth > 0).all() and (uv[:, 0] > 0).all() and (uv[:, 0] < 48).all()
    assert (uv[:, 1] > 0).all() and (uv[:, 1] < 36).all()  # every point of view 0 is seen by view 1
    assert relative_rotation_degrees(camera0.world_to_camera, camera1.world_to_camera) == pytest.approx(12.0)

    generator = torch.Generator().manual_seed(0)
    frequencies = 8.0 * torch.randn(3, 256, generator=generator, dtype=torch.float64)
    errors = match_errors(
        camera1, points0, points1, fourier_features(points0, frequencies), fourier_features(points1, frequencies)
    )
    assert correspondence_recall(errors)["recall_5px"] == 1.0

    random0 = torch.randn(points0.shape[0], 64, generator=generator)
    random1 = torch.randn(points1.shape[0], 64, generator=generator)
    random_recall = correspondence_recall(match_errors(camera1, points0, points1, random0, random1))
    chance = math.pi * 5**2 / (36 * 48)  # share of view 1 within 5 px of the true point
    assert random_recall["recall_5px"] < 3 * chance + 0.05


def test_match_features_chunking_and_ratio_weights():
    generator = torch.Generator().manual_seed(3)
    features0 = torch.randn(1000, 16, generator=generator)
    features1 = torch.randn(700, 16, generator=generator)
    whole = match_features(features0, features1, top_k=100, chunk_size=5000)
    chunked = match_features(features0, features1, top_k=100, chunk_size=33)
    for a, b in zip(whole, chunked):
        assert torch.allclose(a.float(), b.float())
    # an exact copy has d1 = 0, so weight 1 and it is ranked first
    features1[5] = 2.0 * features0[7]
    index0, index1, weight = match_features(features0, features1, top_k=10)
    assert index0[0] == 7 and index1[0] == 5 and weight[0] == pytest.approx(1.0)
    assert match_features(features0[:4], features1, top_k=1000)[0].shape == (4,)
    with pytest.raises(ValueError):
        match_features(features0, features1[:1])
