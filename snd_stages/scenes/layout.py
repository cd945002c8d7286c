"""The on-disk scene layout: ScanNet++ DSLR as FiT3D / Splat-and-Distill prepare it. Reader and writer.

One reader serves real ScanNet++ and the generated demo scenes, which are written in the same layout::

    <root>/
      metadata/nvs_sem_train.txt          scene ids, one per line (optional; FiT3D's split files)
      metadata/nvs_sem_val.txt
      scenes/<scene_id>/
        transforms_train.json             nerfstudio: fl_x, fl_y, cx, cy, w, h, camera_model, frames[...]
        images/<file_path>                undistorted RGB (ScanNet++: DSC01234.JPG, downscaled x2 to 876x584)
        instance_segmentation/<file_path>.png   instance ids (8- or 16-bit PNG), 0 = unlabelled
        depth/<file_path>.png             optional: uint16 depth in millimetres, 0 = invalid (FiT3D's renders)
        semantic_segmentation/<file_path>.png   optional: class ids (16-bit PNG)
        normals/<file_path>.png           optional: camera-frame unit normals as RGB = (n + 1) / 2 * 255

Frames are ``transforms_train.json["frames"]`` sorted by the number in their file name (then by name), which is
the order the reference sampler counts frame gaps in. Poses there are nerfstudio/OpenGL camera-to-world; they
are converted to OpenCV world-to-camera (the camera's y and z axes flip, the world frame is kept).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import DataError
from ..geometry import (
    Camera,
    check_rigid,
    opencv_world_to_camera_to_opengl_camera_to_world,
    opengl_camera_to_world_to_opencv_world_to_camera,
)
from ..store import file_stamp, hash_json

TRANSFORMS = "transforms_train.json"
SPLIT_FILES = {"train": "nvs_sem_train.txt", "val": "nvs_sem_val.txt"}
DEPTH_SCALE = 1000.0  # depth PNGs hold millimetres
IGNORE_LABEL = 255  # the semantic class of pixels that no metric counts (unlabelled, or outside the class list)
_DISTORTION_KEYS = ("k1", "k2", "k3", "k4", "p1", "p2")
# Focal lengths (pixels) per pixel of image extent that give 179 and 1 degrees of field of view.
FOCAL_RANGE = (0.5 / math.tan(math.radians(179 / 2)), 0.5 / math.tan(math.radians(1 / 2)))
_MASK_FIX = "set masks.source to felzenszwalb or slic, which need only the images"


@dataclass(frozen=True)
class Frame:
    """One frame of a scene: its name in ``transforms_train.json`` and the number parsed from it."""

    name: str
    number: int
    is_bad: bool


@dataclass(frozen=True)
class Scene:
    """A posed image sequence in the ScanNet++ layout.

    Attributes:
        scene_id: folder name under ``scenes/``.
        directory: the scene folder.
        frames: sorted by file number.
        camera: ``[F]`` cameras (float64), in pixels of the stored images.
    """

    scene_id: str
    directory: Path
    frames: tuple[Frame, ...]
    camera: Camera

    def __len__(self) -> int:
        return len(self.frames)

    def path(self, kind: str, index: int) -> Path:
        """The file of frame ``index`` in the folder ``kind`` (``images``, ``depth``, ``normals``, ...)."""
        name = self.frames[index].name
        if kind == "images":
            return self.directory / "images" / name
        return self.directory / kind / f"{name}.png"

    def has(self, kind: str) -> bool:
        """Whether the scene has the annotation folder ``kind`` (depth, instance_segmentation, ...)."""
        return (self.directory / kind).is_dir()

    def load_image(self, index: int) -> np.ndarray:
        """``[H, W, 3]`` uint8 RGB."""
        image = _open_image(self.path("images", index), "RGB")
        self._check_size(image.shape[:2], self.path("images", index), "image")
        return image

    def load_depth(self, index: int) -> np.ndarray:
        """``[H, W]`` float32 metres, 0 where invalid."""
        path = self.path("depth", index)
        raw = _open_image(path, None)
        if raw.ndim != 2 or raw.dtype != np.uint16:
            raise DataError(f"{path}: depth must be a single-channel 16-bit PNG of millimetres, got {raw.dtype} {raw.shape}")
        self._check_size(raw.shape, path, "depth")
        measured = raw[raw > 0]
        if measured.size and (measured == np.iinfo(np.uint16).max).all():
            raise DataError(f"{path}: every depth pixel is 65535 mm, the format's largest value: a fill value or "
                            "saturated render, not a measurement; regenerate it (0 marks pixels without depth)")
        return raw.astype(np.float32) / DEPTH_SCALE

    def load_instances(self, index: int) -> np.ndarray:
        """``[H, W]`` int64 instance ids, 0 = unlabelled.

        A map with no labelled pixel at all is refused: as a mask it would make the whole frame one segment,
        which is what an empty or failed export looks like, not a real annotation.
        """
        labels = self._load_labels("instance_segmentation", index, fix=_MASK_FIX)
        if not labels.any():
            raise DataError(
                f"{self.path('instance_segmentation', index)}: instance mask has no labelled pixel (all 0 = "
                f"unlabelled); regenerate it, or {_MASK_FIX}"
            )
        return labels

    def load_semantics(self, index: int) -> np.ndarray:
        """``[H, W]`` int64 semantic class ids."""
        return self._load_labels("semantic_segmentation", index)

    def load_normals(self, index: int) -> np.ndarray:
        """``[H, W, 3]`` float32 unit normals in the OpenCV camera frame; (0, 0, 0) where unknown."""
        path = self.path("normals", index)
        encoded = _open_image(path, "RGB").astype(np.float32)
        self._check_size(encoded.shape[:2], path, "normals")
        normals = encoded / 255.0 * 2.0 - 1.0
        length = np.linalg.norm(normals, axis=-1, keepdims=True)
        valid = encoded.any(axis=-1, keepdims=True)
        return np.where(valid, normals / np.maximum(length, 1e-6), 0.0).astype(np.float32)

    def _load_labels(self, kind: str, index: int, fix: str | None = None) -> np.ndarray:
        path = self.path(kind, index)
        labels = _open_image(path, None, fix)
        if labels.ndim != 2:
            raise DataError(f"{path}: {kind} must be a single-channel PNG of integer ids, got shape {labels.shape}")
        self._check_size(labels.shape, path, kind)
        return labels.astype(np.int64)

    def _check_size(self, shape, path: Path, what: str) -> None:
        if tuple(shape) != (self.camera.height, self.camera.width):
            raise DataError(
                f"{path}: {what} is {shape[0]}x{shape[1]} but {self.directory / TRANSFORMS} describes "
                f"{self.camera.height}x{self.camera.width} images; regenerate the file at the image size"
            )


def _open_image(path: Path, mode: str | None, fix: str | None = None) -> np.ndarray:
    if not path.is_file():
        raise DataError(
            f"missing file {path}; every frame in {TRANSFORMS} needs it: "
            f"{fix or f'restore it, or remove the frame from {TRANSFORMS}'}"
        )
    try:
        with Image.open(path) as image:
            image.load()
            if mode == "RGB" and image.mode.startswith("I;16"):
                # Pillow's convert clips 16-bit grey to 255 (a white image); keep the high byte, as Pillow does
                # for 16-bit RGB
                grey = (np.array(image).astype(np.uint16) >> 8).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=-1)
            if mode == "RGB" and image.mode in ("I", "F"):
                raise DataError(f"{path}: a {image.mode} ({'32-bit integer' if image.mode == 'I' else 'float'}) "
                                "image is not a colour photograph; save it as 8- or 16-bit RGB")
            if mode is not None and image.mode != mode:
                image = image.convert(mode)
            return np.array(image)
    except PermissionError as error:
        raise DataError(f"cannot read image {path}: permission denied ({error.strerror}); make it readable "
                        f"(chmod +r)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(
            f"cannot read image {path} ({error}); the file is truncated or not an image: replace it with an intact copy"
        ) from None


def frame_number(name: str) -> int:
    """The first run of digits in ``name`` (``DSC01234.JPG`` -> 1234), or -1 if there is none."""
    match = re.search(r"\d+", Path(name).name)
    return int(match.group()) if match else -1


def expected_layout(root: Path) -> str:
    return (
        f"expected the ScanNet++ layout {root}/scenes/<scene_id>/{TRANSFORMS} with images/ and "
        "instance_segmentation/ beside it (see snd_stages/scenes/layout.py)"
    )


def list_scene_ids(root: Path, split: str = "all") -> list[str]:
    """Scene ids under ``root``: from ``metadata/nvs_sem_{split}.txt`` if present, else every scene folder.

    Args:
        split: ``"train"``, ``"val"`` or ``"all"``.
    """
    root = Path(root)
    scenes_dir = root / "scenes"
    if root.exists() and not root.is_dir():
        raise DataError(f"dataset root {root} is a file, not a folder; set data.root to the dataset's folder; "
                        f"{expected_layout(root)}")
    if not root.is_dir():
        raise DataError(
            f"dataset root {root} does not exist; set data.root (for the demo scenes run snd make-demo-data first); "
            f"{expected_layout(root)}"
        )
    if not scenes_dir.is_dir():
        raise DataError(f"dataset root {root} has no scenes/ folder; {expected_layout(root)}")
    present = sorted(p.name for p in scenes_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if split == "all":
        ids = present
    else:
        if split not in SPLIT_FILES:
            raise DataError(f"unknown split {split!r}; choose one of {sorted(SPLIT_FILES) + ['all']}")
        split_file = root / "metadata" / SPLIT_FILES[split]
        if not split_file.is_file():
            raise DataError(f"split file {split_file} is missing; write the scene ids of the '{split}' split there "
                            "or use split 'all'")
        ids = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
        missing = [scene for scene in ids if scene not in present]
        if missing:
            raise DataError(f"{split_file} lists scenes that are not under {scenes_dir}: {missing[:5]}")
    if not ids and split != "all":
        raise DataError(f"{split_file} lists no scenes: the '{split}' split is empty; write its scene ids there, one "
                        "per line")
    if not ids:
        raise DataError(f"no scenes found under {scenes_dir}; {expected_layout(root)}")
    return ids


def read_scene(root: Path, scene_id: str) -> Scene:
    """Read a scene's frame list and cameras (images are loaded lazily)."""
    directory = Path(root) / "scenes" / scene_id
    transforms_path = directory / TRANSFORMS
    if not transforms_path.is_file():
        raise DataError(f"scene {scene_id}: {transforms_path} is missing; {expected_layout(Path(root))}")
    try:
        meta = json.loads(transforms_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise DataError(f"{transforms_path} is not UTF-8 text ({error.reason} at byte {error.start}); save it as "
                        "UTF-8") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{transforms_path} is not valid JSON: {error}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("frames"), list) or not meta["frames"]:
        raise DataError(f"{transforms_path} must hold a non-empty 'frames' list")
    if not (directory / "images").is_dir():
        raise DataError(f"scene {scene_id}: {directory / 'images'} is missing; {expected_layout(Path(root))}")

    camera_model = meta.get("camera_model", "PINHOLE")
    distortion = {}
    for key in _DISTORTION_KEYS:
        try:
            value = float(meta.get(key, 0.0) or 0.0)
        except (TypeError, ValueError):
            raise DataError(f"{transforms_path}: distortion coefficient {key} = {meta[key]!r} is not a number; "
                            "write the undistorted images' transforms (coefficients 0 or absent)") from None
        if value != 0:
            distortion[key] = meta[key]
    if camera_model not in ("PINHOLE", "SIMPLE_PINHOLE", "OPENCV") or distortion:
        raise DataError(
            f"{transforms_path}: camera_model {camera_model!r} with distortion {distortion or 'none'}; snd reads "
            "undistorted pinhole images: run the ScanNet++ toolkit's dslr undistort step (as FiT3D does) first"
        )

    width, height = _image_size(meta, directory, transforms_path)
    frames, intrinsics, world_to_camera = [], [], []
    listed: dict[str, int] = {}
    for position, entry in enumerate(meta["frames"]):
        where = f"{transforms_path} frames[{position}]"
        name = _frame_name(entry, where)
        if name in listed:
            raise DataError(f"{where}: file_path {name!r} is listed twice (also frames[{listed[name]}]), so one of "
                            f"them has another frame's pose; list each frame once in {TRANSFORMS}")
        listed[name] = position
        label, fix = f"{where} ({name}) transform_matrix", f"correct the pose or remove the frame from {TRANSFORMS}"
        try:
            pose = np.asarray(entry.get("transform_matrix"), dtype=np.float64)
        except (TypeError, ValueError):
            raise DataError(f"{label}: expected a 4x4 list of numbers; {fix}") from None
        try:
            check_rigid(pose, label)
        except ValueError as error:
            raise DataError(f"{error}; {fix}") from None
        K = _intrinsics(entry, meta, where, width, height)
        if not (0 < K[0, 2] < width and 0 < K[1, 2] < height):
            raise DataError(
                f"{where} ({name}): principal point (cx, cy) = ({K[0, 2]:g}, {K[1, 2]:g}) lies outside the "
                f"{width}x{height} images, so the intrinsics are for another image size; use the transforms file "
                "written for these (downscaled) images"
            )
        intrinsics.append(K)
        world_to_camera.append(opengl_camera_to_world_to_opencv_world_to_camera(pose))
        is_bad = entry.get("is_bad", False)
        if not isinstance(is_bad, bool):
            raise DataError(f"{where} ({name}): is_bad = {is_bad!r} must be true or false (a JSON boolean, not a "
                            "string or number)")
        frames.append(Frame(name=name, number=frame_number(name), is_bad=is_bad))

    order = sorted(range(len(frames)), key=lambda i: (frames[i].number, frames[i].name))
    camera = Camera(
        intrinsics=torch.from_numpy(np.stack([intrinsics[i] for i in order])),
        world_to_camera=torch.from_numpy(np.stack([world_to_camera[i] for i in order])),
        height=height,
        width=width,
    )
    return Scene(scene_id, directory, tuple(frames[i] for i in order), camera)


