"""``snd precompute-masks``: a segment label map for every frame the samples use, from one chosen source.

Usage::

    snd precompute-masks --config pipeline.yaml --set masks.source=felzenszwalb
    snd precompute-masks --shard 0/4 &  snd precompute-masks --shard 1/4 & ...   # one store, no merge step

One unit per scene: ``labels`` ``[F, H, W]`` int32 for the scene's used frames (positions in ``positions``),
at the images' resolution. The source and its parameters are recorded in the unit's attributes and the key.
"""

from __future__ import annotations

import numpy as np
import torch
from rich.progress import Progress

from ..config import DataCfg, MasksCfg, SamplingCfg, dump_sections, to_dict
from ..errors import DataError
from ..masks.sources import SamSegmenter, SuperpixelOptions, felzenszwalb_segments, slic_segments
from ..progress import track
from ..scenes.layout import read_scene
from ..store import Artifact, ArtifactSpec, ArtifactWriter, Store, file_sha256
from .common import Shard, StageResult, finish_if_complete, run_stage
from .sample_views import SampleSet, load_samples

STAGE = "masks"
SCHEMA_VERSION = 1


def used_positions(samples: SampleSet) -> dict[str, list[int]]:
    """Per scene, every frame position that appears as a context or target frame, sorted."""
    used: dict[str, set[int]] = {}
    for sample in samples.samples:
        used.setdefault(sample.scene, set()).update(sample.context, sample.targets)
    return {scene: sorted(positions) for scene, positions in sorted(used.items())}


def masks_spec(masks: MasksCfg, samples_key: str) -> ArtifactSpec:
    params = to_dict(masks)
    if masks.source != "sam":  # SAM settings do not change other sources' output, so keep them out of the key
        params = {k: v for k, v in params.items() if not k.startswith("sam_")}
    inputs = {"samples": samples_key}
    if masks.source == "sam" and masks.sam_checkpoint is not None:  # the checkpoint's contents, not where it lies
        del params["sam_checkpoint"]
        inputs["sam_checkpoint_sha256"] = file_sha256(masks.sam_checkpoint, "masks.sam_checkpoint")
    return ArtifactSpec(STAGE, SCHEMA_VERSION, params=params, inputs=inputs)


def make_segmenter(masks: MasksCfg):
    """A function ``(scene, position) -> [H, W] int32 labels`` for the configured source."""
    options = SuperpixelOptions(
        felzenszwalb_scale=masks.felzenszwalb_scale,
        felzenszwalb_sigma=masks.felzenszwalb_sigma,
        felzenszwalb_min_size=masks.felzenszwalb_min_size,
        slic_segments=masks.slic_segments,
        slic_compactness=masks.slic_compactness,
    )
    if masks.source == "gt":
        def ground_truth(scene, position):
            if not scene.has("instance_segmentation"):
                raise DataError(
                    f"masks.source = 'gt' but scene {scene.directory} has no instance_segmentation/ folder; "
                    "use masks.source felzenszwalb, slic or sam for data without instance masks"
                )
            return scene.load_instances(position).astype(np.int32)
        return ground_truth
    if masks.source == "felzenszwalb":
        return lambda scene, position: felzenszwalb_segments(scene.load_image(position), options)
    if masks.source == "slic":
        return lambda scene, position: slic_segments(scene.load_image(position), options)
    sam = SamSegmenter(masks.sam_checkpoint, masks.sam_model, masks.sam_points_per_side)
    return lambda scene, position: sam(scene.load_image(position))


def precompute_masks(
    data: DataCfg,
    sampling: SamplingCfg,
    masks: MasksCfg,
    store: Store,
    force: bool = False,
    shard: Shard = Shard(),
    progress: Progress | None = None,
) -> StageResult:
    """Write (or resume, or skip) the label maps of every frame the frozen samples use."""
    shard.allow_force(force)
    samples_artifact, samples = load_samples(store, data, sampling)
    spec = masks_spec(masks, samples_artifact.key)
    positions = used_positions(samples)
    config_yaml = dump_sections(data=data, sampling=sampling, masks=masks)

    def build(writer: ArtifactWriter) -> Artifact | None:
        writer.prepare({"mask_source": masks.source})
        segment = make_segmenter(masks)
        todo = [scene for scene in shard.select(list(positions)) if scene not in writer.done_units()]
        frames_total = sum(len(positions[scene]) for scene in todo)
        bar = track(_frames(todo, positions), "segmenting frames", progress, total=frames_total, unit="frame")
        for scene_id, scene_positions in _group_by_scene(bar):
            scene = read_scene(samples.dataset_root, scene_id)
            labels = np.stack([_checked(segment(scene, p), scene, p) for p in scene_positions])
            with writer.unit(scene_id) as group:
                group.create_array("labels", data=labels, chunks=(1, *labels.shape[1:]))
                group.create_array("positions", data=np.asarray(scene_positions, dtype=np.int32))
                group.attrs.update(
                    {"scene": scene_id, "source": masks.source, "frame_names": [scene.frames[p].name for p in scene_positions]}
                )
        frames = sum(len(p) for p in positions.values())
        return finish_if_complete(
            writer, list(positions), lambda: {"scenes": len(positions), "frames": frames, "source": masks.source}
        )

    return run_stage(store, spec, config_yaml, force, build, expected_units=len(positions), shard=shard)


def _frames(scenes, positions):
    for scene_id in scenes:
        for position in positions[scene_id]:
            yield scene_id, position


def _group_by_scene(frames):
    """Regroup a flat (scene, position) stream (flat so the progress bar counts frames) into per-scene lists."""
    current, collected = None, []
    for scene_id, position in frames:
        if scene_id != current and collected:
            yield current, collected
            collected = []
        current = scene_id
        collected.append(position)
    if collected:
        yield current, collected


def _checked(labels: np.ndarray, scene, position: int) -> np.ndarray:
    if labels.shape != (scene.camera.height, scene.camera.width):
        raise DataError(
            f"mask of {scene.directory}/{scene.frames[position].name} is {labels.shape}, expected the image size "
            f"{(scene.camera.height, scene.camera.width)}"
        )
    if labels.size == 0:
        raise DataError(f"mask of {scene.directory}/{scene.frames[position].name} is empty")
    return labels.astype(np.int32)


def load_masks(store: Store, masks: MasksCfg, samples_key: str) -> Artifact:
    spec = masks_spec(masks, samples_key)
    return store.open(spec.stage, spec.key, SCHEMA_VERSION)


class MaskReader:
    """Reads one frame's labels from a masks artifact, keeping each scene's unit open."""

    def __init__(self, masks: Artifact):
        self.masks = masks
        self._units: dict[str, tuple[dict[int, int], object]] = {}

    def __call__(self, scene_id: str, position: int) -> torch.Tensor:
        """``[H, W]`` int64 labels of frame ``position`` of ``scene_id``."""
        return torch.from_numpy(self.stored(scene_id, position)).long()

    def stored(self, scene_id: str, position: int) -> np.ndarray:
        """``[H, W]`` labels of frame ``position`` of ``scene_id`` as stored (int32)."""
        if scene_id not in self._units:
            unit = self.masks.unit(scene_id)
            rows = {int(p): row for row, p in enumerate(unit["positions"][...])}
            self._units[scene_id] = (rows, unit["labels"])
        rows, labels = self._units[scene_id]
        return np.asarray(labels[rows[position]])
