"""The ``depth`` reconstructor: pixel-aligned Gaussians from the context views' metric depth.

Each valid pixel of each context view becomes one Gaussian:
- mean: the pixel centre unprojected at its depth (world frame);
- covariance from the pixel's footprint on the surface. ``isotropic``: a sphere whose standard deviation is
  ``footprint_scale`` pixels at that depth (``footprint_scale * depth / focal``). ``disk``: a flat disk in the
  surface's tangent plane (normal from the dataset, or estimated from depth) shaped so that it projects to a
  round footprint of ``footprint_scale`` pixels in its own view however slanted the surface is (stretch
  capped at grazing angles), so surfaces are covered without holes; its thickness along the normal is
  ``disk_thickness`` times its shorter tangent axis;
- opacity: the configured constant.
Invalid (0) depth is either dropped or kept as a fully transparent Gaussian (``invalid_depth: mask``), which
keeps the count fixed at 2 x H x W.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from ..config import require
from ..gaussians import Gaussians
from ..geometry import Camera, pixel_centers, rotation_matrix_to_quaternion, unproject_depth

# Largest stretch of a slanted footprint: at grazing angles the exact factor explodes.
MAX_SLANT_STRETCH = 4.0


@dataclass(frozen=True)
class DepthSettings:
    """``gaussians.depth``: the Gaussians' shape and size, opacity, invalid pixels and normals."""

    # covariance shape, and its size: standard deviation in pixels of the source view
    covariance: Literal["disk", "isotropic"] = "disk"
    footprint_scale: float = 0.7
    disk_thickness: float = 0.1  # a disk's thickness along the normal, relative to its shorter tangent axis
    opacity: float = 1.0
    invalid_depth: Literal["drop", "mask"] = "drop"  # mask: keep a transparent Gaussian (a fixed count)
    normals: Literal["dataset", "estimate"] = "dataset"  # dataset: the scene's normals/ where it has them

    def __post_init__(self) -> None:
        require(0.05 <= self.footprint_scale <= 10.0, "footprint_scale", self.footprint_scale, "a number in [0.05, 10]")
        require(0.0 < self.disk_thickness <= 1.0, "disk_thickness", self.disk_thickness, "a number in (0, 1]")
        require(0.0 < self.opacity <= 1.0, "opacity", self.opacity, "a number in (0, 1]")


def camera_space_rays(camera: Camera, dtype=torch.float64) -> Float[Tensor, "*batch H W 3"]:
    """Unit viewing rays through every pixel centre, in each camera's own (OpenCV) frame."""
    uv = pixel_centers(camera.height, camera.width, dtype=dtype, device=camera.intrinsics.device)
    homogeneous = torch.cat([uv, torch.ones_like(uv[..., :1])], dim=-1)
    rays = torch.einsum("...ij,hwj->...hwi", torch.linalg.inv(camera.intrinsics.to(dtype)), homogeneous)
    return torch.nn.functional.normalize(rays, dim=-1)


def normals_from_depth(depth: Float[Tensor, "*batch H W"], camera: Camera) -> Float[Tensor, "*batch H W 3"]:
    """Camera-frame unit normals from central differences of the unprojected depth, facing the camera.

    Pixels whose neighbours are invalid fall back to one-sided differences; (0, 0, 0) where nothing is valid.
    """
    points = unproject_depth(depth, _at_origin(camera))  # camera frame
    valid = depth > 0

    def difference(axis: int) -> Tensor:
        forward = torch.roll(points, -1, dims=axis - 1) - points
        backward = points - torch.roll(points, 1, dims=axis - 1)
        forward_ok = valid & torch.roll(valid, -1, dims=axis)
        backward_ok = valid & torch.roll(valid, 1, dims=axis)
        # Rolling wraps around the border: those neighbours are not neighbours.
        size = depth.shape[axis]
        index = torch.arange(size, device=depth.device)
        shape = [1] * depth.dim()
        shape[axis] = size
        forward_ok = forward_ok & (index < size - 1).reshape(shape)
        backward_ok = backward_ok & (index > 0).reshape(shape)
        # Prefer the side with the smaller depth jump: it does not cross an occlusion edge.
        use_forward = forward_ok & (~backward_ok | (forward.norm(dim=-1) <= backward.norm(dim=-1)))
        chosen = torch.where(use_forward[..., None], forward, backward)
        return torch.where((forward_ok | backward_ok)[..., None], chosen, torch.zeros_like(chosen))

    normals = torch.nn.functional.normalize(torch.cross(difference(-1), difference(-2), dim=-1), dim=-1)
    rays = camera_space_rays(camera, dtype=points.dtype)
    facing = torch.where((normals * rays).sum(-1, keepdim=True) > 0, -normals, normals)
    return torch.where(valid[..., None], facing, torch.zeros_like(facing))


