"""A tiny scene written as the official ScanNet++ release lays it out, with its own truth to compare against.

Written with open3d, OpenCV and plain json (not with snd's preparation code), so a bug shared by writer and
preparation cannot hide::

    <root>/splits/nvs_sem_train.txt, nvs_sem_val.txt
    <root>/metadata/semantic_classes.txt, semantic_benchmark/{top100.txt, map_benchmark.csv}
    <root>/data/<scene>/dslr/resized_images/DSC*.JPG       fisheye (OpenCV's model), JPEG
    <root>/data/<scene>/dslr/resized_anon_masks/DSC*.png    255 = valid, 0 = anonymised
    <root>/data/<scene>/dslr/colmap/{cameras,images,points3D}.txt   OPENCV_FISHEYE, world-to-camera in the mesh frame
    <root>/data/<scene>/dslr/nerfstudio/transforms.json    OpenGL camera-to-world in the release's permuted world
    <root>/data/<scene>/dslr/train_test_lists.json
    <root>/data/<scene>/scans/mesh_aligned_0.05.ply, segments.json, segments_anno.json

The scene is a closed room (floor, ceiling, four walls) with a table, a cabinet, a ball, a desk (renamed to
table by map_benchmark.csv), a plant (a class outside the top-100 list) and a box no annotation group names.
Every object has its own vertices, so a face's vertices share one label and the per-face truth is exact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import open3d as o3d

RAW_WIDTH, RAW_HEIGHT = 144, 96
FISHEYE = dict(fl_x=64.8, fl_y=64.3, cx=71.2, cy=47.9, k1=-0.021, k2=0.0042, k3=-0.0011, k4=0.0002)
FRAMES = 10
BAD_FRAME = "DSC00008.JPG"  # is_bad: excluded
UNMASKED_FRAME = "DSC00005.JPG"  # its anonymisation mask covers nothing: excluded
PARTLY_MASKED_FRAME = "DSC00003.JPG"  # a small anonymised rectangle: kept
TEST_FRAMES = ("DSC00011.JPG", "DSC00012.JPG")  # NVS test frames: never prepared
ROOM = (4.0, 3.2, 2.6)
CLASSES = ("wall", "floor", "ceiling", "table", "cabinet", "ball", "door")
# nerfstudio's world is the mesh's with x and y swapped and z negated (the release's converter)
WORLD_PERMUTATION = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, -1, 0], [0, 0, 0, 1]], dtype=np.float64)
OPENGL_AXES = np.diag([1.0, -1.0, -1.0, 1.0])


@dataclass
class RawSceneTruth:
    """The generator's truth: the mesh, each face's object id (0 = in no annotation group), and the cameras."""

    vertices: np.ndarray  # [V, 3]
    triangles: np.ndarray  # [T, 3]
    face_object: np.ndarray  # [T] objectId, 0 where no group names the face
    face_colour: np.ndarray  # [T, 3] base colour in [0, 1]
    world_to_camera: dict[str, np.ndarray]  # OpenCV world-to-camera in the mesh frame, per image name
    training_names: list[str]  # frames[] that are neither bad nor unmasked

    def raycaster(self) -> o3d.t.geometry.RaycastingScene:
        scene = o3d.t.geometry.RaycastingScene()
        scene.add_triangles(o3d.core.Tensor(self.vertices.astype(np.float32)),
                            o3d.core.Tensor(self.triangles.astype(np.uint32)))
        return scene

    def render_pinhole(self, intrinsics: np.ndarray, name: str, height: int, width: int) -> dict[str, np.ndarray]:
        """z-depth (metres), object ids and colour of a pinhole camera; pixel (i, j) is centred at (j + .5, i + .5)."""
        rows, cols = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
        normalised = np.stack([(cols - intrinsics[0, 2]) / intrinsics[0, 0],
                               (rows - intrinsics[1, 2]) / intrinsics[1, 1], np.ones_like(cols)], -1)
        return self._cast(normalised.reshape(-1, 3), name, (height, width))

    def render_fisheye(self, name: str, samples: int = 2) -> np.ndarray:
        """``[H, W, 3]`` uint8 of the fisheye camera, ``samples``^2 rays per pixel (OpenCV pixel centres)."""
        offsets = (np.arange(samples) + 0.5) / samples - 0.5
        colour = np.zeros((RAW_HEIGHT, RAW_WIDTH, 3))
        for dy in offsets:
            for dx in offsets:
                rows, cols = np.meshgrid(np.arange(RAW_HEIGHT) + dy, np.arange(RAW_WIDTH) + dx, indexing="ij")
                pixels = np.stack([cols, rows], -1).reshape(-1, 1, 2).astype(np.float64)
                undistorted = cv2.fisheye.undistortPoints(pixels, fisheye_matrix(), fisheye_coefficients())
                rays = np.concatenate([undistorted.reshape(-1, 2), np.ones((len(pixels), 1))], -1)
                colour += self._cast(rays, name, (RAW_HEIGHT, RAW_WIDTH))["colour"]
        return np.round(colour / samples**2 * 255).clip(0, 255).astype(np.uint8)

    def _cast(self, rays_camera: np.ndarray, name: str, shape) -> dict[str, np.ndarray]:
        world_to_camera = self.world_to_camera[name]
        rotation, centre = world_to_camera[:3, :3], -world_to_camera[:3, :3].T @ world_to_camera[:3, 3]
        directions = rays_camera @ rotation  # rotation.T applied to each row: camera -> world
        rays = np.concatenate([np.broadcast_to(centre, directions.shape), directions], -1).astype(np.float32)
        hit = self.raycaster().cast_rays(o3d.core.Tensor(rays))
        t_hit, face = hit["t_hit"].numpy(), hit["primitive_ids"].numpy().astype(np.int64)
        assert np.isfinite(t_hit).all(), "the room is closed around every camera"
        points = centre + t_hit[:, None] * directions
        # z-depth: the rays have camera z = 1 before rotation, so t_hit is already z
        return {"depth": t_hit.reshape(shape), "objects": self.face_object[face].reshape(shape),
                "colour": shade(self.face_colour[face], points).reshape(*shape, 3)}


def shade(base: np.ndarray, points: np.ndarray) -> np.ndarray:
    """A point's colour, independent of the viewer: the object's colour in a 3D checker of 25 cm cells."""
    checker = np.floor((points + 0.1) / 0.25).astype(np.int64).sum(-1) % 2  # cell edges off the walls' planes
    return base * (0.7 + 0.3 * checker[:, None])


def fisheye_matrix() -> np.ndarray:
    return np.array([[FISHEYE["fl_x"], 0, FISHEYE["cx"]], [0, FISHEYE["fl_y"], FISHEYE["cy"]], [0, 0, 1.0]])


def fisheye_coefficients() -> np.ndarray:
    return np.array([FISHEYE[key] for key in ("k1", "k2", "k3", "k4")])


def _objects(rng: np.random.Generator) -> list[tuple[str | None, o3d.geometry.TriangleMesh]]:
    """(label or None for an unannotated object, mesh in the world frame); the room's surfaces come first."""
    lx, ly, lz = ROOM

    def box(lo, hi, divisions=1):
        lo, hi = np.asarray(lo, float), np.asarray(hi, float)
        mesh = o3d.geometry.TriangleMesh.create_box(*(hi - lo))
        mesh = mesh.subdivide_midpoint(divisions) if divisions > 1 else mesh
        return mesh.translate(lo)

    def sphere(centre, radius):
        return o3d.geometry.TriangleMesh.create_sphere(radius, 12).translate(centre)

    thin = 0.02
    table_x, table_y = rng.uniform(1.6, 2.2), rng.uniform(1.4, 1.8)
    return [
        ("floor", box((0, 0, -thin), (lx, ly, 0), 3)),
        ("ceiling", box((0, 0, lz), (lx, ly, lz + thin), 3)),
        ("wall", box((-thin, 0, 0), (0, ly, lz), 3)),
        ("wall", box((lx, 0, 0), (lx + thin, ly, lz), 3)),
        ("wall", box((0, -thin, 0), (lx, 0, lz), 3)),
        ("wall", box((0, ly, 0), (lx, ly + thin, lz), 3)),
        ("table", box((table_x - 0.5, table_y - 0.35, 0.7), (table_x + 0.5, table_y + 0.35, 0.76))),
        ("cabinet", box((0.05, 0.3, 0), (0.55, 1.3, 0.9))),
        ("ball", sphere((table_x, table_y, 0.9), 0.14)),
        ("desk", box((lx - 0.7, 0.05, 0.0), (lx - 0.05, 1.2, 0.75))),
        ("plant", sphere((lx - 0.4, ly - 0.4, 0.3), 0.3)),
        ("door", box((1.5, ly - 0.03, 0), (2.4, ly, 2.05))),
        (None, box((0.8, ly - 0.6, 0), (1.2, ly - 0.2, 0.4))),
    ]