def _frame_name(entry: Any, where: str) -> str:
    """A frame's image name relative to the scene's ``images/`` folder, refusing names that leave it."""
    name = entry.get("file_path") if isinstance(entry, dict) else None
    if not isinstance(name, str) or not name:
        raise DataError(f"{where}: 'file_path' is missing")
    name = name.removeprefix("images/")  # nerfstudio writers sometimes keep the folder in file_path
    parts = PurePosixPath(name).parts
    if PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name or not parts:
        raise DataError(f"{where}: file_path {name!r} leaves the scene's images/ folder; write names relative to it, "
                        "e.g. DSC01234.JPG")
    return name


def _image_size(meta: dict, directory: Path, transforms_path: Path) -> tuple[int, int]:
    first = _frame_name(meta["frames"][0], f"{transforms_path} frames[0]")
    image_path = directory / "images" / first
    if not image_path.is_file():
        raise DataError(f"missing file {image_path}; every frame in {transforms_path} needs its image")
    try:
        with Image.open(image_path) as image:
            width, height = image.size
    except OSError as error:
        raise DataError(f"cannot read image {image_path} ({error})") from None
    try:
        stated = (int(meta["w"]), int(meta["h"])) if "w" in meta and "h" in meta else (width, height)
    except (TypeError, ValueError):
        raise DataError(
            f"{transforms_path}: 'w' and 'h' must be integers, got {meta['w']!r} and {meta['h']!r}"
        ) from None
    if stated != (width, height):
        raise DataError(
            f"{transforms_path} says the images are {meta['w']}x{meta['h']} (w x h) but {image_path} is "
            f"{width}x{height}: the intrinsics do not match the images; use the transforms file written for "
            "these (downscaled) images"
        )
    return width, height


