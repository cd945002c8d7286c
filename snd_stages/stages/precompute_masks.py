"""``snd precompute-masks``: a segment label map for every frame the samples use, from one chosen source.

Usage::

    snd precompute-masks --config pipeline.yaml --set masks.source=felzenszwalb
    snd precompute-masks --shard 0/4 &  snd precompute-masks --shard 1/4 & ...   # one store, no merge step

Writes the masks artifact (:mod:`snd_stages.artifacts.masks`): one unit per scene, the labels of every frame the
samples use.
"""

from __future__ import annotations

import functools

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
from ..throughput import ordered_map, phase, timed


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
        scene_of = functools.lru_cache(maxsize=None)(functools.partial(read_scene, samples.dataset_root))
        frames = list(_frames(todo, positions))

        def label(frame: tuple[str, int]) -> tuple[tuple[str, int], np.ndarray]:
            scene = scene_of(frame[0])
            return frame, _checked(segment(scene, frame[1]), scene, frame[1])

        # Frames are segmented (or, for gt, decoded) by several threads ahead of the writer, in order.
        label = timed("compute", label)
        segmented = ordered_map(label, frames) if masks.frames_at_once else map(label, frames)
        labelled = track(segmented, "segmenting frames", progress, total=len(frames), unit="frame")
        for scene_id, scene_labels in _group_by_scene(labelled):
            scene = scene_of(scene_id)
            scene_positions = [position for position, _ in scene_labels]
            with phase("write"):
                write_scene_masks(writer, scene_id, scene_positions, [scene.frames[p].name for p in scene_positions],
                                  np.stack([labels for _, labels in scene_labels]), masks.source)
        total = sum(len(p) for p in positions.values())
        with phase("publish"):
            return finish_if_complete(
                writer, list(positions), lambda: {"scenes": len(positions), "frames": total, "source": masks.source}
            )

    return run_stage(store, spec, config_yaml, force, build, expected_units=len(positions), shard=shard)


def _frames(scenes, positions):
    for scene_id in scenes:
        for position in positions[scene_id]:
            yield scene_id, position


def _group_by_scene(labelled):
    """Regroup a flat ``((scene, position), labels)`` stream (flat so the progress bar counts frames) into
    ``(scene, [(position, labels), ...])`` per scene."""
    current, collected = None, []
    for (scene_id, position), labels in labelled:
        if scene_id != current and collected:
            yield current, collected
            collected = []
        current = scene_id
        collected.append((position, labels))
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