def _look_at(centre: np.ndarray, target: np.ndarray) -> np.ndarray:
    """OpenCV world-to-camera (x right, y down, z forward) with the world's z up."""
    forward = (target - centre) / np.linalg.norm(target - centre)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    world_to_camera = np.eye(4)
    world_to_camera[:3, :3] = np.stack([right, down, forward])
    world_to_camera[:3, 3] = -world_to_camera[:3, :3] @ centre
    return world_to_camera


def _quaternion(rotation: np.ndarray) -> np.ndarray:
    """(w, x, y, z) of a rotation matrix, written independently of snd's geometry module."""
    w = np.sqrt(max(0.0, 1 + np.trace(rotation))) / 2
    x = np.copysign(np.sqrt(max(0.0, 1 + rotation[0, 0] - rotation[1, 1] - rotation[2, 2])) / 2, rotation[2, 1] - rotation[1, 2])
    y = np.copysign(np.sqrt(max(0.0, 1 - rotation[0, 0] + rotation[1, 1] - rotation[2, 2])) / 2, rotation[0, 2] - rotation[2, 0])
    z = np.copysign(np.sqrt(max(0.0, 1 - rotation[0, 0] - rotation[1, 1] + rotation[2, 2])) / 2, rotation[1, 0] - rotation[0, 1])
    return np.array([w, x, y, z])


