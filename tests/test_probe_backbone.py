"""The probes' backbone interface: blocks, final norm, CLS concatenation, centre padding."""

from __future__ import annotations

import pytest
import torch

from snd_stages.artifacts.runs import run_backbone
from snd_stages.errors import ArtifactError
from snd_stages.models.tokens import patch_tokens
from snd_stages.probes.backbone import (
    DEPTH_FEATURES,
    MULTI_BLOCK_FEATURES,
    SEGMENTATION_FEATURES,
    FeatureSpec,
    ProbeBackbone,
    centre_pad,
)


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="random weights"):
        return ProbeBackbone("dinov2_vits14", "random", "random ViT-S", allow_random=True)


def test_last_block_with_final_norm_is_the_training_feature(backbone):
    images = torch.rand(2, 3, 56, 70)  # already multiples of 14: no padding
    features = backbone.features(images, SEGMENTATION_FEATURES)
    assert features.padding == (0, 0, 0, 0) and features.tokens.shape == (2, 384, 4, 5)
    torch.testing.assert_close(features.tokens, patch_tokens(backbone.model, backbone.backbone_spec, images), atol=1e-5, rtol=1e-5)


def test_depth_features_concatenate_the_unnormed_cls(backbone):
    images = torch.rand(1, 3, 56, 70)
    features = backbone.features(images, DEPTH_FEATURES)
    assert features.tokens.shape == (1, 768, 4, 5)
    cls = features.tokens[:, 384:]
    assert (cls == cls[..., :1, :1]).all()  # broadcast over space
    dense = backbone.features(images, FeatureSpec((-1,), final_norm=False))
    torch.testing.assert_close(features.tokens[:, :384], dense.tokens)
    normed = backbone.features(images, SEGMENTATION_FEATURES)
    assert not torch.allclose(dense.tokens, normed.tokens)


def test_multi_block_features_stack_four_blocks(backbone):
    features = backbone.features(torch.rand(1, 3, 28, 42), MULTI_BLOCK_FEATURES)
    assert features.tokens.shape == (1, 4 * 384, 2, 3)
    blocks = features.tokens.split(384, dim=1)
    assert not torch.allclose(blocks[0], blocks[-1])


def test_centre_padding_and_crop_back():
    images = torch.rand(1, 3, 50, 61)
    padded, padding = centre_pad(images, 14)
    assert padded.shape[-2:] == (56, 70) and padding == (3, 3, 4, 5)
    torch.testing.assert_close(padded[..., 3:53, 4:65], images)


def test_crop_maps_padded_predictions_to_the_image(backbone):
    features = backbone.features(torch.rand(1, 3, 50, 61), DEPTH_FEATURES)
    constant = torch.full((1, 2, *features.tokens.shape[-2:]), 7.0)
    cropped = features.crop(constant)
    assert cropped.shape == (1, 2, 50, 61)
    torch.testing.assert_close(cropped, torch.full_like(cropped, 7.0))


def test_run_without_manifest_is_refused(tmp_path):
    with pytest.raises(ArtifactError, match="not a finished training run"):
        run_backbone(tmp_path)


def test_one_pass_for_several_specs_gives_what_separate_passes_give(backbone):
    images = torch.rand(2, 3, 50, 61)
    specs = [DEPTH_FEATURES, SEGMENTATION_FEATURES, MULTI_BLOCK_FEATURES]
    for spec, together in zip(specs, backbone.features_many(images, specs)):
        alone = backbone.features(images, spec)
        torch.testing.assert_close(together.tokens, alone.tokens, rtol=0, atol=0)
        assert together.padding == alone.padding and together.image_size == alone.image_size


def test_checkpoint_identity_is_the_file_content(backbone, tmp_path):
    import hashlib

    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({name: tensor.contiguous() for name, tensor in backbone.model.state_dict().items()}, path)
    loaded = ProbeBackbone("dinov2_vits14", path, "from a file")
    assert loaded.identity == f"checkpoint sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}"
    assert backbone.identity.startswith("random tensors sha256:") and backbone.identity != loaded.identity
