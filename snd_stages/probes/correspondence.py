"""Probe3D's training-free multi-view correspondence probe: pairs of held-out views, matched by their features.

``snd eval`` runs it on every model beside the other probes; ``snd train`` runs it on the current student to draw
a learning curve (:mod:`snd_stages.probes.learning_curves`).
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
from .features import FeatureSet, FrameSet
from ..report.statistics import Measurement
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
    """Every pair's matches from the views' cached features (view 0 of pair k at index 2k, view 1 at 2k + 1).

    Returns recall at 5/10/20 px and recall at 10 px per relative-rotation bin, each a rate pooled over all matches
    of all pairs (Probe3D's), as measurements whose parts are each pair's hits and matches (one "seed": nothing is
    fitted), and the first pair's matches for the figure.
    """
    hits, matches, first = {}, [], None
    binned_hits, binned_matches = {}, {}
    for index, pair in enumerate(track(pairs, description, progress, unit="pair")):
        views = (pair_features.view(2 * index, device), pair_features.view(2 * index + 1, device))
        pair_errors, pixels0, pixels1 = pair_correspondences(pair, views, cfg)
        count = pair_errors.numel()
        matches.append(count)
        for key, recall in correspondence_recall(pair_errors).items():
            hits.setdefault(key, []).append(0.0 if count == 0 else round(recall * count))
        # A pair's matches all fall in the one bin of its rotation; the other bins get none of them.
        for name, recall in binned_recall(pair_errors, pair.rotation_degrees).items():
            inside = not math.isnan(recall)
            binned_hits.setdefault(f"recall_10px_rotation_{name}", []).append(round(recall * count) if inside else 0)
            binned_matches.setdefault(f"recall_10px_rotation_{name}", []).append(count if inside else 0)
        if first is None:
            first = (pair, pixels0, pixels1, pair_errors)
    measurements = {key: Measurement.of_rates([values], [matches]) for key, values in hits.items()}
    measurements.update({key: Measurement.of_rates([values], [binned_matches[key]])
                         for key, values in binned_hits.items()})
    return measurements, first
