"""The registered families besides DINOv2 (DINOv3, SigLIP 2, CLIP, C-RADIOv3): their entries against the models
timm builds, and each family, shrunk to two blocks of 64 channels with random weights, through probe features,
checkpoint loading, distillation steps on the patch-16 operators and every probe."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F

from snd_stages.artifacts.operators import load_operators, read_operator
from snd_stages.artifacts.gaussians import load_gaussians
from snd_stages.artifacts.masks import load_masks
from snd_stages.artifacts.samples import load_samples
from snd_stages.errors import DataError
from snd_stages.models.backbones import (
    BackboneSpec,
    backbone_spec,
    register_backbone,
    registered_backbones,
    unregister_backbone,
)
from snd_stages.models.lora import add_lora, export_backbone
from snd_stages.models.tokens import patch_tokens
from snd_stages.models.weights import create_backbone
from snd_stages.pipeline import load_config
from snd_stages.probes.backbone import DEPTH_FEATURES, MULTI_BLOCK_FEATURES, SEGMENTATION_FEATURES, ProbeBackbone
from snd_stages.stages.evaluate import evaluate
from snd_stages.stages.precompute_operators import precompute_operators
from snd_stages.stages.train import train
from snd_stages.store import Store
from tests.conftest import build_demo_artifacts

FAMILIES = ("dinov3_vits16", "dinov3_vits16plus", "siglip2_vitb16", "clip_vitb16", "radio_v3_vitb16")
NEW_ENTRIES = FAMILIES + ("dinov3_vitb16", "dinov3_vitl16", "radio_v3_vitl16")
WIDTH, DEPTH = 64, 2


def tiny(name: str) -> BackboneSpec:
    """The registry entry ``name`` at two blocks of 64 channels: every other fact (patch, prefix tokens,
    normalisation, LoRA targets, formats, timm's block and attention classes) is the real entry's."""
    spec = backbone_spec(name)
    return dataclasses.replace(spec, name=f"tiny_{name}", embed_dim=WIDTH, depth=DEPTH,
                               timm_kwargs={"embed_dim": WIDTH, "depth": DEPTH, "num_heads": 2})


@pytest.fixture(scope="module")
def tiny_families():
    specs = {name: register_backbone(tiny(name)) for name in FAMILIES}
    yield specs
    for spec in specs.values():
        unregister_backbone(spec.name)


def random_backbone(name: str) -> torch.nn.Module:
    with pytest.warns(UserWarning, match="random weights"):
        return create_backbone(name, None, allow_random=True)


# ---------------------------------------------------------------------------------------------------------------
# The entries


@pytest.mark.parametrize("name", NEW_ENTRIES)
def test_entry_describes_the_model_timm_builds(name):
    spec = backbone_spec(name)
    with torch.device("meta"):
        model = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, dynamic_img_size=True)
    assert model.patch_embed.patch_size == (spec.patch, spec.patch) == (16, 16)
    assert (model.embed_dim, len(model.blocks), model.num_prefix_tokens) == (spec.embed_dim, spec.depth,
                                                                             spec.prefix_tokens)
    assert (spec.normalisation.mean, spec.normalisation.std) == (tuple(model.pretrained_cfg["mean"]),
                                                                 tuple(model.pretrained_cfg["std"]))
    for target in spec.lora_targets:  # SnD's LoRA goes on the attention's qkv and output projections
        assert isinstance(model.blocks[0].get_submodule(target), torch.nn.Linear)
    assert set(spec.converters) == ({"timm", "torch_hub"} if spec.family == "DINOv3" else {"timm"})


def test_entries_count_their_prefix_tokens_as_timm_does():
    prefix = {spec.name: (spec.class_tokens, spec.registers) for spec in registered_backbones()}
    assert prefix["dinov3_vitb16"] == (1, 4) and prefix["siglip2_vitb16"] == (0, 0)
    assert prefix["clip_vitb16"] == (1, 0) and prefix["radio_v3_vitb16"] == (1, 7)
    assert [backbone_spec(name).family for name in ("dinov2_vits14", "dinov3_vits16", "siglip2_vitb16")] == [
        "DINOv2", "DINOv3", "SigLIP 2"]


@pytest.mark.filterwarnings("ignore:random weights")
def test_models_are_built_at_the_grid_their_checkpoints_store():
    # create_backbone's default img_size is timm's for the architecture: each learned table loads unchanged.
    with torch.device("meta"):
        grids = {name: create_backbone(name, None, allow_random=True).patch_embed.grid_size
                 for name in ("dinov2_vits14", "siglip2_vitb16", "clip_vitb16", "radio_v3_vitb16")}
    assert grids == {"dinov2_vits14": (37, 37), "siglip2_vitb16": (16, 16), "clip_vitb16": (14, 14),
                     "radio_v3_vitb16": (32, 32)}


@pytest.mark.filterwarnings("ignore:random weights")
@pytest.mark.parametrize("name", ["dinov3_vits16", "dinov3_vits16plus", "siglip2_vitb16", "clip_vitb16",
                                  "radio_v3_vitb16"])
def test_real_entries_give_probe_features_at_their_full_size(name):
    spec = backbone_spec(name)
    backbone = ProbeBackbone(name, "random", f"random {name}", allow_random=True)
    depth, segmentation = backbone.features_many(torch.rand(1, 3, 50, 93), [DEPTH_FEATURES, SEGMENTATION_FEATURES])
    assert segmentation.tokens.shape == (1, spec.embed_dim, 4, 6) and torch.isfinite(segmentation.tokens).all()
    assert depth.tokens.shape == (1, 2 * spec.embed_dim, 4, 6)


@pytest.mark.filterwarnings("ignore:random weights")
@pytest.mark.parametrize("name", ["dinov3_vits16", "siglip2_vitb16"])
def test_real_entries_load_their_timm_safetensors(name, tmp_path):
    model = create_backbone(name, None, allow_random=True)
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(model.state_dict(), path)
    loaded = create_backbone(name, path).state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in model.state_dict().items())


# ---------------------------------------------------------------------------------------------------------------
# Each family, tiny


@pytest.mark.parametrize("name", FAMILIES)
def test_probe_features_drop_the_prefix_tokens_and_normalise_as_the_entry_says(tiny_families, name):
    spec = tiny_families[name]
    with pytest.warns(UserWarning, match="random weights"):
        backbone = ProbeBackbone(spec.name, "random", f"random {name}", allow_random=True)
    images = torch.rand(2, 3, 50, 61)  # padded to 64 x 64: a 4 x 4 grid
    segmentation, depth, multi = backbone.features_many(images, [SEGMENTATION_FEATURES, DEPTH_FEATURES,
                                                                 MULTI_BLOCK_FEATURES])
    mean = torch.tensor(spec.normalisation.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.normalisation.std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = backbone.model.forward_features(F.pad((images - mean) / std, (1, 2, 7, 7)))
    patches = expected[:, spec.prefix_tokens:].reshape(2, 4, 4, WIDTH).permute(0, 3, 1, 2)
    assert segmentation.padding == (7, 7, 1, 2)
    torch.testing.assert_close(segmentation.tokens, patches, atol=1e-5, rtol=1e-5)
    assert multi.tokens.shape == (2, 4 * WIDTH, 4, 4)

    # Depth: the patch tokens, then a global token broadcast over the grid, the same width for every family.
    assert depth.tokens.shape == (2, 2 * WIDTH, 4, 4)
    global_token = depth.tokens[:, WIDTH:, 0, 0]
    assert torch.equal(global_token, depth.tokens[:, WIDTH:, 3, 3])
    if spec.class_tokens == 0:  # SigLIP 2: the mean of the (unnormed) patch tokens stands in for a class token
        torch.testing.assert_close(global_token, depth.tokens[:, :WIDTH].mean(dim=(2, 3)))
    else:
        assert not torch.allclose(global_token, depth.tokens[:, :WIDTH].mean(dim=(2, 3)))


@pytest.mark.parametrize("name", FAMILIES)
def test_patch_tokens_at_non_square_sizes(tiny_families, name):
    spec = tiny_families[name]
    model = random_backbone(spec.name).eval()
    with torch.no_grad():
        for height, width in ((64, 96), (112, 48), (70, 100)):  # the last is cropped to 64 x 96
            tokens = patch_tokens(model, spec, torch.rand(1, 3, height, width))
            assert tokens.shape == (1, WIDTH, *spec.token_grid(height, width)) and torch.isfinite(tokens).all()


@pytest.mark.parametrize("name", FAMILIES)
def test_timm_checkpoints_and_exports_load_back_exactly(tiny_families, name, tmp_path):
    spec = tiny_families[name]
    model = random_backbone(spec.name)
    for path in (tmp_path / "model.safetensors", tmp_path / "model.pth"):
        if path.suffix == ".safetensors":
            safetensors.torch.save_file(model.state_dict(), path)
        else:
            torch.save({"state_dict": {f"module.{key}": value for key, value in model.state_dict().items()}}, path)
        loaded = create_backbone(spec.name, path).state_dict()
        assert loaded.keys() == model.state_dict().keys()
        assert all(torch.equal(loaded[key], value) for key, value in model.state_dict().items())

    exported = tmp_path / "export.safetensors"
    export_backbone(add_lora(random_backbone(spec.name), spec.lora_targets, rank=2, alpha=2.0), exported)
    assert create_backbone(spec.name, exported).state_dict().keys() == model.state_dict().keys()

    if spec.family != "DINOv3":
        torch_hub = tmp_path / "hub.pth"
        torch.save({**model.state_dict(), "mask_token": torch.zeros(1, WIDTH)}, torch_hub)
        with pytest.raises(DataError, match=f"torch_hub checkpoint, which backbone {spec.name} does not load.*: timm$"):
            create_backbone(spec.name, torch_hub)


def dinov3_release_names(state_dict: dict[str, torch.Tensor], qkv_bias: float = 0.0) -> dict[str, torch.Tensor]:
    """A timm DINOv3 state dict under facebookresearch/dinov3's names, with the tensors its releases add."""
    renames = [(r"^reg_token$", "storage_tokens"), (r"\.gamma_([12])$", r".ls\1.gamma"),
               (r"\.mlp\.fc1_g\.", ".mlp.w1."), (r"\.mlp\.fc1_x\.", ".mlp.w2."), (r"\.mlp\.fc2\.", ".mlp.w3.")]
    swiglu = any(".fc1_g." in key for key in state_dict)
    released = {}
    for key, value in state_dict.items():
        for pattern, replacement in renames:
            if pattern.startswith(r"\.mlp\.fc2") and not swiglu:
                continue
            key = re.sub(pattern, replacement, key)
        released[key] = value
    width = state_dict["cls_token"].shape[-1]
    released["mask_token"] = torch.zeros(1, width)
    released["rope_embed.periods"] = torch.ones(width // 8)
    for block in {int(key.split(".")[1]) for key in state_dict if key.startswith("blocks.")}:
        released[f"blocks.{block}.attn.qkv.bias"] = torch.full((3 * width,), qkv_bias)
        released[f"blocks.{block}.attn.qkv.bias_mask"] = torch.ones(3 * width)
    return released


@pytest.mark.parametrize("name", ["dinov3_vits16", "dinov3_vits16plus"])
def test_dinov3_release_checkpoints_load_exactly(tiny_families, name, tmp_path):
    spec = tiny_families[name]
    model = random_backbone(spec.name)
    path = tmp_path / "dinov3_pretrain.pth"
    torch.save(dinov3_release_names(model.state_dict()), path)
    loaded = create_backbone(spec.name, path).state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in model.state_dict().items())

    # A query/value bias that is not zero has no place in the qkv-bias-free timm model: refused, never dropped.
    torch.save(dinov3_release_names(model.state_dict(), qkv_bias=0.1), path)
    with pytest.raises(DataError, match=r"unexpected keys: blocks\.0\.attn\.qkv\.bias"):
        create_backbone(spec.name, path)


# ---------------------------------------------------------------------------------------------------------------
# Training and probes on tiny demo scenes

TINY = [
    "demo.train_scenes=1", "demo.eval_scenes=2", "demo.frames_per_scene=6", "demo.height=56", "demo.width=70",
    "sampling.samples_per_scene=1", "sampling.frame_gap=[3,4]",
    "train.weights=random", "train.allow_random_weights=true", "train.prototypes=64", "train.batch_size=1",
    "train.log_every=1", "eval.baseline_weights=random", "eval.probe_train_scenes=1", "eval.probe_steps=3",
    "eval.correspondence_pairs=2", "eval.correspondence_gap=[2,3]", "eval.correspondence_top_k=50",
]


@pytest.fixture(scope="module")
def demo_root(module_tmp_path):
    root = module_tmp_path / "families"
    build_demo_artifacts(config(root), operators=False)
    return root


def config(root, *extra):
    return load_config(None, [*TINY, f"data.root={root / 'demo'}", f"store.root={root / 'store'}",
                              f"train.runs_root={root / 'runs'}", *extra])


@pytest.mark.filterwarnings("ignore:random weights")
@pytest.mark.parametrize("name", ["dinov2_vits14", *FAMILIES])
def test_distillation_steps_on_the_operators_of_the_backbones_grid(tiny_families, demo_root, name):
    backbone = tiny_families[name].name if name in tiny_families else name
    cfg = config(demo_root, f"train.backbone={backbone}", "train.steps=2")
    store = Store(cfg.store.root)
    precompute_operators(cfg.data, cfg.sampling, cfg.gaussians, cfg.masks, cfg.train, store)
    samples_artifact, _ = load_samples(store, cfg.data, cfg.sampling)
    operators = load_operators(store, cfg.train, samples_artifact.key,
                               load_gaussians(store, cfg.gaussians, samples_artifact.key).key,
                               load_masks(store, cfg.masks, samples_artifact.key).key)
    spec = backbone_spec(backbone)
    unit = operators.unit(operators.units()[0])
    assert operators.group().attrs["patch"] == spec.patch
    # 56 x 70 px frames: the operators' grid is the one the backbone's tokens come on, at patch 14 and 16.
    model = random_backbone(backbone).eval()
    with torch.no_grad():
        grid = tuple(patch_tokens(model, spec, torch.rand(1, 3, 56, 70)).shape[-2:])
    assert read_operator(unit).context_grid == grid == {14: (4, 5), 16: (3, 4)}[spec.patch]

    result = train(cfg.data, cfg.sampling, cfg.gaussians, cfg.masks, cfg.train, store)
    lines = (result.run_dir / "metrics.csv").read_text().splitlines()
    losses = [float(line.split(",")[lines[0].split(",").index("loss")]) for line in lines[1:]]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    exported = create_backbone(backbone, result.student_path).state_dict()
    assert exported.keys() == model.state_dict().keys()


@pytest.mark.filterwarnings("ignore:random weights")
@pytest.mark.parametrize("name", FAMILIES)
def test_every_probe_runs_on_a_family(tiny_families, demo_root, name, tmp_path):
    cfg = config(demo_root, f"train.backbone={tiny_families[name].name}",
                 "eval.probes=[depth,normals,segmentation,correspondence,depth_dense]", f"eval.report_dir={tmp_path}")
    report = evaluate(cfg.data, cfg.train, cfg.eval, [])
    ((label, scores),) = report.results["models"].items()
    assert label.startswith(f"{backbone_spec(name).family} tiny_{name}")
    assert math.isfinite(scores["depth"]["rmse"]) and math.isfinite(scores["depth_dense"]["abs_rel"])
    assert 0 <= scores["normals"]["within_30"] <= 100 and 0 <= scores["segmentation"]["miou"] <= 1
    assert 0 <= scores["correspondence"]["recall_10px"] <= 1
    global_token = "CLS" if backbone_spec(name).class_tokens else "mean patch token"
    assert report.results["protocol"]["features"]["depth"] == f"blocks [-1], no final norm, {global_token} concatenated"
