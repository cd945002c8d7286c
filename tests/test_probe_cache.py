"""The probes' feature cache: one store artifact per (weights, frame set, spec), resumable, read lazily or at once."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from timm.layers import PatchEmbed

from snd_stages.errors import ArtifactError
from snd_stages.probes.backbone import DENSE_FEATURES, DEPTH_FEATURES, SEGMENTATION_FEATURES, ProbeBackbone
from snd_stages.artifacts.features import FRAMES_PER_UNIT, STAGE, features_artifact_spec, probe_features, read_features
from snd_stages.probes.features import FrameSet
from snd_stages.store import Store

SPECS = [DEPTH_FEATURES, SEGMENTATION_FEATURES]


@contextlib.contextmanager
def counting_backbone_passes():
    """Images passed through any ViT (its patch embedding runs once per forward), counted by a global hook."""
    images = []

    def hook(module, args):
        if isinstance(module, PatchEmbed):
            images.append(args[0].shape[0])

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield images
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="random weights"):
        return ProbeBackbone("dinov2_vits14", "random", "random ViT-S", allow_random=True)


def frame_set(count: int = FRAMES_PER_UNIT + 8, fail_at: int | None = None) -> FrameSet:
    pictures = np.random.default_rng(0).integers(0, 255, (count, 30, 44, 3), dtype=np.uint8)

    def load(index: int) -> np.ndarray:
        if index == fail_at:
            raise KeyboardInterrupt  # the run is killed while extracting the second unit
        return pictures[index]

    return FrameSet("test", tuple(f"frame{i}" for i in range(count)), load, (30, 44), {"source": "random pictures"})


def test_an_interrupted_extraction_resumes_to_the_uninterrupted_result(backbone, tmp_path):
    store = Store(tmp_path / "store")
    with pytest.raises(KeyboardInterrupt):
        probe_features(backbone, frame_set(fail_at=FRAMES_PER_UNIT + 3), SPECS, store, "", memory_bytes=2**30)
    key = features_artifact_spec(backbone, frame_set(), DEPTH_FEATURES).key
    with pytest.raises(ArtifactError, match="incomplete"):
        store.open(STAGE, key)  # the first unit is kept, but the artifact is not there yet

    with counting_backbone_passes() as passes:
        resumed, uses = probe_features(backbone, frame_set(), SPECS, store, "", memory_bytes=2**30)
    assert sum(passes) == 8  # only the unfinished unit's frames, both specs from one pass
    assert [use.status for use in uses] == ["resumed", "resumed"] and uses[0].key == key

    fresh, fresh_uses = probe_features(backbone, frame_set(), SPECS, None, "", memory_bytes=2**30)
    assert [use.status for use in fresh_uses] == ["in memory", "in memory"]
    everything = torch.arange(len(frame_set()))
    for spec in SPECS:
        torch.testing.assert_close(resumed[spec].batch(everything), fresh[spec].batch(everything), rtol=0, atol=0)
        assert resumed[spec].memory is not None  # small enough to be read into memory

    with counting_backbone_passes() as passes:
        _, again = probe_features(backbone, frame_set(), SPECS, store, "", memory_bytes=2**30)
    assert passes == [] and [use.status for use in again] == ["reused", "reused"]


def test_float16_features_as_a_fresh_extraction_gives_them(backbone):
    sets, _ = probe_features(backbone, frame_set(count=3), [DENSE_FEATURES], None, "", memory_bytes=0)
    images = torch.stack([frame_set(count=3).image(i) for i in range(3)])
    expected = backbone.features(images, DENSE_FEATURES).tokens.half().float()
    torch.testing.assert_close(sets[DENSE_FEATURES].batch([0, 1, 2]), expected, rtol=0, atol=0)
    assert sets[DENSE_FEATURES].padding == (6, 6, 6, 6) and sets[DENSE_FEATURES].image_size == (30, 44)


def test_reading_per_minibatch_equals_reading_at_once(backbone, tmp_path):
    store = Store(tmp_path / "store")
    probe_features(backbone, frame_set(), [DENSE_FEATURES], store, "", memory_bytes=0)
    artifact = store.open(STAGE, features_artifact_spec(backbone, frame_set(), DENSE_FEATURES).key)
    lazy, loaded = read_features(artifact, 0), read_features(artifact, 2**30)
    assert lazy.memory is None and loaded.memory is not None and len(lazy) == len(loaded) == FRAMES_PER_UNIT + 8
    indices = torch.tensor([FRAMES_PER_UNIT + 5, 2, 2, FRAMES_PER_UNIT, 31])  # across units, unordered, repeated
    torch.testing.assert_close(lazy.batch(indices), loaded.batch(indices), rtol=0, atol=0)
    assert lazy.view(2).tokens.shape == (1, 384, 3, 4)


def test_key_follows_weights_frames_and_spec(backbone):
    base = features_artifact_spec(backbone, frame_set(), DENSE_FEATURES).key
    assert features_artifact_spec(backbone, frame_set(), SEGMENTATION_FEATURES).key != base
    other_frames = FrameSet("test", frame_set().names, frame_set().load, (30, 44), {"source": "other pictures"})
    assert features_artifact_spec(backbone, other_frames, DENSE_FEATURES).key != base
    torch.manual_seed(1)
    with pytest.warns(UserWarning, match="random weights"):
        other = ProbeBackbone("dinov2_vits14", "random", "another random ViT-S", allow_random=True)
    assert other.identity != backbone.identity
    assert features_artifact_spec(other, frame_set(), DENSE_FEATURES).key != base
