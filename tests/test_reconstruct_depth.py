"""The depth reconstructor: positions, footprint-sized covariances, normals, invalid depth handling."""

from __future__ import annotations

import math

import pytest
import torch

from snd_stages.geometry import Camera, invert_rigid, project_points, quaternion_to_rotation_matrix, unproject_depth
from snd_stages.reconstruct.depth import DepthSettings, normals_from_depth, reconstruct_from_depth

HEIGHT, WIDTH = 24, 32


def tilted_plane_views(tilt_degrees: float = 50.0):
    """Two cameras looking at the plane z = 0 from above, tilted about x; depth computed by ray casting."""
    cameras = []
    for shift in (0.0, 0.3):
        tilt = math.radians(tilt_degrees)
        # camera axes in world: x right, y down (in the image), z forward (looking down and forward).
        forward = torch.tensor([0.0, math.sin(tilt), -math.cos(tilt)], dtype=torch.float64)
        right = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
        down = torch.cross(forward, right, dim=0)
        camera_to_world = torch.eye(4, dtype=torch.float64)
        camera_to_world[:3, :3] = torch.stack([right, down, forward], dim=1)
        camera_to_world[:3, 3] = torch.tensor([shift, 0.0, 2.0])
        cameras.append(invert_rigid(camera_to_world))
    K = torch.tensor([[30.0, 0, 15.3], [0, 30.0, 12.9], [0, 0, 1]], dtype=torch.float64).repeat(2, 1, 1)
    camera = Camera(K, torch.stack(cameras), HEIGHT, WIDTH)
    unit = unproject_depth(torch.ones(2, HEIGHT, WIDTH, dtype=torch.float64), camera) - camera.center[:, None, None]
    # Ray o + t d meets z = 0 at t = -o_z / d_z; for unit-z-depth rays t is the z-depth.
    depth = -camera.center[:, 2, None, None] / unit[..., 2]
    return depth, camera


def test_means_lie_on_the_surface_and_remember_their_pixel():
    depth, camera = tilted_plane_views()
    gaussians = reconstruct_from_depth(depth, camera, DepthSettings())
    assert len(gaussians) == 2 * HEIGHT * WIDTH
    assert gaussians.means[:, 2].abs().max() < 1e-5  # all on z = 0
    # Gaussian k of view v is pixel (row, col) = divmod(source_pixel, W); it projects back onto that pixel centre.
    uv, _ = project_points(gaussians.means.double().reshape(2, -1, 3), camera)
    rows, cols = torch.div(gaussians.source_pixel, WIDTH, rounding_mode="floor"), gaussians.source_pixel % WIDTH
    expected = torch.stack([cols + 0.5, rows + 0.5], dim=-1).double().reshape(2, -1, 2)
    torch.testing.assert_close(uv, expected, atol=1e-3, rtol=0)
    assert gaussians.source_view.tolist() == [0] * (HEIGHT * WIDTH) + [1] * (HEIGHT * WIDTH)


def projected_covariance(gaussians, camera: Camera, view: int) -> torch.Tensor:
    """2D image-space covariance (pixels^2) of each Gaussian of ``view`` seen by its own camera (EWA)."""
    select = gaussians.source_view == view
    covariance = gaussians.covariances()[select].double()
    means = gaussians.means[select].double()
    rotation = camera.world_to_camera[view, :3, :3]
    points = means @ rotation.T + camera.world_to_camera[view, :3, 3]
    fx, fy = camera.intrinsics[view, 0, 0], camera.intrinsics[view, 1, 1]
    x, y, z = points.unbind(-1)
    jacobian = torch.zeros(len(points), 2, 3, dtype=torch.float64)
    jacobian[:, 0, 0], jacobian[:, 0, 2] = fx / z, -fx * x / z**2
    jacobian[:, 1, 1], jacobian[:, 1, 2] = fy / z, -fy * y / z**2
    camera_covariance = rotation @ covariance @ rotation.T
    return jacobian @ camera_covariance @ jacobian.transpose(-1, -2)


@pytest.mark.parametrize("covariance", ["disk", "isotropic"])
def test_footprint_is_the_configured_size_in_the_source_view(covariance):
    depth, camera = tilted_plane_views(tilt_degrees=50.0)
    options = DepthSettings(covariance=covariance, footprint_scale=0.7)
    gaussians = reconstruct_from_depth(depth, camera, options)
    eigenvalues = torch.linalg.eigvalsh(projected_covariance(gaussians, camera, view=0))
    std = eigenvalues.clamp(min=0).sqrt()
    if covariance == "disk":
        # The slant stretch exactly undoes the foreshortening: a round 0.7 px footprint in the source image.
        torch.testing.assert_close(std, torch.full_like(std, 0.7), atol=0.03, rtol=0)
    else:
        # A sphere of 0.7 px at its depth projects to 0.7 px on the axis, stretched by the perspective off it.
        assert std.min() > 0.69 and std.max() < 0.9


