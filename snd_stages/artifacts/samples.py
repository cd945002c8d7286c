"""The frozen samples: (scene, context pair, targets), as positions in each scene's sorted frame names.

The artifact ``samples/<key>`` holds ``samples.json``: the dataset root and fingerprint, each scene's sorted frame
names, and the samples. Its key covers the sampling parameters and the dataset's content fingerprint, so editing the
data or the parameters makes a new, separate sample set. ``snd sample-views`` writes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import DataCfg, SamplingCfg, to_dict
from ..errors import ArtifactError
from ..scenes.layout import dataset_fingerprint, list_scene_ids
from ..scenes.sampling import ViewSample
from ..store import Artifact, ArtifactSpec, ArtifactWriter, Store

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


def write_samples(writer: ArtifactWriter, samples: SampleSet, short_scenes: list[str]) -> Artifact:
    """Write and publish ``samples`` (``short_scenes``: scenes too short to draw any sample from, for the record)."""
    writer.prepare()
    writer.write_json(
        SAMPLES_FILE,
        {
            "dataset_root": str(samples.dataset_root),
            "frame_names": samples.frame_names,
            "skipped_short_scenes": short_scenes,
            "samples": [sample.to_json() for sample in samples.samples],
        },
    )
    return writer.finish(counts={"samples": len(samples.samples), "scenes": len(samples.frame_names),
                                 "short_scenes": len(short_scenes)})


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
