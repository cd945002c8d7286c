"""The probes' matrix resize against F.interpolate: same values and same gradients, up and down, both modes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from snd_stages.probes.resize import interpolation_matrix, resize, upsample


@pytest.mark.parametrize("mode, align_corners", [("bilinear", False), ("bilinear", True), ("bicubic", True),
                                                 ("bicubic", False)])
@pytest.mark.parametrize("size", [(28, 36), (5, 4), (33, 50)])
def test_resize_matches_interpolate_in_value_and_gradient(mode, align_corners, size):
    torch.manual_seed(0)
    maps = torch.randn(2, 3, 7, 9, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 3, *size, dtype=torch.float64)
    ours = resize(maps, size, mode, align_corners)
    theirs = F.interpolate(maps, size=size, mode=mode, align_corners=align_corners)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    (ours_grad,) = torch.autograd.grad((ours * weights).sum(), maps)
    (theirs_grad,) = torch.autograd.grad((theirs * weights).sum(), maps)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-12, atol=1e-12)


def test_upsample_is_interpolate_by_a_scale_factor_and_rows_sum_to_one():
    maps = torch.randn(1, 2, 6, 5, dtype=torch.float64)
    torch.testing.assert_close(upsample(maps, 4), F.interpolate(maps, scale_factor=4, mode="bilinear",
                                                                align_corners=False), rtol=1e-12, atol=1e-12)
    assert upsample(maps, 1) is maps
    matrix = interpolation_matrix(6, 24, dtype=torch.float64)
    torch.testing.assert_close(matrix.sum(1), torch.ones(24, dtype=torch.float64))


def test_resize_refuses_other_modes():
    with pytest.raises(ValueError, match="nearest"):
        resize(torch.zeros(1, 1, 2, 2), (4, 4), mode="nearest")