def _intrinsics(entry: dict, meta: dict, where: str, width: int, height: int) -> np.ndarray:
    values = {}
    for key in ("fl_x", "fl_y", "cx", "cy"):
        value = entry.get(key, meta.get(key))
        if value is None and key == "fl_y":
            value = entry.get("fl_x", meta.get("fl_x"))
        try:
            values[key] = float(value)
        except (TypeError, ValueError):
            raise DataError(f"{where}: intrinsic {key!r} is missing or not a number ({value!r})") from None
        if not np.isfinite(values[key]):
            raise DataError(f"{where}: intrinsic {key!r} is {value!r}")
    if values["fl_x"] <= 0 or values["fl_y"] <= 0:
        raise DataError(f"{where}: focal lengths must be positive, got fl_x={values['fl_x']}, fl_y={values['fl_y']}")
    for key, extent in (("fl_x", width), ("fl_y", height)):
        # between 1 and 179 degrees across the image: outside that, the value is in other units or corrupt
        if not FOCAL_RANGE[0] * extent <= values[key] <= FOCAL_RANGE[1] * extent:
            field_of_view = math.degrees(2 * math.atan(extent / (2 * values[key])))
            raise DataError(f"{where}: {key} = {values[key]:g} px gives a field of view of {field_of_view:.3g} "
                            f"degrees across {extent} pixels; expected 1 to 179 degrees (focal lengths in pixels of "
                            "these images)")
    return np.array(
        [[values["fl_x"], 0.0, values["cx"]], [0.0, values["fl_y"], values["cy"]], [0.0, 0.0, 1.0]], dtype=np.float64
    )


