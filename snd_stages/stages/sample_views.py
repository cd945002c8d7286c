"""``snd sample-views``: freeze (scene, context pair, targets) samples into a manifest the later stages read.

Usage::

    snd sample-views --config pipeline.yaml --set sampling.frame_gap=[8,8]

Writes the samples artifact (:mod:`snd_stages.artifacts.samples`).
"""

from __future__ import annotations

from pathlib import Path

from rich.progress import Progress

from ..artifacts.protocol import StageResult, run_stage
from ..artifacts.samples import SampleSet, samples_spec, write_samples
from ..config import DataCfg, SamplingCfg, dump_sections
from ..errors import ArtifactError
from ..progress import track
from ..scenes.layout import list_scene_ids, read_scene
from ..scenes.sampling import ViewSample, sample_scene
from ..store import Artifact, ArtifactWriter, Store


def sample_views(
    data: DataCfg, sampling: SamplingCfg, store: Store, force: bool = False, progress: Progress | None = None
) -> StageResult:
    """Draw the samples of every scene in ``sampling.split`` and store them as one artifact."""
    spec = samples_spec(data, sampling)
    config_yaml = dump_sections(data=data, sampling=sampling)

    def build(writer: ArtifactWriter) -> Artifact:
        frame_names: dict[str, list[str]] = {}
        samples: list[ViewSample] = []
        short_scenes = []
        for scene_id in track(list_scene_ids(data.root, sampling.split), "sampling views", progress, unit="scene"):
            scene = read_scene(data.root, scene_id)
            frame_names[scene_id] = [frame.name for frame in scene.frames]
            drawn = sample_scene(scene_id, [frame.number for frame in scene.frames], sampling)
            if not drawn:
                short_scenes.append(scene_id)
            samples.extend(drawn)
        if not samples:
            raise ArtifactError(
                f"no samples could be drawn from {data.root}: every scene is shorter than "
                f"sampling.frame_gap[0] + 1 = {sampling.frame_gap[0] + 1} frames; lower sampling.frame_gap"
            )
        return write_samples(writer, SampleSet(Path(data.root), frame_names, samples), short_scenes)

    return run_stage(store, spec, config_yaml, force, build)
