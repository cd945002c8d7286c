"""Generated demo scenes: determinism, multi-view geometric and photometric consistency, normals, poses, labels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from snd_stages.geometry import Camera, check_rigid, project_points, unproject_depth
from snd_stages.scenes.demo import SEMANTIC_CLASSES, DemoScene, generate_scene

SEED, FRAMES, HEIGHT, WIDTH, FOV = 3, 10, 60, 80, 70.0
ROOM_INSTANCES = range(1, 7)  # the floor, the ceiling and the four walls


@pytest.fixture(scope="module")
def scene() -> DemoScene:
    return generate_scene(SEED, FRAMES, HEIGHT, WIDTH, FOV)


def camera_of(scene: DemoScene) -> Camera:
    frames = len(scene.world_to_camera)
    intrinsics = torch.from_numpy(scene.intrinsics).expand(frames, 3, 3)
    return Camera(intrinsics, torch.from_numpy(scene.world_to_camera), *scene.depth.shape[1:])


def covisible(scene: DemoScene, source: int, target: int):
    """Which of ``source``'s pixels ``target`` sees unoccluded (a loose depth test), the target pixel each lands
    in, and its depth seen from ``target`` (``[H * W]`` each)."""
    camera = camera_of(scene)
    points = unproject_depth(torch.from_numpy(scene.depth[source]).double(), camera[source]).reshape(-1, 3)
    uv, z = (array.numpy() for array in project_points(points, camera[target]))
    inside = (z > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < WIDTH) & (uv[:, 1] >= 0) & (uv[:, 1] < HEIGHT)
    cols = np.clip(np.floor(uv[:, 0]), 0, WIDTH - 1).astype(int)
    rows = np.clip(np.floor(uv[:, 1]), 0, HEIGHT - 1).astype(int)
    seen = inside & (np.abs(z - scene.depth[target][rows, cols]) < 0.05 + 0.05 * z)
    return seen, rows, cols, z


def test_same_seed_gives_identical_arrays_and_other_seeds_other_scenes(scene):
    again = generate_scene(SEED, FRAMES, HEIGHT, WIDTH, FOV)
    for name in DemoScene.__dataclass_fields__:
        assert np.array_equal(getattr(scene, name), getattr(again, name)), name
    other = generate_scene(SEED + 1, FRAMES, HEIGHT, WIDTH, FOV)
    assert np.abs(other.images.astype(int) - scene.images).mean() > 10
    assert np.abs(other.world_to_camera - scene.world_to_camera).max() > 0.1


def test_types_shapes_and_an_off_centre_principal_point(scene):
    assert scene.images.shape == (FRAMES, HEIGHT, WIDTH, 3) and scene.images.dtype == np.uint8
    assert scene.depth.dtype == np.float32 and scene.normals.dtype == np.float32
    assert scene.instances.dtype == np.int32 and scene.semantics.dtype == np.int32
    assert scene.intrinsics.shape == (3, 3) and scene.world_to_camera.shape == (FRAMES, 4, 4)
    focal = WIDTH / 2 / math.tan(math.radians(FOV) / 2)
    np.testing.assert_allclose(np.diag(scene.intrinsics), [focal, focal, 1.0])
    offset = scene.intrinsics[:2, 2] - np.array([WIDTH, HEIGHT]) / 2
    assert (np.abs(offset) > 0.5).all() and (np.abs(offset) < 0.05 * np.array([WIDTH, HEIGHT])).all()
    assert 20 < scene.images.mean() < 235 and scene.images.std() > 20  # lit and textured, neither black nor flat


def test_room_surfaces_unproject_onto_planes_at_right_angles(scene):
    # Euclidean ray lengths taken for z-depth bend the planes. Rays that miss the principal point or the pixel
    # centres by a pixel shear the room instead (by about a degree here): its corners stop being right angles.
    points = unproject_depth(torch.from_numpy(scene.depth).double(), camera_of(scene)).numpy()
    plane_normals = []
    for instance in ROOM_INSTANCES:
        on_surface = points[scene.instances == instance]
        if len(on_surface) < 50:
            continue
        centred = on_surface - on_surface.mean(0)
        _, singular_values, axes = np.linalg.svd(centred, full_matrices=False)
        thickness = singular_values[-1] / math.sqrt(len(centred))
        assert thickness < 2e-3, f"instance {instance}: points spread {thickness:.4f} m off their plane"
        plane_normals.append(axes[-1])
    assert len(plane_normals) >= 3
    for index, first in enumerate(plane_normals):
        for second in plane_normals[index + 1 :]:
            angle = math.degrees(math.acos(min(1.0, abs(float(first @ second)))))
            assert min(angle, 90 - angle) < 0.05, f"room surfaces meet at {angle:.3f} degrees"


@pytest.mark.parametrize("source,target", [(1, 5), (6, 2), (0, 3)])
def test_frames_a_few_apart_agree_on_depth_and_instances(scene, source, target):
    seen, rows, cols, z = covisible(scene, source, target)
    assert seen.mean() > 0.3, f"only {seen.mean():.0%} of frame {source} is seen by frame {target}"
    depth_error = np.abs(z[seen] - scene.depth[target][rows[seen], cols[seen]]) / z[seen]
    assert (depth_error < 0.02).mean() > 0.9
    same_instance = scene.instances[source].ravel()[seen] == scene.instances[target][rows[seen], cols[seen]]
    assert same_instance.mean() > 0.9


@pytest.mark.parametrize("source,target", [(1, 5), (6, 2)])
def test_a_surface_point_has_the_same_colour_in_every_frame(scene, source, target):
    seen, rows, cols, _ = covisible(scene, source, target)
    seen &= scene.instances[source].ravel() == scene.instances[target][rows, cols]
    colour_source = scene.images[source].reshape(-1, 3)[seen].astype(float)
    colour_target = scene.images[target][rows[seen], cols[seen]].astype(float)
    difference = np.abs(colour_source - colour_target)
    assert np.median(difference) < 6 and difference.mean() < 12
    # ... while unrelated pixels differ far more: the agreement is not that of a flat image.
    shuffled = np.random.default_rng(0).permutation(len(colour_target))
    assert np.abs(colour_source - colour_target[shuffled]).mean() > 2 * difference.mean()


def test_normals_are_unit_face_the_camera_and_match_the_depth_map(scene):
    norms = np.linalg.norm(scene.normals, axis=-1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    rows, cols = np.mgrid[:HEIGHT, :WIDTH] + 0.5
    rays = np.stack([cols, rows, np.ones_like(rows)], -1) @ np.linalg.inv(scene.intrinsics).T
    assert ((scene.normals * rays).sum(-1) < 0).all()
    # Camera-frame points from the depth maps: finite differences span the surface.
    identity = Camera(torch.from_numpy(scene.intrinsics), torch.eye(4, dtype=torch.float64), HEIGHT, WIDTH)
    points = unproject_depth(torch.from_numpy(scene.depth).double(), identity).numpy()
    estimated = np.cross(points[:, :-1, 1:] - points[:, :-1, :-1], points[:, 1:, :-1] - points[:, :-1, :-1])
    estimated /= np.linalg.norm(estimated, axis=-1, keepdims=True)
    estimated *= -np.sign((estimated * points[:, :-1, :-1]).sum(-1, keepdims=True))
    labels = scene.instances
    one_surface = (labels[:, :-1, :-1] == labels[:, :-1, 1:]) & (labels[:, :-1, :-1] == labels[:, 1:, :-1])
    cosine = (estimated * scene.normals[:, :-1, :-1]).sum(-1)[one_surface]
    angles = np.degrees(np.arccos(np.clip(cosine, -1, 1)))
    assert np.median(angles) < 5 and (angles < 10).mean() > 0.8


def test_poses_are_rigid_and_move_like_a_hand_held_scan(scene):
    for index, pose in enumerate(scene.world_to_camera):
        check_rigid(pose, f"frame {index}", atol=1e-9)
    rotations = scene.world_to_camera[:, :3, :3]
    centres = -np.einsum("fji,fj->fi", rotations, scene.world_to_camera[:, :3, 3])
    steps = np.linalg.norm(np.diff(centres, axis=0), axis=-1)
    assert (steps > 0.01).all() and (steps < 0.3).all()
    relative = np.einsum("fij,fkj->fik", rotations[1:], rotations[:-1])
    turns = np.degrees(np.arccos(np.clip((np.trace(relative, axis1=1, axis2=2) - 1) / 2, -1, 1)))
    assert (turns < 10).all()
    # World z is up: the camera's x axis stays nearly horizontal (small roll) and the camera looks slightly down.
    assert (np.degrees(np.abs(np.arcsin(rotations[:, 0, 2]))) < 3).all()
    assert (rotations[:, 2, 2] < 0).all()
    assert (1.1 < centres[:, 2]).all() and (centres[:, 2] < 1.9).all()


def test_closed_furnished_room_with_consistent_labels():
    scene = generate_scene(5, 40, 36, 48, FOV)
    assert (scene.depth > 0.1).all() and np.isfinite(scene.depth).all()
    assert (scene.instances >= 1).all()
    assert ((scene.semantics >= 0) & (scene.semantics < len(SEMANTIC_CLASSES))).all()
    assert len(np.unique(scene.semantics)) >= 8
    assert len(np.unique(scene.instances)) >= 10
    for instance in np.unique(scene.instances):
        assert len(np.unique(scene.semantics[scene.instances == instance])) == 1, f"instance {instance}"
    room_classes = {SEMANTIC_CLASSES[c] for c in np.unique(scene.semantics[scene.instances <= max(ROOM_INSTANCES)])}
    assert room_classes <= {"floor", "ceiling", "wall"}
