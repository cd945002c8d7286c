"""The backbone registry: lookups, the DINOv2 entries' artifact keys, and a patch-16 backbone through every stage
that cuts images into patches (token grids, probe padding and features, the teacher operators, training targets)."""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F

from snd_stages.config import TrainCfg
from snd_stages.errors import ConfigError, DataError
from snd_stages.models.backbones import (
    BackboneSpec,
    Normalisation,
    backbone_spec,
    register_backbone,
    registered_backbones,
    unregister_backbone,
)
from snd_stages.models.checkpoint_formats import TIMM, keep_timm_names
from snd_stages.models.tokens import patch_tokens
from snd_stages.models.weights import create_backbone
from snd_stages.probes.backbone import (
    DEPTH_FEATURES,
    MULTI_BLOCK_FEATURES,
    SEGMENTATION_FEATURES,
    ProbeBackbone,
    centre_padding,
)
from snd_stages.artifacts.features import features_artifact_spec, probe_features
from snd_stages.artifacts.gaussians import load_gaussians
from snd_stages.artifacts.masks import load_masks
from snd_stages.artifacts.operators import load_operators, operators_spec, read_operator
from snd_stages.artifacts.samples import load_samples
from snd_stages.models.checkpoints import build_model
from snd_stages.probes.features import FrameSet
from snd_stages.stages.train import teacher_targets
from snd_stages.store import hash_json
from tests.conftest import build_demo_artifacts
from tests.test_splat_operator import RELATIVE_TOLERANCE, config, relative_error, training_data

