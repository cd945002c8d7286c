"""Image pairs with depth and relative pose, for the multi-view correspondence evaluation.

Two sources:

- **ScanNet-1500** (SuperGlue's ``scannet_test_pairs_with_gt.txt``, used by LoFTR and Probe3D). Each line is::

      name0 name1 rot0 rot1 K0(9 numbers, row-major) K1(9) T_0to1(16, row-major)

  ``name`` is ``scene0707_00_frame-000015.jpg`` in SuperGlue's file (other copies write
  ``scans_test/scene0707_00/sens/frame-000015.color.jpg``); ``rot`` is an EXIF rotation code (0 in the whole
  file, and anything else is refused); ``T_0to1`` maps points from camera 0 to camera 1 coordinates
  (``inv(pose1) @ pose0`` of ScanNet's camera-to-world poses, the same as Probe3D's ``Rt_1.inverse() @ Rt_0``).
  The K in the list are ScanNet's colour intrinsics at the full 1296x968 colour resolution; they are scaled
  to the size of the stored images. Frames come from LoFTR's ``scannet_test_1500`` folder::

      <root>/<scene>/color/<frame>.jpg    RGB (640x480 in LoFTR's release)
      <root>/<scene>/depth/<frame>.png    uint16 depth in millimetres, 0 = invalid
      <root>/<scene>/pose/<frame>.txt     camera-to-world 4x4 (not needed: the list carries the relative pose)

  with ``<frame>`` the frame number without leading zeros (``frame-000015`` -> ``15``).

- **Any posed RGB-D scene in the snd layout** (:func:`pairs_from_scene`), e.g. the held-out demo scenes.

Every pair is expressed in camera 0's frame: ``camera0.world_to_camera`` is the identity and
``camera1.world_to_camera`` is ``T_0to1``, so a point ``X`` in camera 0 coordinates projects into view 1 with
``K1 (R X + t)``.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import numpy as np
import torch
from PIL import Image

from ..errors import DataError
from ..geometry import Camera, check_rigid, rotation_angle_degrees
from ..store import file_stamp
from .layout import DEPTH_SCALE, Scene

# ScanNet's colour frames are 1296x968 (w x h); SuperGlue's list gives K at that size.
SCANNET_COLOR_SIZE = (968, 1296)  # (height, width)
# ScanNet's calibration puts pixel centres at integer coordinates (OpenCV); snd puts them at +0.5.
SCANNET_PIXEL_CENTER_SHIFT = 0.5
_FIELDS_PER_LINE = 38
_SCENE_PATTERN = re.compile(r"(scene\d{4}_\d{2})")
_FRAME_PATTERN = re.compile(r"frame-(\d+)")

ImageSource = Union[np.ndarray, Callable[[], np.ndarray]]


@dataclass(frozen=True)
class CorrespondencePair:
    """Two RGB-D views of one scene with known relative pose.

    Attributes:
        name: ``"<scene>/<frame0>-<frame1>"``.
        image0, image1: ``[H, W, 3]`` uint8 RGB, or zero-argument callables that load it.
        depth0, depth1: ``[H, W]`` float32 metres (0 = invalid), or zero-argument callables that load it.
        camera0: unbatched float64 camera of view 0, identity world-to-camera (the world is camera 0's frame).
        camera1: unbatched float64 camera of view 1, world-to-camera = ``T_0to1``.
        rotation_degrees: angle of the relative rotation between the views, in degrees.
    """

    name: str
    image0: ImageSource
    image1: ImageSource
    depth0: ImageSource
    depth1: ImageSource
    camera0: Camera
    camera1: Camera
    rotation_degrees: float

    def load_image(self, view: int) -> np.ndarray:
        """``[H, W, 3]`` uint8 RGB of view 0 or 1."""
        return _resolve((self.image0, self.image1)[_check_view(view)])

    def load_depth(self, view: int) -> np.ndarray:
        """``[H, W]`` float32 metres of view 0 or 1, 0 where invalid."""
        return _resolve((self.depth0, self.depth1)[_check_view(view)])

    @property
    def relative_pose(self) -> torch.Tensor:
        """``[4, 4]`` T_0to1: camera-0 coordinates -> camera-1 coordinates."""
        return self.camera1.world_to_camera @ torch.linalg.inv(self.camera0.world_to_camera)


def _check_view(view: int) -> int:
    if view not in (0, 1):
        raise ValueError(f"a pair has views 0 and 1, got {view!r}")
    return view


def _resolve(source: ImageSource) -> np.ndarray:
    return source() if callable(source) else source


def _nearest_rotation(matrix: np.ndarray) -> np.ndarray:
    """The rotation closest to ``matrix`` (SVD projection onto SO(3))."""
    u, _, vt = np.linalg.svd(matrix)
    rotation = u @ vt
    if np.linalg.det(rotation) < 0:
        u[:, -1] *= -1
        rotation = u @ vt
    return rotation


# ---------------------------------------------------------------------------------------------------------------
# ScanNet-1500
# ---------------------------------------------------------------------------------------------------------------


def read_scannet1500(
    pairs_txt: str | Path,
    root: str | Path,
    intrinsics_size: tuple[int, int] = SCANNET_COLOR_SIZE,
) -> list[CorrespondencePair]:
    """Read SuperGlue's ScanNet test pair list and locate its frames under LoFTR's ``scannet_test_1500`` folder.

    Images and depth are loaded lazily; their sizes are read from the file headers here.

    Args:
        pairs_txt: ``scannet_test_pairs_with_gt.txt``.
        root: the ``scannet_test_1500`` folder (``<root>/<scene>/{color,depth}/``).
        intrinsics_size: ``(height, width)`` of the images the list's K refer to (ScanNet colour frames).

    Returns:
        One :class:`CorrespondencePair` per line, in file order.
    """
    pairs_txt, root = Path(pairs_txt), Path(root)
    if not pairs_txt.is_file():
        raise DataError(f"ScanNet-1500 pair list {pairs_txt} is missing; it is SuperGlue's "
                        "assets/scannet_test_pairs_with_gt.txt")
    if not root.is_dir():
        raise DataError(f"ScanNet-1500 folder {root} is missing; expected LoFTR's scannet_test_1500 with "
                        "<scene>/color/<frame>.jpg and <scene>/depth/<frame>.png")
    sizes: dict[Path, tuple[int, int]] = {}
    pairs = []
    for line_number, line in enumerate(pairs_txt.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{pairs_txt} line {line_number}"
        fields = line.split()
        if len(fields) != _FIELDS_PER_LINE:
            raise DataError(
                f"{where}: expected {_FIELDS_PER_LINE} fields (name0 name1 rot0 rot1 K0[9] K1[9] T_0to1[16]), "
                f"got {len(fields)}"
            )
        try:
            numbers = np.array([float(value) for value in fields[2:]], dtype=np.float64)
        except ValueError as error:
            raise DataError(f"{where}: {error}; fields 3..38 must be numbers") from None
        if not np.isfinite(numbers).all():
            raise DataError(f"{where}: NaN or inf among the numbers")
        if numbers[0] != 0 or numbers[1] != 0:
            raise DataError(f"{where}: EXIF rotations {int(numbers[0])} {int(numbers[1])} are not supported "
                            "(ScanNet frames are upright: both must be 0)")
        K0 = numbers[2:11].reshape(3, 3)
        K1 = numbers[11:20].reshape(3, 3)
        T_0to1 = numbers[20:36].reshape(4, 4)
        for label, K in (("K0", K0), ("K1", K1)):
            if K[0, 0] <= 0 or K[1, 1] <= 0 or not np.allclose(K[2], (0.0, 0.0, 1.0)):
                raise DataError(f"{where}: {label} = {K.reshape(-1).tolist()} is not a pinhole intrinsics matrix "
                                "(positive focal lengths, last row 0 0 1)")
        try:
            check_rigid(T_0to1, f"{where} T_0to1")
        except ValueError as error:
            raise DataError(str(error)) from None
        # The list keeps 5 decimals; snap the rotation back onto SO(3) so inverses stay exact.
        T_0to1 = T_0to1.copy()
        T_0to1[:3, :3] = _nearest_rotation(T_0to1[:3, :3])

        views = []
        for name, K in ((fields[0], K0), (fields[1], K1)):
            scene, frame = _scene_and_frame(name, where)
            color = root / scene / "color" / f"{frame}.jpg"
            depth = root / scene / "depth" / f"{frame}.png"
            color_size = _image_size(color, where, sizes)
            depth_size = _image_size(depth, where, sizes)
            if color_size != depth_size:
                raise DataError(
                    f"{where}: {color} is {color_size[1]}x{color_size[0]} but {depth} is {depth_size[1]}x"
                    f"{depth_size[0]} (w x h); use LoFTR's scannet_test_1500 export, where both are 640x480"
                )
            views.append((scene, frame, color, depth, _scale_scannet_intrinsics(K, intrinsics_size, color_size)))
        (scene0, frame0, color0, depth0, K0_px), (scene1, frame1, color1, depth1, K1_px) = views
        if scene0 != scene1:
            raise DataError(f"{where}: the two frames are from different scenes ({scene0}, {scene1})")
        height, width = sizes[color0]
        height1, width1 = sizes[color1]
        camera0 = Camera(torch.from_numpy(K0_px), torch.eye(4, dtype=torch.float64), height, width)
        camera1 = Camera(torch.from_numpy(K1_px), torch.from_numpy(T_0to1), height1, width1)
        pairs.append(
            CorrespondencePair(
                name=f"{scene0}/{frame0}-{frame1}",
                image0=functools.partial(_load_rgb, color0),
                image1=functools.partial(_load_rgb, color1),
                depth0=functools.partial(_load_depth_mm, depth0),
                depth1=functools.partial(_load_depth_mm, depth1),
                camera0=camera0,
                camera1=camera1,
                rotation_degrees=rotation_angle_degrees(T_0to1[:3, :3]),
            )
        )
    if not pairs:
        raise DataError(f"{pairs_txt} lists no pairs")
    return pairs


def _scene_and_frame(name: str, where: str) -> tuple[str, str]:
    scene = _SCENE_PATTERN.search(name)
    frame = _FRAME_PATTERN.search(name)
    if scene is None or frame is None:
        raise DataError(
            f"{where}: cannot parse scene and frame from {name!r}; expected names like "
            "scene0707_00_frame-000015.jpg or scans_test/scene0707_00/sens/frame-000015.color.jpg"
        )
    return scene.group(1), str(int(frame.group(1)))


def _scale_scannet_intrinsics(K: np.ndarray, from_size: tuple[int, int], to_size: tuple[int, int]) -> np.ndarray:
    """K given at ``from_size`` (OpenCV pixel centres) -> K in snd's convention at ``to_size`` (both (h, w))."""
    K = np.asarray(K, dtype=np.float64).copy()
    K[0, 2] += SCANNET_PIXEL_CENTER_SHIFT
    K[1, 2] += SCANNET_PIXEL_CENTER_SHIFT
    K[0] *= to_size[1] / from_size[1]
    K[1] *= to_size[0] / from_size[0]
    K[2] = (0.0, 0.0, 1.0)
    return K


def _image_size(path: Path, where: str, cache: dict[Path, tuple[int, int]]) -> tuple[int, int]:
    if path not in cache:
        if not path.is_file():
            raise DataError(f"{where}: {path} is missing; expected <root>/<scene>/color/<frame>.jpg and "
                            "<root>/<scene>/depth/<frame>.png (LoFTR's scannet_test_1500 layout)")
        try:
            with Image.open(path) as image:
                width, height = image.size
        except OSError as error:
            raise DataError(f"{where}: cannot read {path} ({error})") from None
        cache[path] = (height, width)
    return cache[path]


def _load_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except OSError as error:
        raise DataError(f"cannot read image {path} ({error}); the file is truncated or not an image") from None


def _load_depth_mm(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            raw = np.array(image)
    except OSError as error:
        raise DataError(f"cannot read depth {path} ({error}); the file is truncated or not an image") from None
    if raw.ndim != 2 or raw.dtype not in (np.uint16, np.int32, np.uint8):
        raise DataError(
            f"{path}: depth must be a single-channel 16-bit PNG of millimetres, got {raw.dtype} {raw.shape}"
        )
    return raw.astype(np.float32) / DEPTH_SCALE


# ---------------------------------------------------------------------------------------------------------------
# Posed RGB-D scenes in the snd layout
# ---------------------------------------------------------------------------------------------------------------


def pairs_from_scene(scene: Scene, count: int, min_gap: int, max_gap: int, seed: int) -> list[CorrespondencePair]:
    """Seeded pairs of frames of a posed RGB-D scene, expressed in the first frame's camera.

    All frame pairs ``(i, j)`` with ``min_gap <= j - i <= max_gap`` (positions in the scene's sorted frame list)
    and neither frame marked bad are candidates; ``count`` of them are drawn without replacement (all of them
    when there are fewer) and returned sorted by position.

    Args:
        scene: a scene with a ``depth/`` folder.
        count: number of pairs wanted.
        min_gap, max_gap: inclusive range of the frame gap, ``1 <= min_gap <= max_gap``.
        seed: seed of the draw; the same seed and scene give the same pairs.
    """
    if count < 1:
        raise DataError(f"pair count must be at least 1, got {count}")
    if not 1 <= min_gap <= max_gap:
        raise DataError(f"frame gaps must satisfy 1 <= min_gap <= max_gap, got min_gap={min_gap}, max_gap={max_gap}")
    if not scene.has("depth"):
        raise DataError(f"scene {scene.scene_id}: {scene.directory / 'depth'} is missing; correspondence pairs need "
                        "depth maps (uint16 millimetre PNGs)")
    usable = [not frame.is_bad for frame in scene.frames]
    candidates = [
        (i, j)
        for i in range(len(scene))
        for j in range(i + min_gap, min(i + max_gap, len(scene) - 1) + 1)
        if usable[i] and usable[j]
    ]
    if not candidates:
        raise DataError(
            f"scene {scene.scene_id} has {len(scene)} frames: no pair of good frames is {min_gap}..{max_gap} frames "
            "apart; lower min_gap"
        )
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(candidates), size=min(count, len(candidates)), replace=False)
    pairs = []
    for i, j in sorted(candidates[k] for k in chosen):
        world_to_camera0 = scene.camera.world_to_camera[i].to(torch.float64)
        world_to_camera1 = scene.camera.world_to_camera[j].to(torch.float64)
        T_0to1 = world_to_camera1 @ torch.linalg.inv(world_to_camera0)
        height, width = scene.camera.height, scene.camera.width
        pairs.append(
            CorrespondencePair(
                name=f"{scene.scene_id}/{scene.frames[i].name}-{scene.frames[j].name}",
                image0=functools.partial(scene.load_image, i),
                image1=functools.partial(scene.load_image, j),
                depth0=functools.partial(scene.load_depth, i),
                depth1=functools.partial(scene.load_depth, j),
                camera0=Camera(scene.camera.intrinsics[i].to(torch.float64), torch.eye(4, dtype=torch.float64),
                               height, width),
                camera1=Camera(scene.camera.intrinsics[j].to(torch.float64), T_0to1, height, width),
                rotation_degrees=rotation_angle_degrees(T_0to1[:3, :3].numpy()),
            )
        )
    return pairs


def scannet1500_identity(pairs_file: Path, root: Path) -> dict:
    """What the ScanNet-1500 pairs are read from: the pairs file's sha256 and each colour image's name, size and
    time."""
    colour_files = sorted((str(p.relative_to(root)), file_stamp(p))
                          for p in Path(root).glob("*/color/*") if p.is_file())
    return {"pairs_file_sha256": hashlib.sha256(Path(pairs_file).read_bytes()).hexdigest(),
            "colour_files": colour_files}