def reconstruct_from_depth(
    depth: Float[Tensor, "V H W"],
    camera: Camera,
    options: DepthSettings,
    normals: Float[Tensor, "V H W 3"] | None = None,
) -> Gaussians:
    """Pixel-aligned Gaussians of ``V`` context views.

    Args:
        depth: ``[V, H, W]`` metric z-depth, 0 = invalid.
        camera: ``[V]`` cameras of the views (world-to-camera, K in pixels of H x W).
        normals: ``[V, H, W, 3]`` camera-frame unit normals (e.g. the dataset's); estimated from depth if None
            or where they are (0, 0, 0).

    Returns:
        Gaussians ordered by (view, row, column), float32, with their source view and pixel.
    """
    views, height, width = depth.shape
    depth = depth.to(torch.float64)
    camera = camera.to(dtype=torch.float64)
    valid = depth > 0
    if not valid.any():
        raise ValueError("no valid depth in any context view")
    means = unproject_depth(depth, camera)  # [V, H, W, 3]
    focal = 0.5 * (camera.intrinsics[:, 0, 0] + camera.intrinsics[:, 1, 1])  # [V]

    camera_to_world_rotation = camera.camera_to_world[:, None, None, :3, :3]
    if options.covariance == "isotropic":
        radius = options.footprint_scale * depth / focal[:, None, None]  # metres spanned by the footprint
        scales = radius[..., None].expand(views, height, width, 3)
        rotation_world = torch.eye(3, dtype=torch.float64, device=depth.device).expand(views, height, width, 3, 3)  # no orientation
    else:
        estimated = normals_from_depth(depth, camera)
        if normals is None:
            surface = estimated
        else:
            given = normals.to(torch.float64)
            surface = torch.where((given.abs().sum(-1, keepdim=True) > 0), given, estimated)
        points = unproject_depth(depth, _at_origin(camera))  # camera frame
        rotation_camera, scales = _footprint_disks(points, surface, camera, options)
        rotation_world = camera_to_world_rotation @ rotation_camera
    # A proper rotation is needed for a quaternion; the right-handed frames above already have det +1.
    quats = rotation_matrix_to_quaternion(rotation_world)
    opacities = torch.full_like(depth, options.opacity)
    source_view = torch.arange(views, device=depth.device).reshape(views, 1, 1).expand(views, height, width)
    source_pixel = torch.arange(height * width, device=depth.device).reshape(1, height, width).expand(views, height, width)

    if options.invalid_depth == "mask":
        # Kept so the count stays 2 x H x W, but transparent and tiny, so no renderer ever shows them.
        opacities = torch.where(valid, opacities, torch.zeros_like(opacities))
        scales = torch.where(valid[..., None], scales, torch.full_like(scales, 1e-6))
        keep = torch.ones_like(valid)
    else:
        keep = valid
    return Gaussians(
        means=means[keep].float(),
        quats=quats[keep].float(),
        scales=scales[keep].float(),
        opacities=opacities[keep].float(),
        source_view=source_view[keep].to(torch.int64),
        source_pixel=source_pixel[keep].to(torch.int64),
    )


def _any_tangent(normals: Float[Tensor, "... 3"]) -> Float[Tensor, "... 3"]:
    """A unit vector perpendicular to each normal (crossing with whichever axis is least parallel)."""
    x_axis = torch.zeros_like(normals)
    x_axis[..., 0] = 1
    y_axis = torch.zeros_like(normals)
    y_axis[..., 1] = 1
    helper = torch.where(normals[..., :1].abs() < 0.9, x_axis, y_axis)
    return torch.nn.functional.normalize(torch.cross(normals, helper, dim=-1), dim=-1)


