"""The reference implementation's rendering quirks, reproduced on demand."""

from __future__ import annotations

import torch

from snd_stages.gaussians import Gaussians
from snd_stages.geometry import Camera, quaternion_to_rotation_matrix, rotation_matrix_to_quaternion
from snd_stages.splat.quirks import centred_principal_point, variances_as_scales


def test_centred_principal_point():
    camera = Camera(torch.tensor([[[50.0, 0, 31.0], [0, 50.0, 20.5], [0, 0, 1]]]), torch.eye(4)[None], 40, 64)
    centred = centred_principal_point(camera)
    assert centred.intrinsics[0, 0, 2] == 32 and centred.intrinsics[0, 1, 2] == 20
    assert centred.intrinsics[0, 0, 0] == 50 and camera.intrinsics[0, 0, 2] == 31.0  # input untouched


def test_variances_become_scales_and_reflections_fall_back_to_identity():
    generator = torch.Generator().manual_seed(0)
    rotation = quaternion_to_rotation_matrix(torch.randn(64, 4, generator=generator, dtype=torch.float64))
    scales = torch.rand(64, 3, generator=generator, dtype=torch.float64) * 0.1 + 0.01
    gaussians = Gaussians(torch.zeros(64, 3), rotation_matrix_to_quaternion(rotation), scales, torch.ones(64),
                          torch.zeros(64, dtype=torch.long), torch.arange(64))
    quirky = variances_as_scales(gaussians)
    # The scales are the variances (sigma^2), sorted ascending as eigh returns them.
    torch.testing.assert_close(quirky.scales, scales.square().sort(dim=-1).values)
    # Where eigh's eigenvectors form a proper rotation, the quirky Gaussian keeps the true axes; elsewhere identity.
    vectors = torch.linalg.eigh(gaussians.covariances())[1]
    proper = torch.linalg.det(vectors) > 0
    assert 0 < int(proper.sum()) < 64  # both cases occur
    axes = quaternion_to_rotation_matrix(quirky.quats)
    torch.testing.assert_close(axes[proper], vectors[proper], atol=1e-9, rtol=0)
    torch.testing.assert_close(axes[~proper], torch.eye(3, dtype=torch.float64).expand(int((~proper).sum()), 3, 3))