def dataset_fingerprint(root: Path, scene_ids: list[str]) -> str:
    """A content key of the scenes: their transforms files, and the name, size and modification time
    (:func:`~snd_stages.store.file_stamp`) of every file they hold."""
    entries = {}
    for scene_id in scene_ids:
        directory = Path(root) / "scenes" / scene_id
        files = sorted(
            (str(p.relative_to(directory)), file_stamp(p)) for p in directory.rglob("*") if p.is_file()
        )
        transforms = (directory / TRANSFORMS).read_bytes() if (directory / TRANSFORMS).is_file() else b""
        entries[scene_id] = {"transforms": hash_json(transforms.decode(errors="replace")), "files": files}
    return hash_json(entries)[:20]


# ---------------------------------------------------------------------------------------------------------------
# Writer (demo scenes and test fixtures are written in exactly the layout the reader reads)
# ---------------------------------------------------------------------------------------------------------------


def frame_file_name(index: int) -> str:
    """ScanNet++ DSLR-style name of the ``index``-th frame; PNG so the demo images are lossless."""
    return f"DSC{index + 1:05d}.png"


def write_scene(
    directory: Path,
    names: list[str],
    images: np.ndarray,
    intrinsics: np.ndarray,
    world_to_camera: np.ndarray,
    instances: np.ndarray | None = None,
    depth: np.ndarray | None = None,
    semantics: np.ndarray | None = None,
    normals: np.ndarray | None = None,
) -> None:
    """Write one scene folder in the layout above.

    Args:
        names: ``F`` file names (``images/<name>``).
        images: ``[F, H, W, 3]`` uint8 RGB.
        intrinsics: ``[3, 3]`` shared or ``[F, 3, 3]`` per-frame K in pixels.
        world_to_camera: ``[F, 4, 4]`` OpenCV world-to-camera poses (stored as nerfstudio camera-to-world).
        instances / semantics: ``[F, H, W]`` non-negative integer ids (< 65536).
        depth: ``[F, H, W]`` metres (stored as uint16 millimetres, so at most 65.535 m).
        normals: ``[F, H, W, 3]`` camera-frame unit normals.
    """
    directory = Path(directory)
    count, height, width = images.shape[:3]
    assert images.dtype == np.uint8 and images.shape[3] == 3, f"images must be [F, H, W, 3] uint8, got {images.dtype} {images.shape}"
    assert len(names) == count == len(world_to_camera), "one name and one pose per image"
    (directory / "images").mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(names):
        Image.fromarray(images[index]).save(directory / "images" / name)
        write_frame_maps(directory, name, *(None if maps is None else maps[index]
                                            for maps in (instances, depth, semantics, normals)))
    write_transforms(directory, transforms_document(intrinsics, width, height, names, world_to_camera))


