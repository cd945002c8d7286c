"""The ScanNet++ reader on a tiny fixture written by hand in the exact FiT3D-prepared format.

The fixture is written with plain json/PIL (not with snd's own writer), so a bug shared by writer and reader
cannot hide: nerfstudio OpenGL camera-to-world poses, JPG images named like the DSLR's, ``<image>.png`` masks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from snd_stages.errors import DataError
from snd_stages.geometry import project_points, unproject_depth
from snd_stages.scenes.layout import list_scene_ids, read_scene, write_scene

from tests.scannetpp_fixture import CX, CY, FL_X, FL_Y, HEIGHT, WIDTH, look_at_opengl, write_fixture


def test_reader_sorts_frames_and_converts_poses(tmp_path):
    poses = write_fixture(tmp_path)
    scene = read_scene(tmp_path, "0a5c013435")
    assert [f.name for f in scene.frames] == ["DSC00003.JPG", "DSC00007.JPG", "DSC00012.JPG"]
    assert [f.number for f in scene.frames] == [3, 7, 12]
    assert [f.is_bad for f in scene.frames] == [False, True, False]
    assert (scene.camera.height, scene.camera.width) == (HEIGHT, WIDTH)
    torch.testing.assert_close(
        scene.camera.intrinsics[0], torch.tensor([[FL_X, 0, CX], [0, FL_Y, CY], [0, 0, 1]], dtype=torch.float64)
    )
    for index, frame in enumerate(scene.frames):
        gl = poses[frame.name]
        world_to_camera = scene.camera.world_to_camera[index].numpy()
        # The camera centre is the same point in both conventions.
        np.testing.assert_allclose(np.linalg.inv(world_to_camera)[:3, 3], gl[:3, 3], atol=1e-12)
        # The OpenGL viewing direction (-z) is the OpenCV +z axis; OpenGL up (+y) is OpenCV -y.
        np.testing.assert_allclose(world_to_camera[2, :3], -gl[:3, 2], atol=1e-12)
        np.testing.assert_allclose(world_to_camera[1, :3], -gl[:3, 1], atol=1e-12)


def test_reader_geometry_sees_the_plane_in_front(tmp_path):
    write_fixture(tmp_path)
    scene = read_scene(tmp_path, "0a5c013435")
    # The target point (0.3, 0.3, 0) each camera looks at must project in front of it, near the image centre.
    target = torch.tensor([[[0.1 * 3, 0.3, 0.0]]], dtype=torch.float64)
    uv, z = project_points(target, scene.camera[:1])
    assert z.item() > 0
    torch.testing.assert_close(uv[0, 0], torch.tensor([CX, CY], dtype=torch.float64), atol=1e-9, rtol=0)
    # Depth unprojected from frame 0 and reprojected into the same camera lands on the pixel grid.
    depth = torch.from_numpy(scene.load_depth(0)).double()
    points = unproject_depth(depth, scene.camera[0])
    uv, z = project_points(points.reshape(1, -1, 3), scene.camera[:1])
    torch.testing.assert_close(z.reshape(HEIGHT, WIDTH), depth)


def test_reader_loads_images_masks_and_depth(tmp_path):
    write_fixture(tmp_path)
    scene = read_scene(tmp_path, "0a5c013435")
    image = scene.load_image(2)
    assert image.dtype == np.uint8 and image.shape == (HEIGHT, WIDTH, 3)
    labels = scene.load_instances(2)
    assert labels[0, 0] == 0 and labels[0, -1] == 312
    np.testing.assert_allclose(scene.load_depth(1), 2.007)
    assert scene.has("depth") and not scene.has("normals")


def test_split_files_select_scenes(tmp_path):
    write_fixture(tmp_path, "aaa")
    write_fixture(tmp_path, "bbb")  # rewrites the split files to name only bbb
    assert list_scene_ids(tmp_path, "all") == ["aaa", "bbb"]
    assert list_scene_ids(tmp_path, "train") == ["bbb"]


def test_writer_round_trip_through_the_reader(tmp_path):
    rng = np.random.default_rng(0)
    count = 4
    images = rng.integers(0, 255, (count, HEIGHT, WIDTH, 3), dtype=np.uint8)
    world_to_camera = np.stack([np.linalg.inv(look_at_opengl([i, 0, 2], [i, 0.5, 0]) @ np.diag([1, -1, -1, 1]))
                                for i in range(count)])
    K = np.array([[FL_X, 0, CX], [0, FL_Y, CY], [0, 0, 1]])
    instances = rng.integers(0, 70000 // 2, (count, HEIGHT, WIDTH))
    depth = rng.uniform(0.2, 9.0, (count, HEIGHT, WIDTH)).astype(np.float32)
    normals = rng.normal(size=(count, HEIGHT, WIDTH, 3))
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    names = [f"DSC{i + 1:05d}.png" for i in range(count)]
    write_scene(tmp_path / "scenes" / "s", names, images, K, world_to_camera, instances=instances, depth=depth,
                semantics=instances % 13, normals=normals)
    scene = read_scene(tmp_path, "s")
    np.testing.assert_allclose(scene.camera.world_to_camera.numpy(), world_to_camera, atol=1e-12)
    for index in range(count):
        np.testing.assert_array_equal(scene.load_image(index), images[index])
        np.testing.assert_array_equal(scene.load_instances(index), instances[index])
        np.testing.assert_array_equal(scene.load_semantics(index), instances[index] % 13)
        np.testing.assert_allclose(scene.load_depth(index), depth[index], atol=0.0005 + 1e-6)
        angle = np.degrees(np.arccos(np.clip((scene.load_normals(index) * normals[index]).sum(-1), -1, 1)))
        assert angle.max() < 0.6  # 8-bit normal encoding


def edit_json(root: Path, change) -> None:
    path = root / "scenes" / "0a5c013435" / "transforms_train.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def nan_pose(meta):
    meta["frames"][1]["transform_matrix"][0][3] = float("nan")


def scaled_pose(meta):
    meta["frames"][0]["transform_matrix"] = (np.diag([2.0, 2.0, 2.0, 1.0])).tolist()


@pytest.mark.parametrize(
    "change, fragments",
    [
        (nan_pose, ["frames[1] (DSC00003.JPG)", "NaN"]),
        (scaled_pose, ["DSC00012.JPG", "not rigid"]),
        (lambda m: m.update(w=88, h=60), ["88x60", "44x30", "intrinsics do not match"]),
        (lambda m: m.update(camera_model="OPENCV_FISHEYE", k1=0.1), ["OPENCV_FISHEYE", "undistort"]),
        (lambda m: m.pop("fl_x"), ["fl_x"]),
        (lambda m: m.update(frames=[]), ["non-empty 'frames'"]),
    ],
)
def test_bad_scene_metadata_errors(tmp_path, change, fragments):
    write_fixture(tmp_path)
    edit_json(tmp_path, change)
    with pytest.raises(DataError) as error:
        read_scene(tmp_path, "0a5c013435")
    for fragment in fragments:
        assert fragment in str(error.value), (fragment, str(error.value))


def test_bad_files_errors(tmp_path):
    write_fixture(tmp_path)
    scene_dir = tmp_path / "scenes" / "0a5c013435"
    scene = read_scene(tmp_path, "0a5c013435")
    (scene_dir / "images" / "DSC00007.JPG").write_bytes((scene_dir / "images" / "DSC00007.JPG").read_bytes()[:200])
    with pytest.raises(DataError, match="DSC00007.JPG.*truncated"):
        scene.load_image(1)
    Image.fromarray(np.zeros((10, 10), np.uint16)).save(scene_dir / "depth" / "DSC00003.JPG.png")
    with pytest.raises(DataError, match="depth is 10x10 but .* 30x44"):
        scene.load_depth(0)
    (scene_dir / "instance_segmentation" / "DSC00012.JPG.png").unlink()
    with pytest.raises(DataError, match="missing file .*DSC00012.JPG.png"):
        scene.load_instances(2)


def test_wrong_layout_says_which_layout_was_expected(tmp_path):
    with pytest.raises(DataError, match="no scenes/ folder.*expected the ScanNet\\+\\+ layout"):
        list_scene_ids(tmp_path)
    (tmp_path / "scenes" / "x").mkdir(parents=True)
    with pytest.raises(DataError, match="transforms_train.json is missing"):
        read_scene(tmp_path, "x")
    with pytest.raises(DataError, match="split file .* is missing"):
        list_scene_ids(tmp_path, "train")
