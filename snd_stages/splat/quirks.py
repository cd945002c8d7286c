"""The reference implementation's rendering quirks, reproducible on demand (``train.reference_quirks``).

The reference feature render (a) builds its projection from the field of view only, i.e. assumes the principal
point at the image centre although the Gaussians were unprojected with the full K, and (b) recovers each
Gaussian's scales and rotation from ``eigh`` of its covariance but passes the eigen*values* (variances) as
scales, and falls back to the identity rotation when the eigenvector matrix has determinant -1.
"""

from __future__ import annotations

import torch

from ..gaussians import Gaussians
from ..geometry import Camera, rotation_matrix_to_quaternion


def centred_principal_point(camera: Camera) -> Camera:
    """The same cameras with the principal point moved to the image centre."""
    intrinsics = camera.intrinsics.clone()
    intrinsics[..., 0, 2] = camera.width / 2
    intrinsics[..., 1, 2] = camera.height / 2
    return Camera(intrinsics, camera.world_to_camera, camera.height, camera.width)


def variances_as_scales(gaussians: Gaussians) -> Gaussians:
    """Gaussians whose scales are the covariance's eigenvalues and whose rotation is its eigenvectors (or the
    identity where those form a reflection), as the reference render receives them."""
    # On the CPU: batched eigh of a million 3x3 matrices can fail inside cuSOLVER, and this path is rarely hot.
    variances, vectors = torch.linalg.eigh(gaussians.covariances().double().cpu())
    variances, vectors = variances.to(gaussians.means.device), vectors.to(gaussians.means.device)
    proper = torch.linalg.det(vectors) > 0
    identity = torch.eye(3, dtype=vectors.dtype, device=vectors.device).expand_as(vectors)
    rotation = torch.where(proper[:, None, None], vectors, identity)
    return Gaussians(
        means=gaussians.means,
        quats=rotation_matrix_to_quaternion(rotation).to(gaussians.quats.dtype),
        scales=variances.clamp(min=0).to(gaussians.scales.dtype),
        opacities=gaussians.opacities,
        source_view=gaussians.source_view,
        source_pixel=gaussians.source_pixel,
    )


def render_inputs(gaussians: Gaussians, camera: Camera, reference_quirks: bool) -> tuple[Gaussians, Camera]:
    """The Gaussians and target camera the feature render receives (float32 camera; quirks on demand)."""
    camera = camera.to(device=gaussians.means.device, dtype=torch.float32)
    if reference_quirks:
        return variances_as_scales(gaussians), centred_principal_point(camera)
    return gaussians, camera
