"""A tiny ScanNet++ DSLR scene written by hand in the exact FiT3D-prepared format (plain json/PIL, not snd's
own writer, so a bug shared by writer and reader cannot hide): nerfstudio OpenGL camera-to-world poses, JPG
images named like the DSLR's, ``<image>.png`` instance masks and millimetre depth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

WIDTH, HEIGHT = 44, 30
FL_X, FL_Y, CX, CY = 40.0, 41.0, 23.1, 14.6


def look_at_opengl(eye, target) -> np.ndarray:
    """nerfstudio-style camera-to-world: camera looks down its -z axis, y up."""
    eye, target = np.asarray(eye, float), np.asarray(target, float)
    back = eye - target
    back /= np.linalg.norm(back)
    right = np.cross([0.0, 0.0, 1.0], back)
    right /= np.linalg.norm(right)
    up = np.cross(back, right)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = right, up, back, eye
    return pose


def write_fixture(root: Path, scene_id: str = "0a5c013435", frame_numbers=(12, 3, 7), semantic_classes: int = 0) -> dict:
    """A ScanNet++ DSLR scene: plane z = 0 seen from above, frames listed out of order in the JSON.

    With ``semantic_classes`` > 0 it also has 16-bit ``semantic_segmentation/<image>.png`` class maps (the top rows
    65535, an id outside every class list) and ``metadata/semantic_classes.txt``, which real ScanNet++ DSLR data
    lacks.
    """
    scene = root / "scenes" / scene_id
    for folder in ("images", "instance_segmentation", "depth"):
        (scene / folder).mkdir(parents=True)
    frames, poses = [], {}
    for number in frame_numbers:
        name = f"DSC{number:05d}.JPG"
        pose = look_at_opengl(eye=[0.1 * number, -0.5, 2.0], target=[0.1 * number, 0.3, 0.0])
        poses[name] = pose
        frames.append({"file_path": name, "transform_matrix": pose.tolist(), "is_bad": number == 7})
        rgb = np.random.default_rng(number).integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(scene / "images" / name, quality=95)
        labels = np.zeros((HEIGHT, WIDTH), np.uint16)
        labels[:, WIDTH // 2 :] = 300 + number  # ids beyond 255 need 16-bit PNGs, as ScanNet++ has
        Image.fromarray(labels).save(scene / "instance_segmentation" / f"{name}.png")
        depth_mm = np.full((HEIGHT, WIDTH), 2000 + number, np.uint16)
        Image.fromarray(depth_mm).save(scene / "depth" / f"{name}.png")
        if semantic_classes:
            (scene / "semantic_segmentation").mkdir(exist_ok=True)
            classes = np.zeros((HEIGHT, WIDTH), np.uint16)
            classes[:, WIDTH // 2 :] = number % semantic_classes
            classes[:2] = 65535
            Image.fromarray(classes).save(scene / "semantic_segmentation" / f"{name}.png")
    meta = {"fl_x": FL_X, "fl_y": FL_Y, "cx": CX, "cy": CY, "w": WIDTH, "h": HEIGHT, "camera_model": "PINHOLE",
            "k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0, "frames": frames}
    (scene / "transforms_train.json").write_text(json.dumps(meta))
    (root / "metadata").mkdir(exist_ok=True)
    (root / "metadata" / "nvs_sem_train.txt").write_text(f"{scene_id}\n")
    (root / "metadata" / "nvs_sem_val.txt").write_text("")
    if semantic_classes:
        (root / "metadata" / "semantic_classes.txt").write_text("".join(f"class{i}\n" for i in range(semantic_classes)))
    return poses


def write_val_split(root: Path, scene_ids) -> None:
    """FiT3D's held-out list ``metadata/nvs_sem_val.txt`` naming ``scene_ids`` (write_fixture leaves it empty)."""
    (root / "metadata" / "nvs_sem_val.txt").write_text("".join(f"{scene_id}\n" for scene_id in scene_ids))