def transforms_document(intrinsics: np.ndarray, width: int, height: int, names: list[str],
                        world_to_camera: np.ndarray, bad: list[bool] | None = None) -> dict:
    """``transforms_train.json`` of pinhole frames: ``intrinsics`` ``[3, 3]`` shared or ``[F, 3, 3]`` per frame,
    ``world_to_camera`` ``[F, 4, 4]`` OpenCV (stored as nerfstudio camera-to-world)."""
    per_frame_K = intrinsics.ndim == 3
    shared_K = intrinsics[0] if per_frame_K else intrinsics
    meta = {
        "camera_model": "PINHOLE",
        "fl_x": float(shared_K[0, 0]), "fl_y": float(shared_K[1, 1]),
        "cx": float(shared_K[0, 2]), "cy": float(shared_K[1, 2]),
        "w": int(width), "h": int(height),
        "frames": [],
    }
    for index, name in enumerate(names):
        entry = {
            "file_path": name,
            "transform_matrix": opencv_world_to_camera_to_opengl_camera_to_world(world_to_camera[index]).tolist(),
            "is_bad": bool(bad[index]) if bad is not None else False,
        }
        if per_frame_K:
            K = intrinsics[index]
            entry.update(fl_x=float(K[0, 0]), fl_y=float(K[1, 1]), cx=float(K[0, 2]), cy=float(K[1, 2]))
        meta["frames"].append(entry)
    return meta


