"""The official ScanNet++ release -> the FiT3D / Splat-and-Distill layout of :mod:`snd_stages.scenes.layout`.

One scene at a time, from the release's files (never modified)::

    <raw>/splits/nvs_sem_{train,val}.txt, <raw>/metadata/semantic_benchmark/{top100.txt, map_benchmark.csv}
    <raw>/data/<scene>/dslr/resized_images/*.JPG, resized_anon_masks/*.png       fisheye, OpenCV's model
    <raw>/data/<scene>/dslr/nerfstudio/transforms.json, colmap/{cameras,images,points3D}.txt
    <raw>/data/<scene>/scans/mesh_aligned_0.05.ply, segments.json, segments_anno.json

1. **Frames.** ``transforms.json["frames"]`` only (the NVS test frames are never written). A frame is excluded,
   and counted by reason, if it is marked ``is_bad``, its image or COLMAP pose is missing, or its anonymisation
   mask is missing or keeps less than ``min_mask_coverage`` of the image.
2. **Images.** As FiT3D: resized to ``width`` x ``height`` (``cv2.INTER_CUBIC``), then undistorted with
   ``cv2.fisheye`` to a pinhole camera whose focal lengths are ``estimateNewCameraMatrixForUndistortRectify``'s
   (balance 0: every output pixel sees the source) and whose principal point is the image centre. The toolkit puts
   it at (w/2, h/2) in OpenCV's convention (pixel centres at integers), half a pixel off the centre; here it is
   the exact centre, (w/2, h/2) in snd's convention (pixel centres at +0.5) and (w/2 - 0.5, h/2 - 0.5) in
   OpenCV's. The resize scales K about pixel edges for the same reason. Masks follow the toolkit's rule: any
   pixel that is partly anonymised counts as anonymised.
3. **Poses.** COLMAP's world-to-camera (``images.txt``), which are in the mesh's frame. nerfstudio's poses are in
   a permuted world (x and y swapped, z negated) and are only checked against them.
4. **Renders.** open3d ray casting of ``mesh_aligned_0.05.ply`` at the pinhole cameras, one ray through each
   pixel centre: z-depth (uint16 mm, 0 = no hit or outside [near, far]), the hit face's normal in the camera
   frame (facing the camera), and the face's instance and class.
5. **Labels.** A vertex takes the ``objectId`` of the annotation groups whose ``segments`` hold its segment
   (``segments.json`` ``segIndices``); a later group overwrites an earlier one, as the toolkit's 2D labels do.
   Every group counts as an instance, stuff (walls, floor) too; 0 = no group. **A face takes the group its
   second and third vertices agree on, else its first vertex's** (a majority vote that falls back to the
   toolkit's first-vertex rule). Classes: the group's label, renamed by ``map_benchmark.csv``'s
   ``semantic_map_to`` (empty keeps it, ``None`` drops it), indexes the class list; anything else is
   :data:`~snd_stages.scenes.layout.IGNORE_LABEL`.

Checks (a failing check fails the scene with every reason at once; nothing of it is written):

- **poses**: every COLMAP pose is rigid, and nerfstudio's pose of the same frame, mapped back to the mesh frame,
  agrees within ``max_rotation_error_degrees`` and ``max_translation_error``; the two files' intrinsics agree;
- **masks aligned with images**: the shift (within +-(max_edge_shift + 2) px) that best lines up the instance
  maps' edges with the undistorted images' gradients must be within ``max_edge_shift`` px;
- **depth**: at the COLMAP points each frame observes, the rendered depth's median relative error against the
  points' own depth must be below ``max_depth_error``.

A scene without a mesh (NVS test scenes ship without ``scans/``) or without annotations is skipped with the reason.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import open3d as o3d
import torch
from PIL import Image

from ..config import PrepareScannetppCfg
from ..errors import DataError
from ..store import write_text_atomic
from ..geometry import (
    check_rigid,
    opengl_camera_to_world_to_opencv_world_to_camera,
    quaternion_to_rotation_matrix,
    rotation_angle_degrees,
)
from .layout import IGNORE_LABEL, SPLIT_FILES, transforms_document, write_frame_maps, write_transforms
from .raycast import pixel_rays

MESH = "scans/mesh_aligned_0.05.ply"
SEGMENTS = "scans/segments.json"
ANNOTATIONS = "scans/segments_anno.json"
NERFSTUDIO = "dslr/nerfstudio/transforms.json"
COLMAP = "dslr/colmap"
IMAGES = "dslr/resized_images"
ANON_MASKS = "dslr/resized_anon_masks"
REPORT = "prepare_report.json"
# The release's nerfstudio world is the mesh's with x and y swapped and z negated; the matrix is its own inverse.
NERFSTUDIO_WORLD = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, -1, 0], [0, 0, 0, 1]], dtype=np.float64)
_NO_HIT = np.iinfo(np.uint32).max  # open3d's primitive id of a ray that hits nothing
_JPEG_QUALITY = 95  # the toolkit's (OpenCV's default)
_MIN_DEPTH_POINTS = 10


class SceneSkipped(Exception):
    """The scene lacks what preparation needs (not an error in the release: NVS test scenes have no mesh)."""


@dataclass(frozen=True)
class ClassList:
    """The classes written to ``semantic_classes.txt`` and the release labels' renaming (None = dropped)."""

    names: tuple[str, ...]
    renamed: dict[str, str | None]

    def index(self, label: str) -> int:
        label = self.renamed.get(label, label)
        return self.names.index(label) if label in self.names else IGNORE_LABEL


