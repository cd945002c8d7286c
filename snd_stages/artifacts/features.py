"""A backbone's probe features of a frame set, cached in the artifact store, so that the backbone runs once per
model, frame set and spec.

Running the backbone is the only expensive part of ``snd eval`` that does not depend on the probe settings. Its
output is stored as artifacts of the stage ``features``; a later eval (other probe steps, learning rate, probes)
finds them and never runs the backbone again.

One artifact per (model weights, frame set, feature spec). Its key (:func:`features_artifact_spec`) covers:

- the weights' identity (:attr:`ProbeBackbone.identity`): the sha256 of the checkpoint file, of the embedded
  ONNX graph, or, for random weights, of the initialised tensors; and the backbone's name;
- the frame set's identity (:attr:`FrameSet.key`): its name, frame names, image size and a fingerprint of the
  images' source (the image files' names, sizes and modification times, as
  :func:`snd_stages.scenes.layout.dataset_fingerprint` does; for NYUv2 the ``.mat`` file's);
- the feature spec: absolute block indices, final norm, CLS concatenation, the preprocessing (the backbone's
  normalisation, zero centre-padding to multiples of its patch size: :func:`preprocessing`) and the stored dtype.

Layout: units ``00000``, ``00001``, ... of :data:`FRAMES_PER_UNIT` consecutive frames each, holding ``tokens``
``[n, C, h, w]`` float16 (one Zarr chunk per frame), with the unit's first frame index, frame names, padding and
image size in its attributes. Units are written one by one through :class:`~snd_stages.store.ArtifactWriter`:
a killed run keeps its finished units and the rerun computes only the others; the artifact appears only when
complete, so a partial one is never read. Features are extracted in batches of :data:`EXTRACTION_BATCH` frames
aligned to the units (:func:`~snd_stages.probes.features.extract_features`), so a resumed run computes exactly what
an uninterrupted one would have.

Reading (:func:`read_features`): a set no larger than ``eval.feature_memory_gb`` is read into memory once, as
float16; a larger one is read from the store for every minibatch. Either way the probes see the same float16
values, so cached and freshly extracted features give identical results.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from rich.progress import Progress

from ..models.backbones import BackboneSpec
from ..probes.backbone import FeatureSpec, ProbeBackbone, centre_padding
from ..probes.features import EXTRACTION_BATCH, FeatureSet, FrameSet, extract_features, features_in_memory
from ..store import Artifact, ArtifactSpec, ArtifactWriter, Store
from .protocol import producing

STAGE = "features"
SCHEMA_VERSION = 1
FRAMES_PER_UNIT = 32  # a multiple of EXTRACTION_BATCH: batches never straddle units


def preprocessing(backbone: BackboneSpec) -> str:
    """How images become the backbone's input, in words, for the key (for DINOv2 "ImageNet mean/std, zero
    centre-padding to multiples of 14")."""
    return f"{backbone.normalisation.name} mean/std, zero centre-padding to multiples of {backbone.patch}"


@dataclass(frozen=True)
class CacheUse:
    """How one feature artifact was obtained: ``reused`` (found complete), ``computed``, ``resumed`` (some units
    were left by an interrupted run) or ``in memory`` (no store)."""

    model: str
    frames: str
    spec: str
    key: str | None
    status: str


def features_artifact_spec(backbone: ProbeBackbone, frames: FrameSet, spec: FeatureSpec) -> ArtifactSpec:
    resolved = spec.resolved(backbone.depth)
    params = {
        "backbone": backbone.name,
        "blocks": list(resolved.blocks),
        "final_norm": resolved.final_norm,
        "with_cls": resolved.with_cls,
        "image_size": list(frames.image_size),
        "preprocessing": preprocessing(backbone.backbone_spec),
        "dtype": "float16",
        "frames_per_unit": FRAMES_PER_UNIT,
        "extraction_batch": EXTRACTION_BATCH,
    }
    return ArtifactSpec(STAGE, SCHEMA_VERSION, params=params,
                        inputs={"weights": backbone.identity, "frames": frames.key})


