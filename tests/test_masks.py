"""Mask sources: superpixels follow image boundaries; SAM loads a local checkpoint or says what is missing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from snd_stages.errors import ConfigError
from snd_stages.masks.sources import (FelzenszwalbSettings, SamSegmenter, SlicSettings, felzenszwalb_segments,
                                      slic_segments)


def two_region_image() -> np.ndarray:
    rng = np.random.default_rng(0)
    image = np.zeros((48, 64, 3), np.uint8)
    image[:, :30] = [200, 40, 40]
    image[:, 30:] = [30, 60, 210]
    return np.clip(image + rng.integers(-6, 7, image.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("segment, settings", [(felzenszwalb_segments, FelzenszwalbSettings(min_size=20)),
                                               (slic_segments, SlicSettings(segments=12))])
def test_superpixels_never_straddle_a_colour_edge(segment, settings):
    image = two_region_image()
    labels = segment(image, settings)
    assert labels.shape == (48, 64) and labels.dtype == np.int32 and labels.min() >= 1
    left, right = set(np.unique(labels[:, :30])), set(np.unique(labels[:, 30:]))
    assert left.isdisjoint(right)


def test_felzenszwalb_is_deterministic_and_scale_controls_granularity():
    from skimage.data import astronaut
    from skimage.transform import resize

    image = (resize(astronaut(), (96, 96)) * 255).astype(np.uint8)
    fine = felzenszwalb_segments(image, FelzenszwalbSettings(scale=20, min_size=5))
    coarse = felzenszwalb_segments(image, FelzenszwalbSettings(scale=500, min_size=5))
    assert np.array_equal(fine, felzenszwalb_segments(image, FelzenszwalbSettings(scale=20, min_size=5)))
    assert len(np.unique(fine)) > 2 * len(np.unique(coarse)) > 2


def test_sam_without_a_checkpoint_says_what_to_set(tmp_path):
    with pytest.raises(ConfigError, match="masks.sam.checkpoint.*never downloads"):
        SamSegmenter(None)
    with pytest.raises(ConfigError, match="does not exist"):
        SamSegmenter(tmp_path / "sam_vit_h.pth")


@pytest.mark.slow
def test_sam_loads_a_local_checkpoint_and_labels_every_pixel(tmp_path):
    from segment_anything import sam_model_registry

    checkpoint = tmp_path / "sam_vit_b_random.pth"
    torch.manual_seed(0)
    torch.save(sam_model_registry["vit_b"]().state_dict(), checkpoint)
    with pytest.raises(ConfigError, match="does not fit masks.sam.model = 'vit_h'"):
        SamSegmenter(checkpoint, "vit_h")
    segmenter = SamSegmenter(checkpoint, "vit_b", points_per_side=2)
    labels = segmenter(two_region_image())
    assert labels.shape == (48, 64) and labels.min() >= 1  # masks or, where none, connected uncovered regions
