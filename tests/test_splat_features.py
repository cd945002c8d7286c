"""Mask-aware upsampling, lifting, blending and coverage against their definitions, value by value."""

from __future__ import annotations

import math

import pytest
import torch

from snd_stages.gaussians import Gaussians
from snd_stages.splat.features import (
    blend_with_segments,
    downsample_to_tokens,
    lift_features,
    mask_aware_upsample,
    segment_means,
    token_coverage,
)


def upsample_by_definition(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The formula of the method, one output pixel at a time (slow, obviously right)."""
    channels, low_h, low_w = features.shape
    height, width = mask.shape
    output = torch.zeros(channels, height, width, dtype=torch.float64)

    def node_label(p: int, q: int) -> int:
        row = round(p * (height - 1) / (low_h - 1))  # Python's round is half-to-even, like torch.round
        col = round(q * (width - 1) / (low_w - 1))
        return int(mask[row, col])

    for r in range(height):
        for c in range(width):
            x, y = c * (low_w - 1) / (width - 1), r * (low_h - 1) / (height - 1)
            x0, y0 = math.floor(x), math.floor(y)
            x1, y1 = min(x0 + 1, low_w - 1), min(y0 + 1, low_h - 1)
            dx, dy = x - x0, y - y0
            neighbours = [(y0, x0, (1 - dx) * (1 - dy)), (y0, x1, dx * (1 - dy)), (y1, x0, (1 - dx) * dy), (y1, x1, dx * dy)]
            total = sum(w for p, q, w in neighbours if node_label(p, q) == int(mask[r, c]))
            if total == 0:
                continue
            for p, q, w in neighbours:
                if node_label(p, q) == int(mask[r, c]):
                    output[:, r, c] += w / total * features[:, p, q].double()
    return output


def test_mask_aware_upsampling_matches_the_definition():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 5, 4, 6, generator=generator, dtype=torch.float64)
    masks = torch.randint(0, 3, (2, 15, 23), generator=generator)
    masks[1, 5:9, 7:12] = 7  # a small segment that may contain no low-res node
    result = mask_aware_upsample(features, masks)
    for index in range(2):
        torch.testing.assert_close(result[index], upsample_by_definition(features[index], masks[index]))


def test_single_segment_equals_plain_bilinear_align_corners():
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(1, 3, 5, 7, generator=generator, dtype=torch.float64)
    masks = torch.zeros(1, 20, 29, dtype=torch.long)
    expected = torch.nn.functional.interpolate(features, size=(20, 29), mode="bilinear", align_corners=True)
    torch.testing.assert_close(mask_aware_upsample(features, masks), expected)


def test_pixel_with_no_matching_neighbour_is_zero():
    features = torch.ones(1, 2, 3, 3, dtype=torch.float64)
    masks = torch.zeros(1, 9, 9, dtype=torch.long)
    masks[0, 3, 5] = 4  # an isolated one-pixel segment between nodes
    result = mask_aware_upsample(features, masks)
    assert result[0, :, 3, 5].abs().max() == 0
    torch.testing.assert_close(result[0, :, 0, 0], torch.ones(2, dtype=torch.float64))


def test_lifting_gives_each_gaussian_its_source_pixel_feature():
    features = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    source_view = torch.tensor([1, 0, 1])
    source_pixel = torch.tensor([0, 7, 19])  # (0, 0), (1, 2), (3, 4)
    gaussians = Gaussians(torch.zeros(3, 3), torch.tensor([[1.0, 0, 0, 0]] * 3), torch.ones(3, 3), torch.ones(3),
                          source_view, source_pixel)
    lifted = lift_features(features, gaussians)
    torch.testing.assert_close(lifted[0], features[1, :, 0, 0])
    torch.testing.assert_close(lifted[1], features[0, :, 1, 2])
    torch.testing.assert_close(lifted[2], features[1, :, 3, 4])


def test_blending_mixes_each_pixel_with_its_segment_mean():
    features = torch.tensor([[[[1.0, 3.0, 10.0], [0.0, 0.0, 20.0]]]])  # [1, 1, 2, 3]
    masks = torch.tensor([[[1, 1, 2], [1, 1, 2]]])
    means = segment_means(features, masks)
    torch.testing.assert_close(means, torch.tensor([[[[1.0, 1.0, 15.0], [1.0, 1.0, 15.0]]]]))  # zeros counted
    blended = blend_with_segments(features, masks, coefficient=0.5)
    torch.testing.assert_close(blended, 0.5 * features + 0.5 * means)
    assert blend_with_segments(features, masks, coefficient=1.0) is features


def test_blending_resizes_masks_with_nearest():
    features = torch.randn(1, 4, 6, 8)
    masks = torch.zeros(1, 12, 16, dtype=torch.long)
    masks[:, :, 8:] = 1
    small = masks[:, ::2, ::2]
    torch.testing.assert_close(blend_with_segments(features, masks), blend_with_segments(features, small))


def test_downsampling_is_plain_bilinear_and_coverage_is_nearest():
    features = torch.randn(2, 3, 28, 42)
    torch.testing.assert_close(
        downsample_to_tokens(features, (2, 3)),
        torch.nn.functional.interpolate(features, size=(2, 3), mode="bilinear", align_corners=False),
    )
    alpha = torch.zeros(1, 28, 42)
    alpha[0, :14, :] = 0.3  # top half covered
    coverage = token_coverage(alpha, (2, 3))
    assert coverage.tolist() == [[[True, True, True], [False, False, False]]]


@pytest.mark.parametrize("coefficient", [0.0, 0.5, 0.8])
def test_the_feature_path_is_linear(coefficient):
    # Linearity is what allows precomputing the whole map as one sparse operator.
    generator = torch.Generator().manual_seed(3)
    masks = torch.randint(0, 4, (1, 14, 21), generator=generator)
    a, b = torch.randn(2, 1, 6, 3, 4, generator=generator, dtype=torch.float64)

    def path(x):
        return downsample_to_tokens(blend_with_segments(mask_aware_upsample(x, masks), masks, coefficient), (3, 4))

    torch.testing.assert_close(path(2 * a - 3 * b), 2 * path(a) - 3 * path(b))
