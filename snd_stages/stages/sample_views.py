"""``snd sample-views``: freeze (scene, context pair, targets) samples into a manifest the later stages read.

Usage::

    snd sample-views --config pipeline.yaml --set sampling.frame_gap=[8,8]

The artifact ``samples/<key>`` holds ``samples.json``: the dataset root and fingerprint, each scene's sorted
frame names, and the samples as positions in those lists. Its key covers the sampling parameters and the
dataset's content fingerprint, so editing the data or the parameters makes a new, separate sample set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.progress import Progress

from ..config import DataCfg, SamplingCfg, dump_sections, to_dict
from ..errors import ArtifactError
from ..scenes.layout import dataset_fingerprint, list_scene_ids, read_scene
from ..scenes.sampling import ViewSample, sample_scene
from ..store import Artifact, ArtifactSpec, ArtifactWriter, Store
from ..progress import track
from .common import StageResult, run_stage

STAGE = "samples"
SCHEMA_VERSION = 1
SAMPLES_FILE = "samples.json"


@dataclass(frozen=True)
class SampleSet:
    """The frozen samples, with each scene's frame names so positions can be resolved to files.

    Attributes:
        dataset_root: where the scenes are now (``data.root``).
    """

    dataset_root: Path
    frame_names: dict[str, list[str]]
    samples: list[ViewSample]


def samples_spec(data: DataCfg, sampling: SamplingCfg) -> ArtifactSpec:
    scene_ids = list_scene_ids(data.root, sampling.split)
    return ArtifactSpec(
        stage=STAGE,
        schema_version=SCHEMA_VERSION,
        params={"sampling": to_dict(sampling), "dataset": data.dataset},
        inputs={"scenes": dataset_fingerprint(data.root, scene_ids)},
    )


def sample_views(
    data: DataCfg, sampling: SamplingCfg, store: Store, force: bool = False, progress: Progress | None = None
) -> StageResult:
    """Draw the samples of every scene in ``sampling.split`` and store them as one artifact."""
    spec = samples_spec(data, sampling)
    config_yaml = dump_sections(data=data, sampling=sampling)

    def build(writer: ArtifactWriter) -> Artifact:
        writer.prepare()
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
        writer.write_json(
            SAMPLES_FILE,
            {
                "dataset_root": str(data.root),
                "frame_names": frame_names,
                "skipped_short_scenes": short_scenes,
                "samples": [sample.to_json() for sample in samples],
            },
        )
        return writer.finish(counts={"samples": len(samples), "scenes": len(frame_names), "short_scenes": len(short_scenes)})

    return run_stage(store, spec, config_yaml, force, build)


def load_samples(store: Store, data: DataCfg, sampling: SamplingCfg) -> tuple[Artifact, SampleSet]:
    """The frozen samples that ``sample_views`` made for this config (error if it has not run)."""
    spec = samples_spec(data, sampling)
    try:
        artifact = store.open(spec.stage, spec.key, SCHEMA_VERSION)
    except ArtifactError as error:
        never_started = not (store.final_path(spec.stage, spec.key).exists()
                             or store.partial_path(spec.stage, spec.key).exists())
        changes = store.describe_changes(spec)
        if never_started and changes and all(line.startswith("inputs.scenes") for line in changes):
            # The samples of these very settings exist for other files: say so, rather than only "run it".
            raise ArtifactError(
                f"{error}. The store's newest samples have these settings but other scene files: the scenes under "
                f"{data.root} changed since snd sample-views ran (a file added, removed or rewritten; on several "
                f"machines, a copy of the data that did not keep its files' modification times)"
            ) from None
        raise
    document = artifact.read_json(SAMPLES_FILE)
    # The scenes are read where data.root points now, not where they were sampled (samples.json keeps that for
    # the record): the key holds their content identity, so a moved or copied dataset is found by it.
    return artifact, SampleSet(
        dataset_root=Path(data.root),
        frame_names=document["frame_names"],
        samples=[ViewSample.from_json(entry) for entry in document["samples"]],
    )
