"""Correspondence pairs: SuperGlue's ScanNet-1500 list + LoFTR's scannet_test_1500 folder, and pairs from snd scenes.

The ScanNet fixture is written by hand in the real formats (38-field lines with the list's K at ScanNet's 1296x968
colour resolution, JPG colour, 16-bit millimetre depth PNGs, camera-to-world pose txt files), and the expected
pixels are computed from the camera-to-world poses directly, independently of the reader's T_0to1 handling.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from snd_stages.errors import DataError
from snd_stages.geometry import project_points, transform_points, unproject_depth
from snd_stages.scenes.correspondence import (
    CorrespondencePair,
    pairs_from_scene,
    read_scannet1500,
    rotation_angle_degrees,
)
from snd_stages.scenes.layout import read_scene, write_scene

WIDTH, HEIGHT = 64, 48
K_LIST = np.array([[1165.72, 0.0, 649.095], [0.0, 1165.74, 484.765], [0.0, 0.0, 1.0]])


def _rotation(axis: str, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _pose(axis: str, degrees: float, position) -> np.ndarray:
    pose = np.eye(4)
    pose[:3, :3] = _rotation(axis, degrees)
    pose[:3, 3] = position
    return pose


def _expected_K() -> np.ndarray:
    """The list's K (OpenCV centres, 1296x968) in snd's convention at the stored 64x48 size."""
    K = K_LIST.copy()
    K[:2, 2] += 0.5
    K[0] *= WIDTH / 1296
    K[1] *= HEIGHT / 968
    return K


POSES = {  # ScanNet pose/<frame>.txt: camera-to-world
    15: _pose("y", 0.0, [0.0, 0.0, 0.0]),
    585: _pose("y", 20.0, [0.4, 0.05, 0.1]),
    45: _pose("x", 10.0, [1.0, 2.0, 0.5]),
    105: _pose("y", -35.0, [1.3, 2.0, 0.2]),
}


def _format(values: np.ndarray) -> str:
    return " ".join(f"{value: .5f}" for value in values.reshape(-1))  # 5 decimals, as SuperGlue's list


def write_scannet1500(root: Path, pair_names=("superglue", "superglue")) -> Path:
    """Two pairs of scene0707_00 in the list format, and the scannet_test_1500 folder they point to."""
    scene = root / "scannet_test_1500" / "scene0707_00"
    for folder in ("color", "depth", "pose"):
        (scene / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for frame, pose in POSES.items():
        Image.fromarray(rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(scene / "color" / f"{frame}.jpg")
        depth_mm = np.full((HEIGHT, WIDTH), 1500 + frame, np.uint16)
        depth_mm[0, :4] = 0
        Image.fromarray(depth_mm).save(scene / "depth" / f"{frame}.png")
        np.savetxt(scene / "pose" / f"{frame}.txt", pose, fmt="%.6f", delimiter=" ")
    lines = []
    for (frame0, frame1), style in zip(((15, 585), (45, 105)), pair_names):
        T_0to1 = np.linalg.inv(POSES[frame1]) @ POSES[frame0]
        if style == "superglue":
            names = f"scene0707_00_frame-{frame0:06d}.jpg scene0707_00_frame-{frame1:06d}.jpg"
        else:
            names = (f"scans_test/scene0707_00/sens/frame-{frame0:06d}.color.jpg "
                     f"scans_test/scene0707_00/sens/frame-{frame1:06d}.color.jpg")
        lines.append(f"{names} 0 0 {_format(K_LIST)}    {_format(K_LIST)}    {_format(T_0to1)}")
    pairs_txt = root / "scannet_test_pairs_with_gt.txt"
    pairs_txt.write_text("\n".join(lines) + "\n")
    return pairs_txt


def test_scannet1500_reads_pairs(tmp_path):
    pairs_txt = write_scannet1500(tmp_path, pair_names=("superglue", "scans_test"))
    pairs = read_scannet1500(pairs_txt, tmp_path / "scannet_test_1500")
    assert [pair.name for pair in pairs] == ["scene0707_00/15-585", "scene0707_00/45-105"]
    pair = pairs[0]
    assert isinstance(pair, CorrespondencePair)
    for camera in (pair.camera0, pair.camera1):
        assert (camera.height, camera.width) == (HEIGHT, WIDTH)
        assert np.allclose(camera.intrinsics.numpy(), _expected_K(), atol=1e-9)
    assert torch.equal(pair.camera0.world_to_camera, torch.eye(4, dtype=torch.float64))
    image = pair.load_image(1)
    assert image.shape == (HEIGHT, WIDTH, 3) and image.dtype == np.uint8
    depth = pair.load_depth(0)
    assert depth.dtype == np.float32 and depth[5, 5] == pytest.approx(1.515) and depth[0, 0] == 0.0
    assert pair.load_depth(1)[5, 5] == pytest.approx(2.085)
    assert pairs[0].rotation_degrees == pytest.approx(20.0, abs=0.01)
    assert pairs[1].rotation_degrees == pytest.approx(
        rotation_angle_degrees(_rotation("y", -35.0).T @ _rotation("x", 10.0)), abs=0.01)


def test_scannet1500_relative_pose_maps_points(tmp_path):
    pairs = read_scannet1500(write_scannet1500(tmp_path), tmp_path / "scannet_test_1500")
    K = _expected_K()
    for pair, (frame0, frame1) in zip(pairs, ((15, 585), (45, 105))):
        # A world point in front of both cameras, seen from each camera via its camera-to-world pose.
        point_world = POSES[frame0] @ np.array([0.2, -0.1, 2.0, 1.0])
        expected = []
        for frame in (frame0, frame1):
            in_camera = (np.linalg.inv(POSES[frame]) @ point_world)[:3]
            expected.append((K @ in_camera)[:2] / in_camera[2])
        point_camera0 = torch.from_numpy((np.linalg.inv(POSES[frame0]) @ point_world)[:3])[None]
        uv0, z0 = project_points(point_camera0, pair.camera0)
        uv1, z1 = project_points(point_camera0, pair.camera1)
        assert np.allclose(uv0[0].numpy(), expected[0], atol=1e-6)
        assert np.allclose(uv1[0].numpy(), expected[1], atol=2e-3)  # the list rounds T_0to1 to 5 decimals
        assert z0.item() > 0 and z1.item() > 0
        assert np.allclose(pair.relative_pose.numpy(), np.linalg.inv(POSES[frame1]) @ POSES[frame0], atol=1e-4)


def test_scannet1500_errors(tmp_path):
    pairs_txt = write_scannet1500(tmp_path)
    root = tmp_path / "scannet_test_1500"
    with pytest.raises(DataError, match="pair list .* is missing"):
        read_scannet1500(tmp_path / "absent.txt", root)
    with pytest.raises(DataError, match="folder .* is missing"):
        read_scannet1500(pairs_txt, tmp_path / "absent")
    lines = pairs_txt.read_text().splitlines()

    broken = tmp_path / "broken.txt"
    broken.write_text(lines[0] + "\n" + " ".join(lines[1].split()[:-1]) + "\n")
    with pytest.raises(DataError, match=r"line 2: expected 38 fields .* got 37"):
        read_scannet1500(broken, root)
    fields = lines[0].split()
    fields[7] = "abc"
    broken.write_text(" ".join(fields) + "\n")
    with pytest.raises(DataError, match="line 1: .*must be numbers"):
        read_scannet1500(broken, root)
    fields = lines[0].split()
    fields[2] = "1"
    broken.write_text(" ".join(fields) + "\n")
    with pytest.raises(DataError, match="line 1: EXIF rotations"):
        read_scannet1500(broken, root)
    fields = lines[0].split()
    fields[22] = "3.0"  # T_0to1[0, 0]: a scaled rotation
    broken.write_text(" ".join(fields) + "\n")
    with pytest.raises(DataError, match="line 1 T_0to1: pose is not rigid"):
        read_scannet1500(broken, root)
    fields = lines[0].split()
    fields[12] = "0.5"  # K0[2, 2]
    broken.write_text(" ".join(fields) + "\n")
    with pytest.raises(DataError, match="line 1: K0 .* is not a pinhole"):
        read_scannet1500(broken, root)
    fields = lines[0].split()
    fields[0] = "image_without_ids.jpg"
    broken.write_text("\n" + " ".join(fields) + "\n")
    with pytest.raises(DataError, match="line 2: cannot parse scene and frame"):
        read_scannet1500(broken, root)
    (root / "scene0707_00" / "depth" / "585.png").unlink()
    with pytest.raises(DataError, match=r"line 1: .*depth/585.png is missing"):
        read_scannet1500(pairs_txt, root)


# ---------------------------------------------------------------------------------------------------------------
# Pairs from scenes in the snd layout
# ---------------------------------------------------------------------------------------------------------------


def _write_orbit_scene(root: Path, frames: int = 8, with_depth: bool = True):
    """Frames on a circle looking at the origin, 6 degrees apart (OpenCV world-to-camera)."""
    world_to_camera = []
    for index in range(frames):
        angle = np.radians(6.0 * index)
        centre = np.array([3.0 * np.sin(angle), 0.0, -3.0 * np.cos(angle)])
        rotation = _rotation("y", -6.0 * index)  # camera z axis points at the origin
        pose = np.eye(4)
        pose[:3, :3] = rotation
        pose[:3, 3] = -rotation @ centre
        world_to_camera.append(pose)
    K = np.array([[40.0, 0.0, 16.0], [0.0, 40.0, 12.0], [0.0, 0.0, 1.0]])
    images = np.random.default_rng(1).integers(0, 255, (frames, 24, 32, 3), dtype=np.uint8)
    depth = np.full((frames, 24, 32), 3.0, np.float32) if with_depth else None
    names = [f"DSC{index + 1:05d}.png" for index in range(frames)]
    write_scene(root / "scenes" / "orbit", names, images, K, np.stack(world_to_camera), depth=depth)
    return read_scene(root, "orbit")


def test_pairs_from_scene(tmp_path):
    scene = _write_orbit_scene(tmp_path)
    pairs = pairs_from_scene(scene, count=4, min_gap=2, max_gap=3, seed=7)
    assert len(pairs) == 4
    assert [p.name for p in pairs] == [p.name for p in pairs_from_scene(scene, 4, 2, 3, seed=7)]
    all_pairs = pairs_from_scene(scene, count=100, min_gap=2, max_gap=3, seed=0)
    assert len(all_pairs) == 6 + 5  # gap 2: 6 pairs, gap 3: 5 pairs among 8 frames
    names = [frame.name for frame in scene.frames]
    point_world = torch.tensor([[0.1, -0.2, 0.3]], dtype=torch.float64)
    for pair in pairs:
        frame0, frame1 = (names.index(part) for part in pair.name.split("/")[1].split("-"))
        assert 2 <= frame1 - frame0 <= 3
        assert pair.rotation_degrees == pytest.approx(6.0 * (frame1 - frame0), abs=1e-6)
        assert torch.equal(pair.camera0.world_to_camera, torch.eye(4, dtype=torch.float64))
        point_camera0 = transform_points(scene.camera.world_to_camera[frame0], point_world)
        uv_pair, _ = project_points(point_camera0, pair.camera1)
        uv_scene, _ = project_points(point_world, scene.camera[frame1])
        assert torch.allclose(uv_pair, uv_scene, atol=1e-9)
        assert pair.load_image(0).shape == (24, 32, 3)
        assert pair.load_depth(1)[3, 3] == pytest.approx(3.0)
        # Depth of view 0 back-projected and reprojected lands inside view 1 where the views overlap.
        points = unproject_depth(torch.from_numpy(pair.load_depth(0)).double(), pair.camera0)
        uv, z = project_points(points.reshape(-1, 3), pair.camera1)
        assert (z > 0).all()


def test_pairs_from_scene_errors(tmp_path):
    scene = _write_orbit_scene(tmp_path, frames=4)
    with pytest.raises(DataError, match="no pair of good frames is 5..6"):
        pairs_from_scene(scene, count=2, min_gap=5, max_gap=6, seed=0)
    with pytest.raises(DataError, match="min_gap"):
        pairs_from_scene(scene, count=2, min_gap=3, max_gap=2, seed=0)
    with pytest.raises(DataError, match="at least 1"):
        pairs_from_scene(scene, count=0, min_gap=1, max_gap=2, seed=0)
    no_depth = _write_orbit_scene(tmp_path / "other", frames=4, with_depth=False)
    with pytest.raises(DataError, match="depth"):
        pairs_from_scene(no_depth, count=1, min_gap=1, max_gap=1, seed=0)