def expected_release(raw: Path) -> str:
    return (f"expected the ScanNet++ release layout {raw}/splits/nvs_sem_train.txt and {raw}/data/<scene_id>/"
            "dslr/nerfstudio/transforms.json (the release's download folder, not a prepared one)")


def release_scene_ids(raw: Path, splits: tuple[str, ...]) -> dict[str, list[str]]:
    """Scene ids per split name, from ``<raw>/splits/<split>.txt``; a wrong root is refused."""
    raw = Path(raw)
    if not (raw / "data").is_dir() or not (raw / "splits").is_dir():
        hint = " (it holds scenes/: that is a prepared root, pass it as --out)" if (raw / "scenes").is_dir() else ""
        raise DataError(f"--raw {raw} has no data/ and splits/ folders{hint}; {expected_release(raw)}")
    ids = {}
    for split in splits:
        path = raw / "splits" / f"{split}.txt"
        if not path.is_file():
            raise DataError(f"split file {path} is missing; {expected_release(raw)}, or set prepare_scannetpp.splits "
                            "to the splits the release has")
        ids[split] = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return ids


def read_class_list(raw: Path, cfg: PrepareScannetppCfg) -> ClassList:
    path = Path(raw) / cfg.classes
    if not path.is_file():
        raise DataError(f"class list {path} is missing; download the release's metadata/ or set "
                        "prepare_scannetpp.classes to a file of class names, one per line")
    names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if not 1 <= len(names) < IGNORE_LABEL:
        raise DataError(f"{path} lists {len(names)} classes; expected 1 to {IGNORE_LABEL - 1} ({IGNORE_LABEL} marks "
                        "ignored pixels)")
    renamed: dict[str, str | None] = {}
    mapping = Path(raw) / cfg.label_mapping
    if mapping.is_file():
        with mapping.open(newline="") as handle:
            for row in csv.DictReader(handle):
                if "class" not in row or "semantic_map_to" not in row:
                    raise DataError(f"{mapping} needs the columns class and semantic_map_to (the release's "
                                    "map_benchmark.csv)")
                target = (row["semantic_map_to"] or "").strip()
                if target and target.lower() != "nan":
                    renamed[row["class"]] = None if target == "None" else target
    return ClassList(names, renamed)


@dataclass(frozen=True)
class _Colmap:
    camera: tuple[str, int, int, np.ndarray]  # model, width, height, params
    world_to_camera: dict[str, np.ndarray]
    image_ids: dict[str, int]
    points: np.ndarray  # [P, 3]
    observed: dict[int, np.ndarray]  # per image id, the indices of the points it observes


