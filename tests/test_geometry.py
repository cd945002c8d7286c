"""Camera conventions: projection, unprojection, resizing, pose conversion, quaternions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from snd_stages.geometry import (
    Camera,
    check_rigid,
    image_to_channels,
    image_to_tensor,
    invert_rigid,
    opencv_world_to_camera_to_opengl_camera_to_world,
    opengl_camera_to_world_to_opencv_world_to_camera,
    pixel_centers,
    project_points,
    quaternion_to_rotation_matrix,
    rotation_matrix_to_quaternion,
    unit_range,
    unproject_depth,
)


def random_rotation(generator: torch.Generator, count: int) -> torch.Tensor:
    quaternions = torch.randn(count, 4, generator=generator, dtype=torch.float64)
    return quaternion_to_rotation_matrix(quaternions)


def random_camera(generator: torch.Generator, count: int = 3, height: int = 30, width: int = 40) -> Camera:
    world_to_camera = torch.eye(4, dtype=torch.float64).repeat(count, 1, 1)
    world_to_camera[:, :3, :3] = random_rotation(generator, count)
    world_to_camera[:, :3, 3] = torch.randn(count, 3, generator=generator, dtype=torch.float64)
    K = torch.tensor([[35.0, 0.0, 21.3], [0.0, 33.0, 14.1], [0.0, 0.0, 1.0]], dtype=torch.float64).repeat(count, 1, 1)
    return Camera(K, world_to_camera, height, width)


def test_unproject_then_project_lands_on_the_pixel_centres():
    generator = torch.Generator().manual_seed(0)
    camera = random_camera(generator)
    depth = 0.5 + 4 * torch.rand(3, 30, 40, generator=generator, dtype=torch.float64)
    points = unproject_depth(depth, camera)
    uv, z = project_points(points.reshape(3, -1, 3), camera)
    expected = pixel_centers(30, 40, dtype=torch.float64).reshape(1, -1, 2).expand(3, -1, -1)
    torch.testing.assert_close(uv, expected, atol=1e-9, rtol=0)
    torch.testing.assert_close(z, depth.reshape(3, -1), atol=1e-9, rtol=0)


def test_unproject_of_the_principal_point_goes_straight_ahead():
    # A camera at (1, 2, 3) looking along world +x: its optical axis (camera +z) is world +x.
    camera_to_world = torch.eye(4, dtype=torch.float64)
    camera_to_world[:3, :3] = torch.tensor([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]], dtype=torch.float64)
    camera_to_world[:3, 3] = torch.tensor([1.0, 2.0, 3.0])
    K = torch.tensor([[10.0, 0.0, 4.5], [0.0, 10.0, 2.5], [0.0, 0.0, 1.0]], dtype=torch.float64)
    camera = Camera(K, invert_rigid(camera_to_world), height=5, width=9)
    depth = torch.full((5, 9), 2.0, dtype=torch.float64)
    points = unproject_depth(depth, camera)
    # Pixel (row 2, column 4) has its centre at (4.5, 2.5) = the principal point.
    torch.testing.assert_close(points[2, 4], torch.tensor([3.0, 2.0, 3.0], dtype=torch.float64))
    # One pixel to the right (image +x = camera +x = world -y) moves by depth / fx.
    torch.testing.assert_close(points[2, 5], torch.tensor([3.0, 2.0 - 0.2, 3.0], dtype=torch.float64))
    # One pixel down (camera +y = world -z).
    torch.testing.assert_close(points[3, 4], torch.tensor([3.0, 2.0, 3.0 - 0.2], dtype=torch.float64))


def test_resized_camera_scales_projections_exactly():
    generator = torch.Generator().manual_seed(1)
    camera = random_camera(generator, count=2, height=30, width=40)
    points = torch.randn(2, 50, 3, generator=generator, dtype=torch.float64)
    points = points + camera.center[:, None, :]
    uv, _ = project_points(points, camera)
    small = camera.resized(15, 10)
    uv_small, _ = project_points(points, small)
    torch.testing.assert_close(uv_small, uv * torch.tensor([10 / 40, 15 / 30], dtype=torch.float64))


def test_cropped_camera_shifts_projections():
    generator = torch.Generator().manual_seed(2)
    camera = random_camera(generator, count=1)
    points = camera.center[:, None, :] + torch.randn(1, 20, 3, generator=generator, dtype=torch.float64)
    uv, _ = project_points(points, camera)
    uv_crop, _ = project_points(points, camera.cropped(top=3, left=7, height=20, width=20))
    torch.testing.assert_close(uv_crop, uv - torch.tensor([7.0, 3.0], dtype=torch.float64))


def test_opengl_opencv_pose_conversion_keeps_points_in_front():
    generator = torch.Generator().manual_seed(3)
    camera = random_camera(generator, count=1)
    world_to_camera_cv = camera.world_to_camera[0].numpy()
    camera_to_world_gl = opencv_world_to_camera_to_opengl_camera_to_world(world_to_camera_cv)
    # In the OpenGL camera frame the camera looks down -z and y is up.
    point_gl = np.array([0.3, 0.2, -2.0, 1.0])  # in front of the camera, above the centre
    point_world = camera_to_world_gl @ point_gl
    point_cv = world_to_camera_cv @ point_world
    np.testing.assert_allclose(point_cv[:3], [0.3, -0.2, 2.0], atol=1e-12)  # in front (z>0), above (y<0)
    back = opengl_camera_to_world_to_opencv_world_to_camera(camera_to_world_gl)
    np.testing.assert_allclose(back, world_to_camera_cv, atol=1e-12)


def test_invert_rigid_is_the_inverse():
    generator = torch.Generator().manual_seed(4)
    camera = random_camera(generator, count=4)
    product = camera.world_to_camera @ camera.camera_to_world
    torch.testing.assert_close(product, torch.eye(4, dtype=torch.float64).expand(4, 4, 4), atol=1e-12, rtol=0)


def test_quaternion_round_trip_and_wxyz_order():
    generator = torch.Generator().manual_seed(5)
    rotations = random_rotation(generator, 200)
    # Include the hard cases: identity and 180 degree turns about each axis.
    special = torch.stack([torch.eye(3, dtype=torch.float64), torch.diag(torch.tensor([1.0, -1, -1], dtype=torch.float64)),
                           torch.diag(torch.tensor([-1.0, 1, -1], dtype=torch.float64)),
                           torch.diag(torch.tensor([-1.0, -1, 1], dtype=torch.float64))])
    rotations = torch.cat([rotations, special])
    quaternions = rotation_matrix_to_quaternion(rotations)
    torch.testing.assert_close(quaternion_to_rotation_matrix(quaternions), rotations, atol=1e-10, rtol=0)
    assert (quaternions[:, 0] >= 0).all()
    # wxyz: a 90 degree turn about z is (cos 45, 0, 0, sin 45) and maps x to y.
    quarter_turn = torch.tensor([math.cos(math.pi / 4), 0.0, 0.0, math.sin(math.pi / 4)], dtype=torch.float64)
    rotation = quaternion_to_rotation_matrix(quarter_turn)
    torch.testing.assert_close(rotation @ torch.tensor([1.0, 0, 0], dtype=torch.float64),
                               torch.tensor([0.0, 1, 0], dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "matrix, message",
    [
        (np.diag([1.0, 1.0, 1.0, 1.0]) * 2, "not rigid"),
        (np.diag([1.0, 1.0, -1.0, 1.0]), "not rigid"),
        (np.full((4, 4), np.nan), "NaN"),
        (np.eye(3), "4x4"),
    ],
)
def test_check_rigid_rejects_bad_poses(matrix, message):
    with pytest.raises(ValueError, match=message):
        check_rigid(matrix, "pose")


def test_camera_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="3, 3"):
        Camera(torch.eye(4), torch.eye(4), 10, 10)
    with pytest.raises(ValueError, match="batch"):
        Camera(torch.eye(3).repeat(2, 1, 1), torch.eye(4).repeat(3, 1, 1), 10, 10)


def test_unit_range_is_each_level_over_255_to_the_nearest_float():
    levels = torch.arange(256, dtype=torch.uint8)
    converted = unit_range(levels)
    assert converted.dtype == torch.float32 and converted[0] == 0 and converted[255] == 1
    exact = torch.arange(256, dtype=torch.float64) / 255
    # within one float32 step (2^-24 relative) of the exact quotient, and in order
    assert ((converted.double() - exact).abs() <= exact * 2**-23).all()
    assert (converted.diff() > 0).all()


def test_image_to_tensor_is_the_stored_image_channels_first_in_unit_range():
    image = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    channels = image_to_channels(image)
    assert channels.dtype == torch.uint8 and channels.shape == (3, 5, 7) and channels.is_contiguous()
    for channel in range(3):
        assert np.array_equal(channels[channel].numpy(), image[..., channel])
    assert torch.equal(image_to_tensor(image), unit_range(channels))
    channels[0, 0, 0] = image[0, 0, 0] + 1  # a copy: the stored image is untouched
    assert channels[0, 0, 0] != image[0, 0, 0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_unit_range_on_the_gpu_is_bitwise_the_cpus():
    # Training converts its uint8 images on the GPU; everything else converts them on the CPU.
    levels = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(unit_range(levels.cuda()).cpu(), unit_range(levels))