def frame_name(number: int) -> str:
    return f"DSC{number:05d}.JPG"


def write_raw_scene(root: Path, scene_id: str, seed: int = 0) -> RawSceneTruth:
    """Write ``data/<scene_id>`` in the release's layout; returns its truth."""
    rng = np.random.default_rng(seed)
    scene_dir = Path(root) / "data" / scene_id
    dslr, scans = scene_dir / "dslr", scene_dir / "scans"
    for folder in (dslr / "resized_images", dslr / "resized_anon_masks", dslr / "colmap", dslr / "nerfstudio", scans):
        folder.mkdir(parents=True, exist_ok=True)

    palette = rng.uniform(0.15, 0.95, (64, 3))
    vertices, triangles, face_object, face_colour, groups = [], [], [], [], []
    count = 0
    for index, (label, mesh) in enumerate(_objects(rng)):
        mesh_vertices, mesh_triangles = np.asarray(mesh.vertices), np.asarray(mesh.triangles)
        object_id = 0 if label is None else len(groups) + 1
        if label is not None:
            groups.append({"id": object_id, "objectId": object_id, "label": label,
                           "segments": list(range(count, count + len(mesh_vertices)))})
        vertices.append(mesh_vertices)
        triangles.append(mesh_triangles + count)
        face_object.append(np.full(len(mesh_triangles), object_id))
        face_colour.append(np.broadcast_to(palette[index], (len(mesh_triangles), 3)))
        count += len(mesh_vertices)
    vertices, triangles = np.concatenate(vertices), np.concatenate(triangles)
    face_object, face_colour = np.concatenate(face_object), np.concatenate(face_colour)

    mesh = o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(vertices), o3d.utility.Vector3iVector(triangles))
    vertex_colour = np.zeros_like(vertices)
    vertex_colour[triangles.ravel()] = np.repeat(face_colour, 3, axis=0)
    mesh.vertex_colors = o3d.utility.Vector3dVector(vertex_colour)
    o3d.io.write_triangle_mesh(str(scans / "mesh_aligned_0.05.ply"), mesh, write_ascii=False)
    (scans / "segments.json").write_text(json.dumps(
        {"params": {"kThresh": 0.0, "segMinVerts": 1}, "sceneId": scene_id, "segIndices": list(range(len(vertices)))}))
    (scans / "segments_anno.json").write_text(json.dumps(
        {"sceneId": scene_id, "appId": "fixture", "annId": 0, "segGroups": groups}))

    # A camera on an arc through the room, 1.3-1.6 m high, looking across it
    names = [frame_name(number) for number in range(1, FRAMES + 1 + len(TEST_FRAMES))]
    world_to_camera = {}
    for index, name in enumerate(names):
        angle = 0.35 * index + rng.uniform(-0.05, 0.05)
        centre = np.array([ROOM[0] / 2 + 0.9 * np.cos(angle), ROOM[1] / 2 + 0.6 * np.sin(angle), 1.3 + 0.03 * index])
        target = np.array([ROOM[0] / 2 - 1.2 * np.cos(angle + 0.4), ROOM[1] / 2 - 0.8 * np.sin(angle + 0.4), 0.7])
        world_to_camera[name] = _look_at(centre, target)
    truth = RawSceneTruth(vertices, triangles, face_object, face_colour, world_to_camera,
                          [name for name in names[:FRAMES] if name not in (BAD_FRAME, UNMASKED_FRAME)])

    for name in names:
        image = truth.render_fisheye(name)
        cv2.imwrite(str(dslr / "resized_images" / name), image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
        mask = np.full((RAW_HEIGHT, RAW_WIDTH), 255, np.uint8)
        if name == PARTLY_MASKED_FRAME:
            mask[10:30, 20:44] = 0  # a blurred face
        if name == UNMASKED_FRAME:
            mask[:] = 0
        cv2.imwrite(str(dslr / "resized_anon_masks" / name.replace(".JPG", ".png")), mask)

    def frame_entry(name):
        camera_to_world = np.linalg.inv(world_to_camera[name])
        return {"file_path": name, "mask_path": name.replace(".JPG", ".png"), "is_bad": name == BAD_FRAME,
                "transform_matrix": (WORLD_PERMUTATION @ camera_to_world @ OPENGL_AXES).tolist()}

    transforms = {"camera_model": "OPENCV_FISHEYE", **FISHEYE, "w": RAW_WIDTH, "h": RAW_HEIGHT, "has_mask": True,
                  "frames": [frame_entry(name) for name in names[:FRAMES]],
                  "test_frames": [frame_entry(name) for name in names[FRAMES:]]}
    (dslr / "nerfstudio" / "transforms.json").write_text(json.dumps(transforms, indent=1))
    (dslr / "train_test_lists.json").write_text(json.dumps({"train": names[:FRAMES], "test": names[FRAMES:]}))
    _write_colmap(dslr / "colmap", truth, names, rng)
    return truth


def _write_colmap(folder: Path, truth: RawSceneTruth, names: list[str], rng: np.random.Generator) -> None:
    """COLMAP text model: the fisheye camera, every image's pose, and surface points with the images seeing them."""
    params = " ".join(f"{FISHEYE[key]!r}" for key in ("fl_x", "fl_y", "cx", "cy", "k1", "k2", "k3", "k4"))
    (folder / "cameras.txt").write_text(f"# Camera list\n1 OPENCV_FISHEYE {RAW_WIDTH} {RAW_HEIGHT} {params}\n")
    corners = truth.vertices[truth.triangles]  # [T, 3, 3]
    area = np.linalg.norm(np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]), axis=-1)
    face = rng.choice(len(area), 600, p=area / area.sum())
    u, v = rng.uniform(size=(2, 600))
    u, v = np.where(u + v > 1, 1 - u, u), np.where(u + v > 1, 1 - v, v)
    points = corners[face, 0] + u[:, None] * (corners[face, 1] - corners[face, 0]) + v[:, None] * (corners[face, 2] - corners[face, 0])
    raycaster = truth.raycaster()
    tracks: dict[int, list[tuple[int, int]]] = {index: [] for index in range(len(points))}
    lines = ["# Image list"]
    for image_id, name in enumerate(names, start=1):
        world_to_camera = truth.world_to_camera[name]
        camera = points @ world_to_camera[:3, :3].T + world_to_camera[:3, 3]
        centre = -world_to_camera[:3, :3].T @ world_to_camera[:3, 3]
        offsets = points - centre
        distance = np.linalg.norm(offsets, axis=-1)
        rays = np.concatenate([np.broadcast_to(centre, offsets.shape), offsets / distance[:, None]], -1)
        t_hit = raycaster.cast_rays(o3d.core.Tensor(rays.astype(np.float32)))["t_hit"].numpy()
        pixels, _ = cv2.fisheye.projectPoints(points.reshape(-1, 1, 3), cv2.Rodrigues(world_to_camera[:3, :3])[0],
                                              world_to_camera[:3, 3], fisheye_matrix(), fisheye_coefficients())
        pixels = pixels.reshape(-1, 2)
        inside = ((camera[:, 2] > 0.1) & (np.abs(t_hit - distance) < 0.01)
                  & (pixels[:, 0] > 0) & (pixels[:, 0] < RAW_WIDTH - 1) & (pixels[:, 1] > 0) & (pixels[:, 1] < RAW_HEIGHT - 1))
        observations = []
        for point2d_index, point in enumerate(np.flatnonzero(inside)):
            observations.append(f"{pixels[point, 0]:.3f} {pixels[point, 1]:.3f} {point + 1}")
            tracks[point].append((image_id, point2d_index))
        qw, qx, qy, qz = _quaternion(world_to_camera[:3, :3]).tolist()
        tx, ty, tz = world_to_camera[:3, 3].tolist()
        lines += [f"{image_id} {qw!r} {qx!r} {qy!r} {qz!r} {tx!r} {ty!r} {tz!r} 1 {name}", " ".join(observations)]
    (folder / "images.txt").write_text("\n".join(lines) + "\n")
    point_lines = ["# 3D point list"]
    for index, point in enumerate(points.tolist()):
        if tracks[index]:
            track = " ".join(f"{image_id} {slot}" for image_id, slot in tracks[index])
            point_lines.append(f"{index + 1} {point[0]!r} {point[1]!r} {point[2]!r} 128 128 128 0.5 {track}")
    (folder / "points3D.txt").write_text("\n".join(point_lines) + "\n")