def _at_origin(camera: Camera) -> Camera:
    """The same intrinsics with identity poses: unprojection then yields camera-frame points."""
    identity = torch.eye(4, dtype=camera.world_to_camera.dtype, device=camera.world_to_camera.device)
    return Camera(camera.intrinsics, identity.expand_as(camera.world_to_camera), camera.height, camera.width)


def _footprint_disks(
    points: Float[Tensor, "V H W 3"], normals: Float[Tensor, "V H W 3"], camera: Camera, options: DepthSettings
) -> tuple[Float[Tensor, "V H W 3 3"], Float[Tensor, "V H W 3"]]:
    """Camera-frame axes (columns) and standard deviations of tangent-plane disks with a round image footprint.

    With M the 2x2 local map from tangent-plane coordinates to image pixels (the perspective Jacobian at the
    point applied to a tangent basis), the tangent covariance s^2 (M^T M)^-1 projects to exactly s^2 I: a round
    footprint of ``footprint_scale`` pixels, however the surface is slanted. Its axes are capped at
    ``MAX_SLANT_STRETCH`` times the fronto-parallel size, where grazing angles would make it explode.
    """
    tangent_1 = _any_tangent(normals)
    tangent_2 = torch.cross(normals, tangent_1, dim=-1)
    x, y, z = points.unbind(-1)
    z = z.clamp(min=1e-9)  # invalid pixels (depth 0) are dropped or masked by the caller
    fx = camera.intrinsics[:, 0, 0, None, None]
    fy = camera.intrinsics[:, 1, 1, None, None]
    jacobian = points.new_zeros(*points.shape[:-1], 2, 3)
    jacobian[..., 0, 0], jacobian[..., 0, 2] = fx / z, -fx * x / z**2
    jacobian[..., 1, 1], jacobian[..., 1, 2] = fy / z, -fy * y / z**2
    basis = torch.stack([tangent_1, tangent_2], dim=-1)  # [..., 3, 2]
    image_map = jacobian @ basis  # [..., 2, 2]
    gram = image_map.transpose(-1, -2) @ image_map  # [..., 2, 2], symmetric positive semi-definite
    small, large, small_direction = _symmetric_2x2_eigen(gram)
    # The tangent covariance s^2 gram^-1 has the same axes; its long axis is gram's small-eigenvalue direction.
    fronto_parallel = options.footprint_scale * z / (0.5 * (fx + fy))
    cap = MAX_SLANT_STRETCH * fronto_parallel
    long_std = (options.footprint_scale / small.clamp(min=1e-24).sqrt()).minimum(cap)
    short_std = (options.footprint_scale / large.clamp(min=1e-24).sqrt()).minimum(cap)
    axis_1 = torch.nn.functional.normalize((basis @ small_direction[..., None])[..., 0], dim=-1)
    axis_2 = torch.cross(normals, axis_1, dim=-1)  # right-handed: [axis_1, axis_2, normal] has det +1
    scales = torch.stack([long_std, short_std, short_std * options.disk_thickness], dim=-1)
    return torch.stack([axis_1, axis_2, normals], dim=-1), scales


def _symmetric_2x2_eigen(matrix: Float[Tensor, "... 2 2"]) -> tuple[Tensor, Tensor, Tensor]:
    """Closed-form eigen-decomposition of symmetric 2x2 matrices: (smaller value, larger value, unit eigenvector
    of the smaller). Exact, and unlike batched ``eigh`` it needs no solver workspace on the GPU."""
    a, b, c = matrix[..., 0, 0], matrix[..., 0, 1], matrix[..., 1, 1]
    mean = 0.5 * (a + c)
    radius = torch.sqrt((0.5 * (a - c)) ** 2 + b**2)
    angle = 0.5 * torch.atan2(2 * b, a - c)  # direction of the larger eigenvalue
    small_direction = torch.stack([-torch.sin(angle), torch.cos(angle)], dim=-1)
    return mean - radius, mean + radius, small_direction