# timm's ViT-Ti/16 (5.5 M parameters, no registers) with the Inception normalisation its timm weights use: every
# value that DINOv2 fixes (patch 14, ImageNet mean/std) differs, so a constant left anywhere shows up.
TINY16 = BackboneSpec(
    "vit_tiny16", "vit_tiny_patch16_224", patch=16, embed_dim=192, depth=12, registers=0,
    normalisation=Normalisation("Inception", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    lora_targets=("attn.qkv", "attn.proj"), converters={TIMM: keep_timm_names},
)


@pytest.fixture(scope="module")
def tiny16():
    register_backbone(TINY16)
    yield TINY16
    unregister_backbone(TINY16.name)


# ---------------------------------------------------------------------------------------------------------------
# The registry


def test_lookup_names_the_known_backbones_for_an_unknown_one():
    assert backbone_spec("dinov2_vitb14_reg").timm_name == "vit_base_patch14_reg4_dinov2"
    assert [spec.name for spec in registered_backbones()][:6] == ["dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14",
                                                                  "dinov2_vits14_reg", "dinov2_vitb14_reg",
                                                                  "dinov2_vitl14_reg"]
    with pytest.raises(ConfigError,
                       match=r"unknown backbone 'dinov4_vits16'; choose one of dinov2_vits14, .*, radio_v3_vitl16$"):
        backbone_spec("dinov4_vits16")


def test_dinov2_entries_describe_the_models_timm_builds():
    for spec in registered_backbones()[:6]:
        with torch.device("meta"):
            model = timm.create_model(spec.timm_name, pretrained=False, num_classes=0)
        assert model.patch_embed.patch_size == (spec.patch, spec.patch) == (14, 14)
        assert (model.embed_dim, len(model.blocks), model.num_prefix_tokens) == (
            spec.embed_dim, spec.depth, spec.prefix_tokens)
        assert (spec.normalisation.mean, spec.normalisation.std) == (model.pretrained_cfg["mean"],
                                                                     model.pretrained_cfg["std"])
        assert set(spec.converters) == {"timm", "torch_hub", "hf"}


def test_registering_is_idempotent_and_refuses_a_second_backbone_of_the_same_name(tiny16):
    assert register_backbone(TINY16) is TINY16
    with pytest.raises(ConfigError, match="already registered"):
        register_backbone(dataclasses.replace(TINY16, timm_name="vit_small_patch16_224", embed_dim=384))
    assert backbone_spec(TINY16.name) is TINY16


def test_an_entry_that_misdescribes_its_timm_model_is_refused():
    wrong = register_backbone(dataclasses.replace(TINY16, name="vit_tiny16_as_patch14", patch=14))
    try:
        with pytest.raises(ConfigError, match=r"ViT-Ti/16 .* ViT-Ti/14 .*correct the entry"):
            create_backbone(wrong.name, None, allow_random=True)
    finally:
        unregister_backbone(wrong.name)


# ---------------------------------------------------------------------------------------------------------------
# DINOv2's artifact keys, as computed before the registry existed. Each key also covers the producer version, the
# store format and the artifact's schema version, which invalidate keys on purpose when bumped; they are pinned to
# the values of the time (schema_version: the operators' and the features' were 1).


def key_without_version(spec) -> str:
    return hash_json({**spec.ingredients(), "producer_version": "0.1.0", "store_format": 2, "schema_version": 1})[:20]


@pytest.mark.parametrize(("name", "features", "key"), [
    ("dinov2_vits14", DEPTH_FEATURES, "ed08ade2ae30d82a5882"),
    ("dinov2_vitl14_reg", MULTI_BLOCK_FEATURES, "898a16841b31208a3ef1"),
])
def test_dinov2_features_keys_are_unchanged(name, features, key):
    with torch.device("meta"):  # the key needs the depth, not the weights
        model = timm.create_model(backbone_spec(name).timm_name, pretrained=False, num_classes=0)
    backbone = ProbeBackbone.of_model(model, name, "pinned", "pinned", identity="pinned weights")
    frames = FrameSet("test", ("frame-a", "frame-b"), lambda index: np.zeros((480, 640, 3), np.uint8), (480, 640),
                      {"source": "pinned"})
    spec = features_artifact_spec(backbone, frames, features)
    assert spec.params["preprocessing"] == "ImageNet mean/std, zero centre-padding to multiples of 14"
    assert key_without_version(spec) == key


@pytest.mark.parametrize(("train", "key"), [
    (TrainCfg(), "2cc2b8cd35041ab70114"),
    (TrainCfg(backbone="dinov2_vitb14_reg", reference_quirks=True, mask_aware_upsampling=False),
     "54945273d0ae52f4346d"),
])
def test_dinov2_operators_keys_are_unchanged(train, key):
    spec = operators_spec(train, "samples-key", "gaussians-key", "masks-key")
    assert spec.params["patch"] == 14 and key_without_version(spec) == key


# ---------------------------------------------------------------------------------------------------------------
# A patch-16 backbone


def test_token_grid_and_padding_follow_the_patch_size(tiny16):
    assert tiny16.token_grid(84, 112) == (5, 7)
    assert centre_padding(50, 61, tiny16.patch) == (7, 7, 1, 2)  # to 64 x 64


def test_patch16_backbone_loads_timm_checkpoints_and_refuses_other_formats(tiny16, tmp_path):
    with pytest.warns(UserWarning, match="random weights"):
        model = create_backbone(tiny16.name, None, allow_random=True)
    assert model.patch_embed.proj.kernel_size == (16, 16)
    path = tmp_path / "tiny16.safetensors"
    safetensors.torch.save_file(model.state_dict(), path)
    loaded = create_backbone(tiny16.name, path).state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in model.state_dict().items())
    torch_hub = tmp_path / "tiny16_hub.pth"
    torch.save({**model.state_dict(), "mask_token": torch.zeros(1, 192)}, torch_hub)
    with pytest.raises(DataError, match="torch_hub checkpoint, which backbone vit_tiny16 does not load.*: timm$"):
        create_backbone(tiny16.name, torch_hub)


def test_patch_tokens_crop_to_whole_patches_and_normalise_as_the_entry_says(tiny16):
    with pytest.warns(UserWarning, match="random weights"):
        model = create_backbone(tiny16.name, None, allow_random=True).eval()
    images = torch.rand(2, 3, 70, 100)
    with torch.no_grad():
        tokens = patch_tokens(model, tiny16, images)
        resized = F.interpolate(images, size=(64, 96), mode="bilinear", align_corners=False)
        expected = model.forward_features((resized - 0.5) / 0.5)[:, 1:].reshape(2, 4, 6, 192).permute(0, 3, 1, 2)
    assert tokens.shape == (2, 192, 4, 6)
    torch.testing.assert_close(tokens, expected)