def write_release_metadata(root: Path, train: list[str], val: list[str]) -> None:
    """Split lists and class lists as the release ships them (map_benchmark.csv renames desk to table)."""
    root = Path(root)
    (root / "splits").mkdir(parents=True, exist_ok=True)
    (root / "splits" / "nvs_sem_train.txt").write_text("".join(f"{s}\n" for s in train))
    (root / "splits" / "nvs_sem_val.txt").write_text("".join(f"{s}\n" for s in val))
    benchmark = root / "metadata" / "semantic_benchmark"
    benchmark.mkdir(parents=True, exist_ok=True)
    (root / "metadata" / "semantic_classes.txt").write_text("".join(f"{c}\n" for c in (*CLASSES, "desk", "plant")))
    (benchmark / "top100.txt").write_text("".join(f"{c}\n" for c in CLASSES))
    (benchmark / "map_benchmark.csv").write_text(
        "class,count,semantic_map_to,instance_map_to\nwall,10,,\ndesk,3,table,table\nplant,2,,\nfloor,9,,\n")


def semantic_truth(objects: np.ndarray, anno_path: Path) -> np.ndarray:
    """Class ids the preparation should give: the group's label after the renaming, its index in CLASSES, 255 else."""
    labels = {group["objectId"]: group["label"] for group in json.loads(Path(anno_path).read_text())["segGroups"]}
    renamed = {"desk": "table"}
    lookup = np.full(max(objects.max(), *labels) + 1, 255)
    for object_id, label in labels.items():
        label = renamed.get(label, label)
        if label in CLASSES:
            lookup[object_id] = CLASSES.index(label)
    return lookup[objects]