def probe_features(
    backbone: ProbeBackbone,
    frames: FrameSet,
    specs: Sequence[FeatureSpec],
    store: Store | None,
    config_yaml: str,
    memory_bytes: float,
    progress: Progress | None = None,
) -> tuple[dict[FeatureSpec, FeatureSet], list[CacheUse]]:
    """Features of ``frames`` under every spec in ``specs``: read from ``store`` where cached, else extracted.

    Missing specs are extracted together, one backbone pass per batch for all of them, and written unit by unit
    through the artifact protocol (:func:`~snd_stages.artifacts.protocol.producing`: resuming the units an
    interrupted run left, refusing a second writer). Without a store they are only kept in memory (float16, as the
    store would hold them).

    Returns:
        the feature sets by spec, and how each was obtained.
    """
    specs = list(dict.fromkeys(specs))
    described = {spec: spec.describe(class_token=backbone.backbone_spec.class_tokens > 0) for spec in specs}
    if store is None:
        sets = features_in_memory(backbone, frames, specs, progress)
        return sets, [CacheUse(backbone.label, frames.name, described[spec], None, "in memory") for spec in specs]
    units = [range(start, min(start + FRAMES_PER_UNIT, len(frames))) for start in range(0, len(frames), FRAMES_PER_UNIT)]
    unit_names = [f"{index:05d}" for index in range(len(units))]
    padding = centre_padding(*frames.image_size, multiple=backbone.backbone_spec.patch)
    with contextlib.ExitStack() as held:
        productions = {spec: held.enter_context(producing(store, features_artifact_spec(backbone, frames, spec),
                                                          config_yaml)) for spec in specs}
        writing = {spec: production.writer for spec, production in productions.items() if not production.reused}
        for spec, writer in writing.items():
            writer.prepare({"backbone": backbone.name, "weights": backbone.weights, "frames": frames.name,
                            "features": described[spec], "padding": list(padding),
                            "image_size": list(frames.image_size)})
        done = {spec: writer.done_units() for spec, writer in writing.items()}
        todo = [(unit, [spec for spec in writing if unit_names[unit] not in done[spec]]) for unit in range(len(units))]
        todo = [(unit, wanted) for unit, wanted in todo if wanted]
        extracted = extract_features(backbone, frames, [(units[unit], wanted) for unit, wanted in todo], progress)
        for (unit, _), tokens in zip(todo, extracted):
            for spec, values in tokens.items():
                _write_unit(writing[spec], unit_names[unit], values, units[unit], frames, padding)
        for spec, writer in writing.items():
            productions[spec].artifact = writer.finish(expected_units=unit_names,
                                                       counts={"frames": len(frames), "units": len(unit_names)})
    sets = {spec: read_features(productions[spec].artifact, memory_bytes) for spec in specs}
    uses = [CacheUse(backbone.label, frames.name, described[spec], productions[spec].artifact.key,
                     productions[spec].status) for spec in specs]
    return sets, uses


def read_features(artifact: Artifact, memory_bytes: float) -> FeatureSet:
    """Read a complete features artifact: into memory if it is at most ``memory_bytes``, else on demand."""
    names = artifact.units()
    arrays = [artifact.unit(name)["tokens"] for name in names]
    first = dict(artifact.unit(names[0]).attrs)
    if sum(array.nbytes for array in arrays) <= memory_bytes:
        joined = np.empty((sum(array.shape[0] for array in arrays), *arrays[0].shape[1:]), dtype=np.float16)
        start = 0
        for array in arrays:
            joined[start : start + array.shape[0]] = array[...]
            start += array.shape[0]
        arrays = [joined]
    return FeatureSet(arrays, tuple(first["padding"]), tuple(first["image_size"]))




def _write_unit(writer: ArtifactWriter, name: str, tokens: np.ndarray, frame_range: range, frames: FrameSet,
                padding: tuple[int, int, int, int]) -> None:
    with writer.unit(name) as group:
        group.create_array("tokens", data=tokens, chunks=(1, *tokens.shape[1:]))
        group.update_attributes({"start": frame_range.start, "names": [frames.names[i] for i in frame_range],
                            "padding": list(padding), "image_size": list(frames.image_size)})
