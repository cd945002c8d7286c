"""Probe3D's training-free multi-view correspondence probe: pairs of held-out views, matched by their features.

``snd eval`` runs it on every model beside the other probes; ``snd train`` runs it on the current student to draw
a learning curve (:mod:`snd_stages.stages.validation`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.progress import Progress

from ..config import EvalCfg
from ..errors import DataError
from ..geometry import pixel_centers, transform_points, unproject_depth
from ..progress import track
from ..scenes.correspondence import CorrespondencePair, pairs_from_scene
from ..scenes.layout import read_scene
from .backbone import Features
from .cache import FeatureSet, FrameSet
from .metrics import binned_recall, correspondence_recall, match_features, reprojection_errors


def held_out_pairs(root: Path, scene_ids: list[str], count: int, gap: tuple[int, int], seed: int
                   ) -> list[CorrespondencePair]:
    """``count`` pairs drawn evenly from the scenes (the k-th scene's draw seeded ``seed + k``), in scene order."""
    pairs: list[CorrespondencePair] = []
    per_scene = math.ceil(count / len(scene_ids))
    for index, scene_id in enumerate(scene_ids):
        pairs += pairs_from_scene(read_scene(root, scene_id), per_scene, *gap, seed + index)
    return pairs[:count]


def pairs_frame_set(pairs: list[CorrespondencePair], identity) -> FrameSet:
    """Both views of every pair (view 0 of pair k at index 2k, view 1 at 2k + 1) as a feature cache's frame set."""
    names = tuple(f"{pair.name}#{view}" for pair in pairs for view in (0, 1))
    size = (pairs[0].camera0.height, pairs[0].camera0.width)
    return FrameSet("pairs", names, lambda index: pairs[index // 2].load_image(index % 2), size, identity)


def pair_correspondences(pair: CorrespondencePair, features: tuple[Features, Features], cfg: EvalCfg):
    """Probe3D's procedure on one pair, given each view's dense features: (pixel errors of the top-k matches at
    the matching scale, and the matched points' pixel coordinates in each full-size image)."""
    views = []
    for view in (0, 1):
        camera = (pair.camera0, pair.camera1)[view]
        height, width = camera.height, camera.width
        if tuple(features[view].image_size) != (height, width):
            raise DataError(f"pair {pair.name}: view {view} is {features[view].image_size[0]}x"
                            f"{features[view].image_size[1]} but its camera describes {height}x{width} images")
        small = (max(1, round(height * cfg.correspondence_scale)), max(1, round(width * cfg.correspondence_scale)))
        depth = torch.from_numpy(pair.load_depth(view))[None, None]
        depth = F.interpolate(depth, size=small, mode="nearest")[0, 0].double()
        small_camera = camera.resized(*small)
        valid = depth > 0
        points = unproject_depth(depth, small_camera)[valid]  # world = camera 0's frame
        # Features at each valid point's pixel centre, sampled bilinearly from the dense (cropped) feature map.
        dense = features[view].crop(features[view].tokens)  # [1, C, H, W]
        centres = pixel_centers(*small, dtype=torch.float32)[valid]
        grid = torch.stack([centres[:, 0] / small[1] * 2 - 1, centres[:, 1] / small[0] * 2 - 1], dim=-1)
        sampled = F.grid_sample(dense, grid[None, None].to(dense.device), mode="bilinear", align_corners=False)
        full_resolution = centres * torch.tensor([width / small[1], height / small[0]])  # for drawing
        views.append((points, sampled[0, :, 0].T.cpu(), full_resolution, small_camera))
    (points0, features0, pixels0, _), (points1, features1, pixels1, camera1) = views
    index0, index1, _ = match_features(features0, features1, top_k=cfg.correspondence_top_k)
    world_to_camera1 = camera1.world_to_camera
    errors = reprojection_errors(
        transform_points(world_to_camera1, points0[index0]), transform_points(world_to_camera1, points1[index1]),
        camera1.intrinsics,
    )
    return errors.float(), pixels0[index0], pixels1[index1]


def correspondence_probe(pair_features: FeatureSet, pairs: list[CorrespondencePair], cfg: EvalCfg, device="cpu",
                         description: str = "correspondence", progress: Progress | None = None):
    """Every pair's matches from the views' cached features (view 0 of pair k at index 2k, view 1 at 2k + 1)."""
    errors, rotations, first = [], [], None
    for index, pair in enumerate(track(pairs, description, progress, unit="pair")):
        views = (pair_features.view(2 * index, device), pair_features.view(2 * index + 1, device))
        pair_errors, pixels0, pixels1 = pair_correspondences(pair, views, cfg)
        errors.append(pair_errors)
        rotations.append(torch.full_like(pair_errors, pair.rotation_degrees))
        if first is None:
            first = (pair, pixels0, pixels1, pair_errors)
    all_errors, all_rotations = torch.cat(errors), torch.cat(rotations)
    binned = {f"recall_10px_rotation_{bin_name}": value for bin_name, value in binned_recall(all_errors, all_rotations).items()}
    return {**correspondence_recall(all_errors), **binned}, first
