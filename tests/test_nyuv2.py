"""NYUv2 labeled-set reader on tiny files written in the real formats, and depth-derived normals.

The labeled ``.mat`` fixture is written the way MATLAB writes ``-v7.3`` files: a 512-byte MAT header block in front
of the HDF5 data, ``MATLAB_class`` attributes, and every array with its axes reversed (MATLAB is column-major, so
a MATLAB ``H x W x 3 x N`` array is an HDF5 ``[N, 3, W, H]`` dataset). The fixture builds each array in MATLAB's
index order and reverses the axes with ``.T``, so the reader's transposes are checked against MATLAB semantics, not
against themselves.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import torch

from snd_stages.errors import DataError
from snd_stages.geometry import Camera
from snd_stages.scenes.normals import normals_from_depth_plane_fit
from snd_stages.scenes.nyuv2 import (
    IGNORE_LABEL,
    NYUv2Labeled,
    eigen_crop_mask,
    nyu_camera,
)

H, W, N = 6, 8, 3


def _matlab_header() -> bytes:
    text = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    header = text.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM"  # subsystem offset, version 0x0200, endian
    return header.ljust(512, b"\x00")


def _matlab_images() -> np.ndarray:
    """MATLAB-indexed ``images(row, col, channel, frame)``: an asymmetric pattern with known pixels."""
    images = np.zeros((H, W, 3, N), dtype=np.uint8)
    for frame in range(N):
        for row in range(H):
            for col in range(W):
                images[row, col, 0, frame] = 10 * row + col  # red encodes (row, col)
                images[row, col, 1, frame] = 100 + frame  # green encodes the frame
                images[row, col, 2, frame] = 200 if (row == 0 and col == W - 1) else 0  # top-right marker
    return images


def _matlab_depths() -> np.ndarray:
    depths = np.zeros((H, W, N), dtype=np.float32)
    for frame in range(N):
        depths[:, :, frame] = 1.0 + 0.1 * np.arange(H)[:, None] + 0.01 * np.arange(W)[None, :] + frame
    depths[H - 1, 0, 0] = 0.0  # bottom-left hole in frame 0
    return depths


def _matlab_labels() -> np.ndarray:
    labels = np.zeros((H, W, N), dtype=np.uint16)
    labels[0, :, 0] = 1  # top row of frame 0: raw class 1
    labels[1, :, 0] = 894  # raw class 894
    labels[2, :3, 0] = 5
    return labels  # the rest: 0 = unlabelled


def _write_dataset(file: h5py.File, name: str, matlab_array: np.ndarray, matlab_class: str) -> None:
    dataset = file.create_dataset(name, data=matlab_array.T)  # column-major MATLAB -> reversed HDF5 dims
    dataset.attrs.create("MATLAB_class", np.bytes_(matlab_class))


def write_labeled_mat(path: Path, include=("images", "depths", "rawDepths", "labels")) -> Path:
    with h5py.File(path, "w", userblock_size=512) as file:
        if "images" in include:
            _write_dataset(file, "images", _matlab_images(), "uint8")
        if "depths" in include:
            _write_dataset(file, "depths", _matlab_depths(), "single")
        if "rawDepths" in include:
            raw = _matlab_depths()
            raw[0, 0, :] = 0.0  # Kinect holes
            _write_dataset(file, "rawDepths", raw, "single")
        if "labels" in include:
            _write_dataset(file, "labels", _matlab_labels(), "uint16")
        _write_dataset(file, "sceneTypes_dummy", np.zeros((1, N)), "double")
        # ``names``: a 1x894 cell of char arrays, stored as object references into #refs# (first two only here).
        refs = file.create_group("#refs#")
        references = []
        for index, name in enumerate(["book", "bottle"]):
            chars = refs.create_dataset(f"n{index}", data=np.array([[ord(c)] for c in name], dtype=np.uint16))
            chars.attrs.create("MATLAB_class", np.bytes_("char"))
            chars.attrs.create("MATLAB_int_decode", np.int32(2))
            references.append(chars.ref)
        names = file.create_dataset("names", data=np.array(references, dtype=h5py.ref_dtype)[:, None])
        names.attrs.create("MATLAB_class", np.bytes_("cell"))
    with open(path, "r+b") as handle:
        handle.write(_matlab_header())
    return path


MAP40 = (np.arange(894) % 40 + 1).astype(np.float64)  # raw c -> ((c - 1) % 40) + 1
MAP13 = (np.arange(40) % 13 + 1).astype(np.float64)  # 40-class k -> ((k - 1) % 13) + 1


def write_v5_files(directory: Path) -> dict[str, Path]:
    paths = {"splits": directory / "splits.mat", "map40": directory / "classMapping40.mat",
             "map13": directory / "class13Mapping.mat"}
    scipy.io.savemat(paths["splits"], {"trainNdxs": np.array([[1.0], [3.0]]), "testNdxs": np.array([[2.0]])})
    scipy.io.savemat(paths["map40"], {"mapClass": MAP40[None, :],
                                      "className": np.array([f"class{k}" for k in range(1, 41)], dtype=object)[None]})
    names13 = np.array([f"c{k}" for k in range(1, 14)], dtype=object)[None]
    scipy.io.savemat(paths["map13"], {"classMapping13": {"labels13": MAP13[None, :], "names13": names13}})
    return paths


@pytest.fixture
def nyu_files(tmp_path: Path) -> dict[str, Path]:
    paths = write_v5_files(tmp_path)
    paths["mat"] = write_labeled_mat(tmp_path / "nyu_depth_v2_labeled.mat")
    return paths


def test_fixture_is_a_matlab_v73_file(nyu_files):
    head = nyu_files["mat"].read_bytes()[:128]
    assert head.startswith(b"MATLAB 7.3 MAT-file")
    assert h5py.is_hdf5(nyu_files["mat"])
    with h5py.File(nyu_files["mat"], "r") as file:
        assert file["images"].shape == (N, 3, W, H)
        assert file["labels"].attrs["MATLAB_class"] == b"uint16"


def test_image_orientation_and_size(nyu_files):
    dataset = NYUv2Labeled(nyu_files["mat"])
    assert len(dataset) == N and (dataset.height, dataset.width) == (H, W)
    for frame in range(N):
        image = dataset.image(frame)
        assert image.shape == (H, W, 3) and image.dtype == np.uint8
        assert image[2, 5, 0] == 25 and image[5, 2, 0] == 52  # red = 10 * row + col
        assert (image[..., 1] == 100 + frame).all()
        assert image[0, W - 1, 2] == 200 and image[..., 2].sum() == 200  # marker only at top-right


def test_depth_and_raw_depth(nyu_files):
    dataset = NYUv2Labeled(nyu_files["mat"])
    depth = dataset.depth(1)
    assert depth.shape == (H, W) and depth.dtype == np.float32
    assert depth[3, 4] == pytest.approx(1.0 + 0.3 + 0.04 + 1)
    assert dataset.depth(0)[H - 1, 0] == 0.0
    raw = dataset.depth(2, raw=True)
    assert raw[0, 0] == 0.0 and raw[0, 1] == pytest.approx(3.01)


def test_labels_raw_40_13(nyu_files):
    dataset = NYUv2Labeled(nyu_files["mat"], class_mapping_path={40: nyu_files["map40"], 13: nyu_files["map13"]})
    raw = dataset.labels(0, classes=None)
    assert raw[0, 0] == 1 and raw[1, 3] == 894 and raw[2, 2] == 5 and raw[2, 3] == 0
    labels40 = dataset.labels(0, classes=40)
    assert labels40.dtype == np.uint8
    # 0-based: raw 1 -> class 1 -> 0; raw 894 -> MAP40[893] = 894 % 40 = 14 -> 13; raw 5 -> 5 -> 4.
    assert labels40[0, 0] == 0 and labels40[1, 0] == 13 and labels40[2, 0] == 4
    assert labels40[2, 3] == IGNORE_LABEL and (labels40[3:] == IGNORE_LABEL).all()
    labels13 = dataset.labels(0, classes=13)
    # raw 894 -> 40-class 14 -> MAP13[13] = 14 % 13 = 1 -> 0-based 0; raw 5 -> 5 -> 5 -> 4.
    assert labels13[1, 0] == 0 and labels13[2, 0] == 4 and labels13[0, 0] == 0
    assert labels13[5, 5] == IGNORE_LABEL


def test_single_mapping_path_serves_40_classes(nyu_files):
    dataset = NYUv2Labeled(nyu_files["mat"], class_mapping_path=nyu_files["map40"])
    assert dataset.labels(0, 40)[2, 0] == 4
    with pytest.raises(DataError, match="class13Mapping.mat"):
        dataset.labels(0, 13)


def test_splits_are_zero_based(nyu_files):
    dataset = NYUv2Labeled(nyu_files["mat"], splits_path=nyu_files["splits"])
    assert dataset.split("train").tolist() == [0, 2]
    assert dataset.split("test").tolist() == [1]
    with pytest.raises(DataError, match="unknown NYUv2 split"):
        dataset.split("val")


def test_camera_intrinsics(nyu_files):
    camera = nyu_camera()
    K = camera.intrinsics.numpy()
    assert (camera.height, camera.width) == (480, 640)
    assert K[0, 0] == pytest.approx(518.8579, abs=1e-4) and K[1, 1] == pytest.approx(519.4696, abs=1e-4)
    # OpenCV principal point + 0.5 for snd's pixel-centre convention.
    assert K[0, 2] == pytest.approx(325.5824 + 0.5, abs=1e-4) and K[1, 2] == pytest.approx(253.7362 + 0.5, abs=1e-4)
    assert torch.equal(camera.world_to_camera, torch.eye(4, dtype=torch.float64))
    small = NYUv2Labeled(nyu_files["mat"]).camera()
    assert (small.height, small.width) == (H, W)
    assert small.intrinsics[0, 0].item() == pytest.approx(518.8579 * W / 640, abs=1e-4)


def test_eigen_crop_mask():
    mask = eigen_crop_mask()
    assert mask.shape == (480, 640) and mask.dtype == bool
    assert mask.sum() == (471 - 45) * (601 - 41)
    assert mask[45, 41] and mask[470, 600] and not mask[44, 41] and not mask[45, 40] and not mask[471, 600]
    with pytest.raises(DataError, match="480x640"):
        eigen_crop_mask(240, 320)


def test_errors(nyu_files, tmp_path):
    with pytest.raises(DataError, match="missing"):
        NYUv2Labeled(tmp_path / "absent.mat")
    with pytest.raises(DataError, match="MATLAB v5 MAT file.*v7.3"):
        NYUv2Labeled(nyu_files["splits"])
    (tmp_path / "text.mat").write_text("not a mat file")
    with pytest.raises(DataError, match="not a MATLAB v7.3"):
        NYUv2Labeled(tmp_path / "text.mat")
    no_labels = write_labeled_mat(tmp_path / "no_labels.mat", include=("images", "depths"))
    dataset = NYUv2Labeled(no_labels)
    with pytest.raises(DataError, match="'labels'"):
        dataset.labels(0, None)
    with pytest.raises(DataError, match="'rawDepths'"):
        dataset.depth(0, raw=True)
    with pytest.raises(DataError, match="'images'"):
        NYUv2Labeled(write_labeled_mat(tmp_path / "no_images.mat", include=("depths",)))
    dataset = NYUv2Labeled(nyu_files["mat"])
    with pytest.raises(DataError, match="out of range.*0..2"):
        dataset.image(N)
    with pytest.raises(DataError, match="out of range"):
        dataset.depth(-1)
    with pytest.raises(DataError, match="splits.mat"):
        dataset.split("train")
    with pytest.raises(DataError, match="classMapping40.mat"):
        dataset.labels(0, 40)
    with pytest.raises(DataError, match="40 or 13"):
        dataset.labels(0, 20)
    wrong_mapping = NYUv2Labeled(nyu_files["mat"], class_mapping_path={40: nyu_files["splits"]})
    with pytest.raises(DataError, match="no variable 'mapClass'"):
        wrong_mapping.labels(0, 40)


def test_reader_survives_pickling(nyu_files):
    import pickle

    dataset = NYUv2Labeled(nyu_files["mat"])
    dataset.image(0)  # opens the file
    clone = pickle.loads(pickle.dumps(dataset))
    assert np.array_equal(clone.image(1), dataset.image(1))


# ---------------------------------------------------------------------------------------------------------------
# Normals from depth
# ---------------------------------------------------------------------------------------------------------------


def _camera(height: int, width: int, f: float = 60.0) -> Camera:
    K = torch.tensor([[f, 0.0, width / 2], [0.0, f * 1.1, height / 2 + 1.3], [0.0, 0.0, 1.0]], dtype=torch.float64)
    return Camera(K, torch.eye(4, dtype=torch.float64), height, width)


def _rays(camera: Camera) -> np.ndarray:
    rows, cols = np.meshgrid(np.arange(camera.height) + 0.5, np.arange(camera.width) + 0.5, indexing="ij")
    pixels = np.stack([cols, rows, np.ones_like(rows)], axis=-1)
    return pixels @ np.linalg.inv(camera.intrinsics.numpy()).T  # z = 1


def _angle_degrees(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.degrees(np.arccos(np.clip((a * b).sum(-1), -1.0, 1.0)))


def test_tilted_plane_normals_exact():
    camera = _camera(40, 50)
    normal = np.array([0.3, -0.4, -1.0])
    normal /= np.linalg.norm(normal)  # faces the camera (negative z)
    offset = -2.0  # plane n . X = offset, in front of the camera
    rays = _rays(camera)
    depth = (offset / (rays @ normal)).astype(np.float32)
    assert (depth > 0).all()
    depth[10, 10] = 0.0  # a hole: excluded from its neighbours' fits, undefined itself
    normals = normals_from_depth_plane_fit(depth, camera, window=5)
    assert normals.shape == (40, 50, 3) and normals.dtype == np.float32
    assert (normals[10, 10] == 0).all()
    defined = np.abs(normals).sum(-1) > 0
    assert defined.sum() == 40 * 50 - 1
    assert _angle_degrees(normals[defined], normal).max() < 1.0


def test_sphere_and_box_edges():
    camera = _camera(48, 64, f=50.0)
    rays = _rays(camera)
    # Sphere of radius 1 at distance 3: the ray-sphere intersection, background wall at 6 m elsewhere.
    centre = np.array([0.0, 0.0, 3.0])
    directions = rays / np.linalg.norm(rays, axis=-1, keepdims=True)
    b = directions @ centre
    disc = b**2 - (centre @ centre - 1.0)
    hit = disc > 0
    distance = np.where(hit, b - np.sqrt(np.maximum(disc, 0)), 0.0)
    depth = np.where(hit, distance * directions[..., 2], 6.0).astype(np.float32)
    normals = normals_from_depth_plane_fit(depth, camera, window=5)
    surface = directions * distance[..., None]
    truth = (surface - centre) / 1.0
    # Away from the silhouette (where the sphere is steep and the fit window is one-sided) the fit is close.
    interior = hit & (disc > 0.3 * disc.max())
    assert interior.sum() > 50
    assert np.median(_angle_degrees(normals[interior], truth[interior])) < 2.0
    assert np.percentile(_angle_degrees(normals[interior], truth[interior]), 95) < 6.0
    # The wall behind stays flat right up to the silhouette: the depth gate keeps the sphere out of its fits.
    wall = ~hit
    assert _angle_degrees(normals[wall], np.array([0.0, 0.0, -1.0])).max() < 1.0
    # All defined normals are unit and face the camera.
    defined = np.abs(normals).sum(-1) > 0
    assert np.allclose(np.linalg.norm(normals[defined], axis=-1), 1.0, atol=1e-5)
    assert ((normals * surface).sum(-1)[hit & defined] < 0).all()

    # A convex box edge: the face z = 2 (left) meets the face z = 2 + 0.5 x (right) along the line x = 0, z = 2;
    # the ray enters the box through the farther of the two planes.
    slope = 0.5
    face_normal = np.array([slope, 0.0, -1.0]) / np.linalg.norm([slope, 0.0, -1.0])
    depth_front = np.full(rays.shape[:2], 2.0)
    depth_side = -2.0 / (slope * rays[..., 0] - 1.0)
    depth_box = np.maximum(depth_front, depth_side).astype(np.float32)
    normals_box = normals_from_depth_plane_fit(depth_box, camera, window=5)
    edge_column = int(np.argmax(depth_side[24] > depth_front[24]))
    front_face, side_face = normals_box[:, : edge_column - 3], normals_box[:, edge_column + 3 :]
    assert _angle_degrees(front_face, np.array([0.0, 0.0, -1.0])).max() < 1.0
    assert _angle_degrees(side_face, face_normal).max() < 1.0
    # At the crease the fit blends the faces: the normal lies between them.
    crease = normals_box[24, edge_column]
    assert 0.0 < crease[0] < face_normal[0]