def test_probe_features_pad_to_multiples_of_16(tiny16):
    with pytest.warns(UserWarning, match="random weights"):
        backbone = ProbeBackbone(tiny16.name, "random", "random ViT-Ti/16", allow_random=True)
    images = torch.rand(2, 3, 50, 61)
    features = backbone.features(images, SEGMENTATION_FEATURES)
    assert features.padding == (7, 7, 1, 2) and features.tokens.shape == (2, 192, 4, 4)
    with torch.no_grad():
        padded = F.pad((images - 0.5) / 0.5, (1, 2, 7, 7))
        expected = backbone.model.forward_features(padded)[:, 1:].reshape(2, 4, 4, 192).permute(0, 3, 1, 2)
    torch.testing.assert_close(features.tokens, expected, atol=1e-5, rtol=1e-5)
    assert features.crop(features.tokens).shape == (2, 192, 50, 61)

    depth = backbone.features(images, DEPTH_FEATURES).tokens  # the class token, broadcast, follows the patches
    assert depth.shape == (2, 384, 4, 4) and torch.equal(depth[:, 192:, 0, 0], depth[:, 192:, 3, 3])

    frames = FrameSet("test", ("a", "b"), lambda index: (images[index].permute(1, 2, 0) * 255).byte().numpy(),
                      (50, 61), {"source": "random"})
    assert features_artifact_spec(backbone, frames, SEGMENTATION_FEATURES).params["preprocessing"] == (
        "Inception mean/std, zero centre-padding to multiples of 16")
    sets, _ = probe_features(backbone, frames, [SEGMENTATION_FEATURES], None, "", memory_bytes=1e9)
    cached = sets[SEGMENTATION_FEATURES]
    assert cached.padding == (7, 7, 1, 2) and cached.batch([0, 1]).shape == (2, 192, 4, 4)


def test_patch16_operators_give_the_training_targets_of_rendering(tiny16, tmp_path):
    cfg = config(tmp_path, f"train.backbone={tiny16.name}")
    store = build_demo_artifacts(cfg)  # the operators too, on the patch-16 token grid
    samples_artifact, _ = load_samples(store, cfg.data, cfg.sampling)
    operators = load_operators(store, cfg.train, samples_artifact.key,
                               load_gaussians(store, cfg.gaussians, samples_artifact.key).key,
                               load_masks(store, cfg.masks, samples_artifact.key).key)
    assert operators.group().attrs["patch"] == 16
    unit = operators.unit(operators.units()[0])
    assert read_operator(unit).context_grid == tuple(read_operator(unit).coverage.shape) == (5, 7)  # 84 x 112 px

    batch = training_data(cfg, store, operators).batch(0, 2)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="random weights"):
        model = build_model(cfg.train)
    cpu = torch.device("cpu")
    fast, fast_coverage = teacher_targets(model, batch, cfg.train, cpu, contextlib.nullcontext)
    plain, plain_coverage = teacher_targets(model, training_data(cfg, store).batch(0, 2),
                                            config(tmp_path, f"train.backbone={tiny16.name}",
                                                   "train.teacher_splatting=render").train,
                                            cpu, contextlib.nullcontext)
    assert fast.shape == (2, 192, 5, 7)
    assert relative_error(fast, plain) < RELATIVE_TOLERANCE and torch.equal(fast_coverage, plain_coverage)


def test_the_normalisations_are_timms_statistics():
    from timm.data import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN,
                           IMAGENET_INCEPTION_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)

    from snd_stages.models.backbones import IMAGENET, INCEPTION, OPENAI_CLIP

    assert (IMAGENET.mean, IMAGENET.std) == (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    assert (INCEPTION.mean, INCEPTION.std) == (IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD)
    assert (OPENAI_CLIP.mean, OPENAI_CLIP.std) == (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
