"""Probe heads and losses: closed-form loss values, output shapes, and probes that learn features encoding the truth."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from snd_stages.probes.heads import (
    DenseDepthProbe,
    DenseProbe,
    DepthBinHead,
    NormalHead,
    SegmentationHead,
    bin_centres,
    bins_to_depth,
    depth_loss,
    gradient_loss,
    segmentation_loss,
    sig_loss,
    uncertainty_angular_loss,
)
from snd_stages.probes.metrics import depth_metrics, normal_metrics, segmentation_confusion, segmentation_scores


def test_bins_are_uniform_with_both_ends_and_the_probability_floor_applies():
    centres = bin_centres(256, 1e-3, 10.0)
    assert centres[0] == pytest.approx(1e-3) and centres[-1] == pytest.approx(10.0)
    assert torch.allclose(centres.diff(), torch.full((255,), (10.0 - 1e-3) / 255), atol=1e-5)
    logits = torch.full((1, 4, 1, 1), -5.0)
    logits[0, 2] = 0.6  # weights 0.1, 0.1, 0.7, 0.1
    depth = bins_to_depth(logits, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert depth.shape == (1, 1, 1, 1)
    assert depth.item() == pytest.approx(0.1 * 1 + 0.1 * 2 + 0.7 * 3 + 0.1 * 4)


def test_sig_loss_is_zero_when_perfect_and_scale_aware():
    target = torch.rand(2, 1, 6, 7) * 5 + 0.5
    valid = torch.rand(2, 1, 6, 7) > 0.2
    assert sig_loss(target.clone(), target, valid).item() == pytest.approx(0.0, abs=1e-6)
    # a constant factor s leaves Var(g) = 0: the loss is sqrt(0.15) |ln s|
    expected = math.sqrt(0.15) * math.log(2)
    assert sig_loss(2.0 * target, target, valid, eps=0.0).item() == pytest.approx(expected, rel=1e-5)
    # non-constant error: full form uses the unbiased variance, warm-up only the mean term
    pred = target * torch.exp(0.3 * torch.randn(target.shape, generator=torch.Generator().manual_seed(0)))
    g = torch.log(pred[valid]) - torch.log(target[valid])
    full = math.sqrt(g.var().item() + 0.15 * g.mean().item() ** 2)
    assert sig_loss(pred, target, valid, eps=0.0).item() == pytest.approx(full, rel=1e-5)
    assert sig_loss(pred, target, valid, warmup=True, eps=0.0).item() == pytest.approx(
        math.sqrt(0.15) * abs(g.mean().item()), rel=1e-5
    )
    # invalid pixels are ignored entirely
    corrupted = pred.clone()
    corrupted[~valid] = 1e3
    assert sig_loss(corrupted, target, valid).item() == pytest.approx(sig_loss(pred, target, valid).item())


def test_gradient_loss_hand_computed():
    target = torch.ones(3, 3)
    pred = torch.ones(3, 3)
    pred[0, 0] = math.e  # log difference 1 at the corner only
    valid = torch.ones(3, 3, dtype=torch.bool)
    # stride 1: pairs two apart touching (0, 0): (0,0)-(2,0) and (0,0)-(0,2), each 1, over 9 pixels;
    # stride 2 leaves 2x2 and strides 4, 6 leave 1x1: no pairs two apart
    assert gradient_loss(pred, target, valid, eps=0.0).item() == pytest.approx(2 / 9)
    assert gradient_loss(3.0 * target, target, valid, eps=0.0).item() == pytest.approx(0.0, abs=1e-6)
    valid[2, 0] = False  # drops the vertical pair and a pixel from the count
    assert gradient_loss(pred, target, valid, eps=0.0).item() == pytest.approx(1 / 8)
    broken = pred.clone()
    broken[2, 0] = 0.0  # an invalid pixel's prediction does not matter, even where its log is -inf
    broken.requires_grad_(True)
    loss = gradient_loss(broken, target, valid, eps=0.0)
    loss.backward()
    assert loss.item() == pytest.approx(1 / 8) and torch.isfinite(broken.grad).all()
    batch = torch.stack([pred, pred])[:, None]  # leading dimensions are pooled
    all_valid = torch.ones_like(batch, dtype=torch.bool)
    assert gradient_loss(batch, torch.ones_like(batch), all_valid, eps=0.0).item() == pytest.approx(2 / 9)


def test_uncertainty_angular_loss_grows_with_angle_and_has_finite_gradients_at_zero():
    target = torch.tensor([0.0, 0.0, 1.0]).view(1, 3, 1, 1)
    kappa = torch.full((1, 1, 1, 1), 3.0)
    valid = torch.ones(1, 1, 1, dtype=torch.bool)
    losses = []
    for degrees in (0.0, 10.0, 45.0, 90.0, 170.0):
        angle = math.radians(degrees)
        pred = torch.tensor([math.sin(angle), 0.0, math.cos(angle)]).view(1, 3, 1, 1)
        losses.append(uncertainty_angular_loss(pred, kappa, target, valid).item())
    assert all(a < b for a, b in zip(losses, losses[1:]))
    regulariser = math.log1p(math.exp(-3 * math.pi)) - math.log1p(9.0)
    assert losses[3] == pytest.approx(regulariser + 3.0 * math.pi / 2, rel=1e-4)

    pred = target.clone().requires_grad_(True)
    kappa_logit = torch.zeros(1, 1, 1, 1, requires_grad=True)
    loss = uncertainty_angular_loss(pred, F.elu(kappa_logit) + 1.01, target, valid)
    loss.backward()
    assert torch.isfinite(pred.grad).all() and torch.isfinite(kappa_logit.grad).all()


def test_head_output_shapes():
    features = torch.randn(2, 12, 5, 6)
    assert DepthBinHead(12, bins=16).forward(features).shape == (2, 1, 20, 24)
    normals, kappa = NormalHead(12)(features)
    assert normals.shape == (2, 3, 20, 24) and kappa.shape == (2, 1, 20, 24)
    assert torch.allclose(normals.norm(dim=1), torch.ones(2, 20, 24), atol=1e-5) and (kappa > 0.01).all()
    assert NormalHead(12)(features, size=(30, 33))[0].shape == (2, 3, 30, 33)
    assert SegmentationHead(12, 7)(features).shape == (2, 7, 5, 6)
    assert SegmentationHead(12, 7)(features, size=(70, 84)).shape == (2, 7, 70, 84)
    blocks = [torch.randn(2, 8, 3, 4) for _ in range(4)]
    assert DenseProbe([8] * 4, 4, hidden=16)(blocks).shape == (2, 4, 48, 64)
    depth = DenseDepthProbe([8] * 4, bins=32, max_depth=5.0, hidden=16)(blocks)
    assert depth.shape == (2, 1, 48, 64) and (depth > 0).all() and (depth < 5.0).all()


def train(parameters, loss_fn, steps: int, lr: float) -> None:
    optimiser = torch.optim.Adam(parameters, lr=lr)
    for _ in range(steps):
        optimiser.zero_grad()
        loss = loss_fn()
        loss.backward()
        optimiser.step()


def token_grid(size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    coords = (torch.arange(size) + 0.5) / size
    return torch.meshgrid(coords, coords, indexing="ij")


def test_depth_bin_head_learns_depth_from_features_holding_its_bin():
    torch.manual_seed(0)
    bins, max_depth = 32, 6.0
    rows, cols = token_grid(6)
    token_depth = 1.0 + 2.0 * rows + 1.5 * cols  # smooth ramp in [1, 4.5]
    centres = bin_centres(bins, 1e-3, max_depth)
    bin_index = (token_depth[..., None] - centres).abs().argmin(-1)
    features = 10.0 * F.one_hot(bin_index, bins).permute(2, 0, 1)[None].float()  # [1, bins, 6, 6]
    target = F.interpolate(centres[bin_index][None, None], scale_factor=4, mode="bilinear", align_corners=False)
    valid = torch.ones_like(target, dtype=torch.bool)
    head = DepthBinHead(bins, bins=bins, max_depth=max_depth)
    train(head.parameters(), lambda: depth_loss(head(features), target, valid), steps=60, lr=0.1)
    with torch.no_grad():
        scores = depth_metrics(head(features)[0, 0], target[0, 0], valid[0, 0])
    assert scores["abs_rel"] < 0.05 and scores["delta1"] > 0.99


def test_dense_depth_probe_learns_depth_from_features_holding_it():
    torch.manual_seed(0)
    rows, cols = token_grid(2)
    token_depth = (1.0 + 2.0 * rows + 1.5 * cols)[None, None]
    blocks = [torch.cat([token_depth, torch.randn(1, 3, 2, 2)], 1) for _ in range(4)]
    target = F.interpolate(token_depth, scale_factor=16, mode="bilinear", align_corners=False)
    valid = torch.ones_like(target, dtype=torch.bool)
    probe = DenseDepthProbe([4] * 4, bins=32, max_depth=6.0, hidden=8)
    train(probe.parameters(), lambda: depth_loss(probe(blocks), target, valid), steps=60, lr=3e-3)
    with torch.no_grad():
        scores = depth_metrics(probe(blocks)[0, 0], target[0, 0], valid[0, 0])
    assert scores["abs_rel"] < 0.05  # the best constant scores about 0.16


def test_normal_head_learns_normals_held_in_features():
    torch.manual_seed(0)
    rows, cols = token_grid(8)
    token_normals = F.normalize(torch.stack([cols - 0.5, rows - 0.5, torch.ones_like(rows)]), dim=0)[None]
    features = torch.cat([token_normals, 0.1 * torch.randn(1, 5, 8, 8)], dim=1)
    target = F.normalize(F.interpolate(token_normals, scale_factor=4, mode="bilinear", align_corners=False), dim=1)
    valid = torch.ones(1, 32, 32, dtype=torch.bool)
    head = NormalHead(8)
    train(head.parameters(), lambda: uncertainty_angular_loss(*head(features), target, valid), steps=100, lr=0.05)
    with torch.no_grad():
        normals, kappa = head(features)
    scores = normal_metrics(normals[0].permute(1, 2, 0), target[0].permute(1, 2, 0), valid[0])
    assert scores["mean"] < 5.0 and scores["within_11_25"] > 95.0
    assert kappa.mean() > 2.0  # confident once it is right


def test_segmentation_head_learns_labels_held_in_features():
    torch.manual_seed(0)
    classes = 5
    token_labels = (torch.arange(8) // 2).repeat(8, 1)  # vertical stripes two tokens wide, classes 0..3
    token_labels[:4, 6:] = 4
    features = torch.cat([F.one_hot(token_labels, classes).permute(2, 0, 1).float(), torch.randn(3, 8, 8)])[None]
    labels = token_labels.repeat_interleave(4, 0).repeat_interleave(4, 1)[None]
    labels[0, :3, :3] = 255  # ignored
    head = SegmentationHead(classes + 3, classes)
    train(head.parameters(), lambda: segmentation_loss(head(features, size=(32, 32)), labels), steps=200, lr=0.05)
    with torch.no_grad():
        prediction = head(features, size=(32, 32)).argmax(1)
    scores = segmentation_scores(segmentation_confusion(prediction[0], labels[0], classes))
    assert scores["miou"] > 0.95