def _read_colmap(folder: Path) -> _Colmap:
    for name in ("cameras.txt", "images.txt", "points3D.txt"):
        if not (folder / name).is_file():
            raise DataError(f"{folder / name} is missing; the release's dslr/colmap/ holds cameras.txt, images.txt "
                            "and points3D.txt: download dslr_colmap_dir")
    cameras = [line.split() for line in (folder / "cameras.txt").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    if len(cameras) != 1:
        raise DataError(f"{folder / 'cameras.txt'} holds {len(cameras)} cameras; the DSLR has exactly one")
    _, model, width, height, *params = cameras[0]
    lines = [line for line in (folder / "images.txt").read_text().splitlines() if not line.startswith("#")]
    world_to_camera, image_ids = {}, {}
    for line in lines[::2]:  # every image has a line of pose and a line of 2D points
        fields = line.split()
        if len(fields) < 10:
            continue
        quaternion = torch.tensor([float(value) for value in fields[1:5]], dtype=torch.float64)
        pose = np.eye(4)
        pose[:3, :3] = quaternion_to_rotation_matrix(quaternion).numpy()
        pose[:3, 3] = [float(value) for value in fields[5:8]]
        name = fields[9].split("/")[-1]  # unreleased data carried a dslr/ prefix
        world_to_camera[name], image_ids[name] = pose, int(fields[0])
    points, observations = [], {}
    for line in (folder / "points3D.txt").read_text().splitlines():
        fields = line.split()
        if not fields or line.startswith("#"):
            continue
        for image_id in fields[8::2]:  # the track: (image id, 2D point index) pairs
            observations.setdefault(int(image_id), []).append(len(points))
        points.append([float(value) for value in fields[1:4]])
    observed = {image_id: np.array(indices, dtype=np.int64) for image_id, indices in observations.items()}
    return _Colmap((model, int(width), int(height), np.array(params, dtype=np.float64)), world_to_camera, image_ids,
                   np.array(points, dtype=np.float64).reshape(-1, 3), observed)


@dataclass(frozen=True)
class PinholeCamera:
    """The prepared frames' camera: ``intrinsics`` in snd's convention, the undistortion maps in OpenCV's."""

    intrinsics: np.ndarray
    width: int
    height: int
    map_x: np.ndarray
    map_y: np.ndarray


def undistortion(fisheye: np.ndarray, coefficients: np.ndarray, source_size: tuple[int, int],
                 size: tuple[int, int]) -> PinholeCamera:
    """The pinhole camera of images resized from ``source_size`` to ``size`` (width, height) and undistorted.

    ``fisheye`` is the release's K in OpenCV's convention at ``source_size``.
    """
    (source_width, source_height), (width, height) = source_size, size
    scale = np.array([width / source_width, height / source_height])
    resized = fisheye.astype(np.float64).copy()
    resized[:2, :2] *= scale[:, None]
    resized[:2, 2] = (fisheye[:2, 2] + 0.5) * scale - 0.5  # scaled about pixel edges, as cv2.resize samples
    pinhole = cv2.fisheye.estimateNewCameraMatrixForUndistortRectify(resized, coefficients, (width, height),
                                                                     np.eye(3), balance=0.0)
    pinhole[0, 2], pinhole[1, 2] = width / 2 - 0.5, height / 2 - 0.5  # the centre, in OpenCV's convention
    map_x, map_y = cv2.fisheye.initUndistortRectifyMap(resized, coefficients, np.eye(3), pinhole, (width, height),
                                                       cv2.CV_32FC1)
    intrinsics = pinhole.copy()
    intrinsics[0, 2], intrinsics[1, 2] = width / 2, height / 2
    return PinholeCamera(intrinsics, width, height, map_x, map_y)


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path} ({what}) is not valid JSON ({error}); download it again") from None