def test_disk_normal_axis_matches_the_surface_and_is_thin():
    depth, camera = tilted_plane_views()
    gaussians = reconstruct_from_depth(depth, camera, DepthSettings(covariance="disk", disk_thickness=0.1))
    axes = quaternion_to_rotation_matrix(gaussians.quats.double())
    normal_axis = axes[..., 2]  # the local z axis carries the thin scale
    assert (normal_axis[:, 2].abs() > 0.9999).all()  # plane z = 0 has normal +-z
    torch.testing.assert_close(gaussians.scales[:, 2], gaussians.scales[:, 1] * 0.1, rtol=1e-5, atol=0)
    assert (gaussians.scales[:, 0] >= gaussians.scales[:, 1]).all()  # axis 0 is the long (slanted) one


def test_normals_from_depth_face_the_camera():
    depth, camera = tilted_plane_views()
    normals = normals_from_depth(depth, camera)
    # The world normal +z expressed in camera 0's frame.
    expected = camera.world_to_camera[0, :3, :3] @ torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(normals[0], expected.expand(HEIGHT, WIDTH, 3), atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode, count", [("drop", 2 * HEIGHT * WIDTH - 5), ("mask", 2 * HEIGHT * WIDTH)])
def test_invalid_depth_is_dropped_or_transparent(mode, count):
    depth, camera = tilted_plane_views()
    depth[1, 3, 4:9] = 0
    gaussians = reconstruct_from_depth(depth, camera, DepthSettings(invalid_depth=mode))
    assert len(gaussians) == count
    invalid_pixel = 3 * WIDTH + 4
    at_invalid = (gaussians.source_view == 1) & (gaussians.source_pixel == invalid_pixel)
    if mode == "drop":
        assert not at_invalid.any()
    else:
        assert gaussians.opacities[at_invalid].item() == 0.0
    assert torch.isfinite(gaussians.quats).all() and torch.isfinite(gaussians.scales).all()


def test_all_invalid_depth_is_an_error():
    depth, camera = tilted_plane_views()
    with pytest.raises(ValueError, match="no valid depth"):
        reconstruct_from_depth(torch.zeros_like(depth), camera, DepthSettings())


def context_pairs(count: int = 4) -> list:
    """``count`` pairs of context views as the stage reads them (float32 depth with invalid pixels, camera-frame
    normals with some missing), each pair's views and holes different."""
    import numpy as np

    from snd_stages.reconstruct import ContextViews

    generator = np.random.default_rng(0)
    pairs = []
    for index in range(count):
        depth, camera = tilted_plane_views(tilt_degrees=30.0 + 7 * index)
        depth = depth.numpy().astype(np.float32)
        depth[index % 2, 2 + index, 3 : 4 + index] = 0  # invalid pixels: dropped, so the pairs' counts differ
        normals = generator.normal(size=(2, HEIGHT, WIDTH, 3)).astype(np.float32)
        normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
        normals[1 - index % 2, :4] = 0  # where the dataset has none: estimated from depth
        pairs.append(ContextViews(images=np.zeros((2, HEIGHT, WIDTH, 3), np.uint8), camera=camera, depth=depth,
                                  normals=normals, names=(f"pair{index}-a", f"pair{index}-b")))
    return pairs


def assert_pairs_reconstructed_together_as_one_by_one(device: str) -> None:
    from snd_stages.pipeline import load_config
    from snd_stages.reconstruct import build_reconstructor

    pairs = context_pairs()
    for overrides in ([], ["gaussians.depth.covariance=isotropic"], ["gaussians.depth.invalid_depth=mask"],
                      ["gaussians.depth.normals=estimate"]):
        reconstructor = build_reconstructor(load_config(None, [f"gaussians.device={device}", *overrides]).gaussians)
        assert reconstructor.reconstruct_together is not None
        together = reconstructor.reconstruct_all(pairs)
        assert len(together) == len(pairs)
        for views, gaussians in zip(pairs, together):
            alone = reconstructor.reconstruct(views)
            for field in ("means", "quats", "scales", "opacities", "source_view", "source_pixel"):
                assert torch.equal(getattr(gaussians, field), getattr(alone, field)), (overrides, field)
        if overrides != ["gaussians.depth.invalid_depth=mask"]:  # holes dropped: the pairs' counts differ
            assert len({len(gaussians) for gaussians in together}) == len(pairs)


def test_pairs_reconstructed_together_are_exactly_the_pairs_one_by_one():
    assert_pairs_reconstructed_together_as_one_by_one("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pairs_reconstructed_together_on_cuda_are_exactly_the_pairs_one_by_one():
    assert_pairs_reconstructed_together_as_one_by_one("cuda")


def test_pairs_of_other_sizes_or_without_normals_are_reconstructed_one_by_one():
    from dataclasses import replace

    from snd_stages.pipeline import load_config
    from snd_stages.reconstruct import build_reconstructor

    first, second, third = context_pairs(3)
    smaller = replace(second, depth=second.depth[:, :20], normals=second.normals[:, :20],
                      camera=Camera(second.camera.intrinsics, second.camera.world_to_camera, 20, WIDTH))
    without_normals = replace(third, normals=None)
    reconstructor = build_reconstructor(load_config(None, ["gaussians.device=cpu"]).gaussians)
    together = reconstructor.reconstruct_all([first, smaller, without_normals])
    for views, gaussians in zip([first, smaller, without_normals], together):
        assert torch.equal(gaussians.means, reconstructor.reconstruct(views).means)
    assert len(together[1]) < len(together[0])
