"""``snd precompute-masks``: a segment label map for every frame the samples use, from one chosen source.

Usage::

    snd precompute-masks --config pipeline.yaml --set masks.source=felzenszwalb
    snd precompute-masks --shard 0/4 &  snd precompute-masks --shard 1/4 & ...   # one store, no merge step

Writes the masks artifact (:mod:`snd_stages.artifacts.masks`): one unit per scene, the labels of every frame the
samples use.
"""

from __future__ import annotations

import numpy as np
from rich.progress import Progress

from ..artifacts.masks import masks_spec, used_positions, write_scene_masks
from ..artifacts.protocol import Shard, StageResult, finish_if_complete, run_stage
from ..artifacts.samples import load_samples
from ..config import DataCfg, SamplingCfg, dump_sections
from ..errors import DataError
from ..masks import MasksCfg
from ..progress import track
from ..scenes.layout import read_scene
from ..store import Artifact, ArtifactWriter, Store

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
        segment = masks.segmenter()
        todo = [scene for scene in shard.select(list(positions)) if scene not in writer.done_units()]
        frames_total = sum(len(positions[scene]) for scene in todo)
        bar = track(_frames(todo, positions), "segmenting frames", progress, total=frames_total, unit="frame")
        for scene_id, scene_positions in _group_by_scene(bar):
            scene = read_scene(samples.dataset_root, scene_id)
            labels = np.stack([_checked(segment(scene, p), scene, p) for p in scene_positions])
            write_scene_masks(writer, scene_id, scene_positions, [scene.frames[p].name for p in scene_positions],
                              labels, masks.source)
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