def _face_groups(scene_dir: Path, vertex_count: int, triangles: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    """``[T]`` index of each face's annotation group (-1 = none), and the groups."""
    segments = _read_json(scene_dir / SEGMENTS, "per-vertex segments")
    annotation = _read_json(scene_dir / ANNOTATIONS, "segment annotations")
    seg_indices = np.asarray(segments.get("segIndices", []), dtype=np.int64)
    if len(seg_indices) != vertex_count:
        raise DataError(f"{scene_dir / SEGMENTS}: segIndices has {len(seg_indices)} entries but {scene_dir / MESH} "
                        f"has {vertex_count} vertices; both must come from the same release")
    groups = annotation.get("segGroups")
    if not isinstance(groups, list):
        raise DataError(f"{scene_dir / ANNOTATIONS} has no segGroups list")
    vertex_group = np.full(vertex_count, -1, dtype=np.int64)
    for index, group in enumerate(groups):
        if not {"objectId", "label", "segments"} <= set(group):
            raise DataError(f"{scene_dir / ANNOTATIONS} segGroups[{index}] lacks objectId, label or segments")
        if not 0 < int(group["objectId"]) < 65536:
            raise DataError(f"{scene_dir / ANNOTATIONS} segGroups[{index}]: objectId {group['objectId']} is outside "
                            "1..65535, which 16-bit instance maps hold")
        vertex_group[np.isin(seg_indices, np.asarray(group["segments"], dtype=np.int64))] = index
    corner = vertex_group[triangles]
    return np.where(corner[:, 1] == corner[:, 2], corner[:, 1], corner[:, 0]), groups


def _edge_scores(image: np.ndarray, instances: np.ndarray, reach: int) -> np.ndarray:
    """``[2 reach + 1, 2 reach + 1]`` overlap of the image's gradient magnitude with the label edges shifted by
    (dy, dx) (index reach = no shift)."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    gradient = np.hypot(cv2.Sobel(grey, cv2.CV_32F, 1, 0), cv2.Sobel(grey, cv2.CV_32F, 0, 1))
    edges = np.zeros(instances.shape, dtype=np.float32)
    across = instances[:, 1:] != instances[:, :-1]  # both pixels of a differing pair: symmetric about the edge
    edges[:, 1:] += across
    edges[:, :-1] += across
    down = instances[1:] != instances[:-1]
    edges[1:] += down
    edges[:-1] += down
    height, width = instances.shape
    inner = gradient[reach:height - reach, reach:width - reach]
    scores = np.zeros((2 * reach + 1, 2 * reach + 1))
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            shifted = edges[reach + dy:height - reach + dy, reach + dx:width - reach + dx]
            scores[dy + reach, dx + reach] = float((inner * shifted).sum())
    return scores


def prepare_scene(raw: Path, scene_id: str, out: Path, cfg: PrepareScannetppCfg, classes: ClassList) -> dict:
    """Write ``scene_id`` of the release ``raw`` into the empty folder ``out``; returns its report.

    Raises:
        SceneSkipped: the scene has no mesh or no annotations.
        DataError: a file is missing or malformed, no frame is left, or a check fails.
    """
    started = time.perf_counter()
    scene_dir = Path(raw) / "data" / scene_id
    if not scene_dir.is_dir():
        raise DataError(f"scene {scene_id} is listed in the splits but {scene_dir} is missing; download it or remove "
                        "it from the split file")
    for path, what in ((MESH, "no mesh (NVS test scenes ship without scans/)"),
                       (SEGMENTS, "no segments"), (ANNOTATIONS, "no annotations")):
        if not (scene_dir / path).is_file():
            raise SceneSkipped(f"{what}: {scene_dir / path} is missing")
    if not (scene_dir / NERFSTUDIO).is_file():
        raise DataError(f"{scene_dir / NERFSTUDIO} is missing; {expected_release(Path(raw))}")
    meta = _read_json(scene_dir / NERFSTUDIO, "DSLR cameras")
    colmap = _read_colmap(scene_dir / COLMAP)
    failures = []

    intrinsic_keys = ("fl_x", "fl_y", "cx", "cy", "k1", "k2", "k3", "k4")
    if meta.get("camera_model") != "OPENCV_FISHEYE" or any(key not in meta for key in (*intrinsic_keys, "w", "h")):
        raise DataError(f"{scene_dir / NERFSTUDIO}: expected camera_model OPENCV_FISHEYE with {', '.join(intrinsic_keys)}"
                        f", w and h (the release's DSLR transforms), got camera_model {meta.get('camera_model')!r}")
    stated = np.array([float(meta[key]) for key in intrinsic_keys])
    model, colmap_width, colmap_height, params = colmap.camera
    if (model != "OPENCV_FISHEYE" or (colmap_width, colmap_height) != (int(meta["w"]), int(meta["h"]))
            or len(params) != 8 or not np.allclose(params, stated, rtol=1e-6, atol=1e-9)):
        failures.append(f"intrinsics: {COLMAP}/cameras.txt ({model} {colmap_width}x{colmap_height} {params.tolist()}) "
                        f"and {NERFSTUDIO} ({meta['w']}x{meta['h']} {stated.tolist()}) disagree")

    # Frames: the training list, less the excluded ones, counted by reason
    excluded: dict[str, int] = {}
    kept: list[tuple[str, str | None]] = []
    coverage_reason = f"anonymisation mask keeps less than {cfg.min_mask_coverage:.0%}"
    for entry in meta.get("frames", []):
        name = Path(str(entry.get("file_path", ""))).name
        mask_name = Path(str(entry.get("mask_path") or name.rsplit(".", 1)[0] + ".png")).name
        mask_path = scene_dir / ANON_MASKS / mask_name
        reason = None
        if entry.get("is_bad", False):
            reason = "marked is_bad"
        elif not (scene_dir / IMAGES / name).is_file():
            reason = "image missing"
        elif name not in colmap.world_to_camera:
            reason = "no COLMAP pose"
        elif meta.get("has_mask", True) and not mask_path.is_file():
            reason = "no anonymisation mask"
        elif mask_path.is_file() and (cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE) > 0).mean() < cfg.min_mask_coverage:
            reason = coverage_reason
        if reason:
            excluded[reason] = excluded.get(reason, 0) + 1
        else:
            kept.append((name, str(mask_path) if mask_path.is_file() else None))
    if not kept:
        raise DataError(f"scene {scene_id}: no frame of {scene_dir / NERFSTUDIO} is left to prepare (excluded: "
                        f"{excluded or 'the frames list is empty'})")

    # Poses: COLMAP's, checked against nerfstudio's mapped back to the mesh frame
    nerfstudio_pose = {Path(str(e.get("file_path", ""))).name: e.get("transform_matrix") for e in meta["frames"]}
    rotation_errors, translation_errors = [], []
    for name, _ in kept:
        world_to_camera = colmap.world_to_camera[name]
        try:
            check_rigid(world_to_camera, f"{COLMAP}/images.txt {name}")
            mesh_frame = NERFSTUDIO_WORLD @ np.asarray(nerfstudio_pose[name], dtype=np.float64)
            check_rigid(mesh_frame, f"{NERFSTUDIO} {name} transform_matrix")
        except (ValueError, TypeError) as error:
            failures.append(f"poses: {error}")
            continue
        difference = opengl_camera_to_world_to_opencv_world_to_camera(mesh_frame) @ np.linalg.inv(world_to_camera)
        rotation_errors.append(rotation_angle_degrees(difference[:3, :3]))
        centres = [np.linalg.inv(pose)[:3, 3] for pose in (world_to_camera,
                                                           opengl_camera_to_world_to_opencv_world_to_camera(mesh_frame))]
        translation_errors.append(float(np.linalg.norm(centres[0] - centres[1])))
    worst_rotation, worst_translation = max(rotation_errors, default=0.0), max(translation_errors, default=0.0)
    if worst_rotation > cfg.max_rotation_error_degrees or worst_translation > cfg.max_translation_error:
        failures.append(f"poses: {NERFSTUDIO} and {COLMAP}/images.txt disagree by up to {worst_rotation:.3g} degrees "
                        f"and {worst_translation:.3g} m (limits {cfg.max_rotation_error_degrees:g} degrees, "
                        f"{cfg.max_translation_error:g} m): the files are not of one capture, or not in the frames "
                        "the release documents")
    if failures:
        raise DataError(f"scene {scene_id}: " + "; ".join(failures))

    # Mesh and labels
    mesh = o3d.io.read_triangle_mesh(str(scene_dir / MESH))
    vertices, triangles = np.asarray(mesh.vertices), np.asarray(mesh.triangles)
    if len(triangles) == 0:
        raise DataError(f"{scene_dir / MESH} has no triangles; download it again")
    face_group, groups = _face_groups(scene_dir, len(vertices), triangles)
    group_instance = np.array([int(g["objectId"]) for g in groups] + [0], dtype=np.int64)  # [-1] = no group
    group_class = np.array([classes.index(str(g["label"])) for g in groups] + [IGNORE_LABEL], dtype=np.int64)
    face_instance, face_class = group_instance[face_group], group_class[face_group]
    raycaster = o3d.t.geometry.RaycastingScene()
    raycaster.add_triangles(o3d.core.Tensor(vertices.astype(np.float32)), o3d.core.Tensor(triangles.astype(np.uint32)))

    camera = undistortion(np.array([[stated[0], 0, stated[2]], [0, stated[1], stated[3]], [0, 0, 1]]), stated[4:],
                          (int(meta["w"]), int(meta["h"])), (cfg.width, cfg.height))
    rays = pixel_rays(camera.intrinsics, camera.height, camera.width)
    reach = cfg.max_edge_shift + 2
    edge_scores = np.zeros((2 * reach + 1, 2 * reach + 1))
    relative_errors, unlabelled, valid_mask = [], [], []
    for folder in ("images", "masks"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    for name, mask_path in kept:
        bgr = cv2.imread(str(scene_dir / IMAGES / name), cv2.IMREAD_COLOR)
        if bgr is None:
            raise DataError(f"cannot read image {scene_dir / IMAGES / name}; the file is truncated or not an image: "
                            "download it again")
        resized = cv2.resize(bgr, (camera.width, camera.height), interpolation=cv2.INTER_CUBIC)
        undistorted = cv2.remap(resized, camera.map_x, camera.map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        image = undistorted[..., ::-1]
        Image.fromarray(image).save(out / "images" / name, quality=_JPEG_QUALITY)
        mask = np.full((camera.height, camera.width), 255, np.uint8)
        if mask_path is not None:
            source = cv2.imread(mask_path, cv2.IMREAD_GRAYSCALE)
            if (source < 255).any():  # a pixel that is partly anonymised counts as anonymised
                source = np.where(cv2.resize(source, (camera.width, camera.height), interpolation=cv2.INTER_CUBIC) < 255,
                                  0, 255).astype(np.uint8)
                mask = cv2.remap(source, camera.map_x, camera.map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                                 borderValue=255)
                mask = np.where(mask < 255, 0, 255).astype(np.uint8)
        valid_mask.append(float((mask > 0).mean()))
        Image.fromarray(mask).save(out / "masks" / f"{Path(name).stem}.png")

        world_to_camera = colmap.world_to_camera[name]
        rotation = np.ascontiguousarray(world_to_camera[:3, :3], dtype=np.float32)
        centre = -world_to_camera[:3, :3].T @ world_to_camera[:3, 3]
        directions = rays @ rotation  # camera -> world
        cast = raycaster.cast_rays(o3d.core.Tensor(np.concatenate(
            [np.broadcast_to(centre.astype(np.float32), directions.shape), directions], -1)))
        face = cast["primitive_ids"].numpy().astype(np.int64)
        hit = face != _NO_HIT
        depth = np.where(hit, cast["t_hit"].numpy(), 0.0)
        depth = np.where((depth >= cfg.near) & (depth <= cfg.far), depth, 0.0).reshape(camera.height, camera.width)
        face = np.where(hit, face, 0)
        instances = np.where(hit, face_instance[face], 0).reshape(camera.height, camera.width)
        semantics = np.where(hit, face_class[face], IGNORE_LABEL).reshape(camera.height, camera.width)
        normals = cast["primitive_normals"].numpy() @ rotation.T  # world -> camera
        normals = np.where((np.einsum("ij,ij->i", normals, rays) > 0)[:, None], -normals, normals)
        normals = np.where(hit[:, None], normals, 0.0).reshape(camera.height, camera.width, 3)
        write_frame_maps(out, name, instances=instances, depth=depth, semantics=semantics, normals=normals)
        unlabelled.append(float((instances == 0).mean()))
        edge_scores += _edge_scores(image, instances, reach)
        relative_errors.append(_depth_errors(colmap, name, world_to_camera, camera, depth))

    # Masks against images, rendered depth against COLMAP's points
    shift = np.unravel_index(np.argmax(edge_scores), edge_scores.shape)
    edge_shift = (int(shift[1]) - reach, int(shift[0]) - reach)  # (dx, dy)
    if edge_scores.max() > 0 and max(map(abs, edge_shift)) > cfg.max_edge_shift:
        failures.append(f"masks: the label edges line up best with the image edges {edge_shift[0]:+d} px across and "
                        f"{edge_shift[1]:+d} px down (limit {cfg.max_edge_shift} px): the renders and the undistorted "
                        "images do not share a camera (intrinsics or distortion of the wrong images)")
    errors = np.concatenate(relative_errors)
    depth_error = float(np.median(errors)) if len(errors) >= _MIN_DEPTH_POINTS else None
    if depth_error is not None and depth_error > cfg.max_depth_error:
        failures.append(f"depth: rendered depth differs from the COLMAP points' depth by {depth_error:.1%} (median over "
                        f"{len(errors)} observations, limit {cfg.max_depth_error:.1%}): the mesh and "
                        f"{COLMAP}/points3D.txt are not in one frame and scale")
    if failures:
        raise DataError(f"scene {scene_id}: " + "; ".join(failures))

    names = [name for name, _ in kept]
    write_transforms(out, transforms_document(camera.intrinsics, camera.width, camera.height, names,
                                              np.stack([colmap.world_to_camera[name] for name in names])))
    shutil.copyfile(scene_dir / COLMAP / "points3D.txt", out / "points3D.txt")
    report = {
        "scene": scene_id,
        "frames": {"listed": len(meta.get("frames", [])), "prepared": len(kept), "excluded": excluded},
        "size": [camera.width, camera.height],
        "intrinsics": camera.intrinsics.tolist(),
        "checks": {
            "pose_rotation_error_degrees": worst_rotation,
            "pose_translation_error_m": worst_translation,
            "edge_shift_px": list(edge_shift),
            "depth_median_relative_error": depth_error,
            "depth_observations": int(len(errors)),
        },
        "unlabelled_fraction": float(np.mean(unlabelled)),
        "anonymisation_valid_fraction": float(np.mean(valid_mask)),
        "seconds": time.perf_counter() - started,
    }
    (out / REPORT).write_text(json.dumps(report, indent=1))
    return report


def _depth_errors(colmap: _Colmap, name: str, world_to_camera: np.ndarray, camera: PinholeCamera,
                  depth: np.ndarray) -> np.ndarray:
    """Relative errors of ``depth`` at the COLMAP points the image observes (those in the undistorted view)."""
    seen = colmap.observed.get(colmap.image_ids[name])
    if seen is None:
        return np.zeros(0)
    points = colmap.points[seen] @ world_to_camera[:3, :3].T + world_to_camera[:3, 3]
    points = points[points[:, 2] > 0]
    uv = points @ camera.intrinsics.T
    column, row = np.floor(uv[:, 0] / uv[:, 2]).astype(np.int64), np.floor(uv[:, 1] / uv[:, 2]).astype(np.int64)
    inside = (column >= 0) & (column < camera.width) & (row >= 0) & (row < camera.height)
    rendered = depth[row[inside], column[inside]]
    return np.where(rendered > 0, np.abs(rendered - points[inside, 2]) / points[inside, 2], 1.0)


def write_release_lists(out: Path, splits: dict[str, list[str]], classes: ClassList) -> dict[str, list[str]]:
    """``metadata/nvs_sem_{train,val}.txt`` naming the prepared scenes of each split, and ``semantic_classes.txt``."""
    (Path(out) / "metadata").mkdir(parents=True, exist_ok=True)
    prepared = {}
    for split, ids in splits.items():
        prepared[split] = [scene for scene in ids if (Path(out) / "scenes" / scene / REPORT).is_file()]
        short = split.removeprefix("nvs_sem_")
        write_text_atomic(Path(out) / "metadata" / SPLIT_FILES[short], "".join(f"{scene}\n" for scene in prepared[split]))
    write_text_atomic(Path(out) / "metadata" / "semantic_classes.txt", "".join(f"{name}\n" for name in classes.names))
    return prepared