def write_transforms(directory: Path, meta: dict) -> None:
    (Path(directory) / TRANSFORMS).write_text(json.dumps(meta, indent=1))


def write_frame_maps(directory: Path, name: str, instances: np.ndarray | None = None, depth: np.ndarray | None = None,
                     semantics: np.ndarray | None = None, normals: np.ndarray | None = None) -> None:
    """One frame's ``[H, W]`` ids, ``[H, W]`` depth in metres (0 = none) and ``[H, W, 3]`` camera-frame normals
    ((0, 0, 0) = none), each into its folder as ``<name>.png``."""
    if instances is not None:
        _write_map(directory / "instance_segmentation", name, _as_uint16(instances, "instances"))
    if semantics is not None:
        _write_map(directory / "semantic_segmentation", name, _as_uint16(semantics, "semantics"))
    if depth is not None:
        millimetres = np.round(np.nan_to_num(depth, nan=0.0, posinf=0.0) * DEPTH_SCALE)
        assert millimetres.max() <= 65535, "depth beyond 65.535 m does not fit uint16 millimetres"
        _write_map(directory / "depth", name, millimetres.astype(np.uint16))
    if normals is not None:
        encoded = np.round((np.clip(normals, -1, 1) + 1.0) / 2.0 * 255.0).astype(np.uint8)
        encoded[~np.isfinite(normals).all(-1) | (np.abs(normals).sum(-1) == 0)] = 0
        _write_map(directory / "normals", name, encoded)


def _as_uint16(labels: np.ndarray, what: str) -> np.ndarray:
    assert labels.min() >= 0 and labels.max() < 65536, f"{what} ids must be in [0, 65535]"
    return labels.astype(np.uint16)


def _write_map(folder: Path, name: str, values: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values).save(folder / f"{name}.png")


def write_split_files(root: Path, splits: dict[str, list[str]]) -> None:
    """FiT3D-style split lists under ``metadata/``."""
    (Path(root) / "metadata").mkdir(parents=True, exist_ok=True)
    for split, scene_ids in splits.items():
        (Path(root) / "metadata" / SPLIT_FILES[split]).write_text("".join(f"{s}\n" for s in scene_ids))
