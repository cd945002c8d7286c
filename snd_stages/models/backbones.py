"""The backbone registry: one :class:`BackboneSpec` per backbone snd can train and probe, looked up by our name.

A spec holds what the pipeline needs to know about a backbone besides its weights: the timm architecture it is
built as, its patch size (token grids, the probes' padding, the operators' key), the prefix tokens in front of the
patch tokens, the input normalisation, where LoRA goes, the architecture facts a checkpoint is diagnosed against,
and the checkpoint formats it loads. The entries below (DINOv2, DINOv3, SigLIP 2, CLIP, C-RADIOv3) are registered
on import; :func:`register_backbone` adds another one.

Example::

    from snd_stages.models.backbones import backbone_spec

    spec = backbone_spec("dinov2_vits14")
    spec.token_grid(574, 868)  # (41, 62)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from torch import Tensor

from ..errors import ConfigError
from .checkpoint_formats import (
    HF,
    TIMM,
    TORCH_HUB,
    convert_dinov3_torch_hub_to_timm,
    convert_hf_to_timm,
    convert_torch_hub_to_timm,
    keep_timm_names,
)

Converter = Callable[[Mapping[str, Tensor]], dict[str, Tensor]]


@dataclass(frozen=True)
class Normalisation:
    """The per-channel mean and std that RGB images in [0, 1] are normalised with before the backbone sees them.

    ``name`` stands for the values in the features artifact's key, so a name must never be given other values.
    """

    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# timm.data's IMAGENET_DEFAULT_*, IMAGENET_INCEPTION_* and OPENAI_CLIP_* statistics, written out so that reading the
# registry (every command does) does not import timm, a second and a half; tests/test_backbones.py checks they are
# timm's, and tests/test_backbone_families.py that each backbone's are its timm model's.
IMAGENET = Normalisation("ImageNet", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# SigLIP's [-1, 1] scaling, which timm calls the Inception mean/std.
INCEPTION = Normalisation("Inception", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
OPENAI_CLIP = Normalisation("OpenAI CLIP", (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


class Architecture(NamedTuple):
    """The shape-determining hyper-parameters of a ViT, as far as a state dict reveals them."""

    embed_dim: int
    depth: int
    num_registers: int
    patch: int

    def describe(self) -> str:
        sizes = {192: "ViT-Ti", 384: "ViT-S", 768: "ViT-B", 1024: "ViT-L", 1536: "ViT-g"}
        size = f"{sizes[self.embed_dim]}/{self.patch}" if self.embed_dim in sizes else "ViT"
        registers = f"{self.num_registers} registers" if self.num_registers else "no registers"
        return f"{size} (embed dim {self.embed_dim}, {self.depth} blocks, {registers})"


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone: what it is built as, how its input is prepared, how its tokens are read, which checkpoints fit.

    Attributes:
        name: our name, the one ``train.backbone`` gives (DINOv2's follow torch hub: ``dinov2_vits14``).
        timm_name: the timm architecture it is created as (``timm.create_model``).
        patch: side of its square patches in pixels: an H x W input gives (H // patch) x (W // patch) tokens.
        embed_dim: token channels.
        depth: number of blocks.
        registers: register tokens, which follow the class token (if any).
        normalisation: what input images are normalised with.
        lora_targets: module paths inside each block that get LoRA (:func:`snd_stages.models.lora.add_lora`).
        converters: checkpoint format (:mod:`snd_stages.models.checkpoint_formats`) -> its conversion to timm's
            names; a checkpoint in any other format is refused.
        family: what reports call the backbone's kind (``"DINOv2"``), in front of its name.
        class_tokens: class tokens in front of the registers: 1, or 0 for a model without one (SigLIP).
        timm_kwargs: further keyword arguments of ``timm.create_model`` (e.g. a smaller depth for a test model);
            the entry's ``embed_dim`` and ``depth`` must describe the model they give.
    """

    name: str
    timm_name: str
    patch: int
    embed_dim: int
    depth: int
    registers: int
    normalisation: Normalisation
    lora_targets: tuple[str, ...]
    converters: Mapping[str, Converter] = field(hash=False)
    family: str = "ViT"
    class_tokens: int = 1
    timm_kwargs: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @property
    def prefix_tokens(self) -> int:
        """Tokens in front of the patch tokens: the class token (if any), then the registers."""
        return self.class_tokens + self.registers

    @property
    def architecture(self) -> Architecture:
        """What a checkpoint of this backbone reveals about its shape, for diagnosing one that does not fit."""
        return Architecture(self.embed_dim, self.depth, self.registers, self.patch)

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """The token grid of an ``height`` x ``width`` input: sides are cropped down to whole patches first."""
        return height // self.patch, width // self.patch

    def normalise(self, images: Tensor) -> Tensor:
        """``[B, 3, H, W]`` RGB in [0, 1] -> the backbone's input, normalised channel by channel."""
        mean = images.new_tensor(self.normalisation.mean).view(1, 3, 1, 1)
        std = images.new_tensor(self.normalisation.std).view(1, 3, 1, 1)
        return (images - mean) / std


# Every DINOv2 checkpoint format (timm, torch hub, transformers) holds the same tensors under other names.
_DINOV2_CONVERTERS: Mapping[str, Converter] = {
    TIMM: keep_timm_names, TORCH_HUB: convert_torch_hub_to_timm, HF: convert_hf_to_timm
}


# SnD puts LoRA on the attention's fused qkv and output projections; every entry's timm model names them so
# (timm's Attention in VisionTransformer, EvaAttention in DINOv3's Eva).
_ATTENTION = ("attn.qkv", "attn.proj")
# SigLIP 2, CLIP and C-RADIOv3 load timm-named checkpoints (timm / HF-hub model.safetensors, our exports) only.
_TIMM_ONLY: Mapping[str, Converter] = {TIMM: keep_timm_names}


def _dinov2(name: str, timm_name: str, embed_dim: int, depth: int, registers: int) -> BackboneSpec:
    return BackboneSpec(name, timm_name, patch=14, embed_dim=embed_dim, depth=depth, registers=registers,
                        normalisation=IMAGENET, lora_targets=_ATTENTION, converters=_DINOV2_CONVERTERS,
                        family="DINOv2")


# DINOv3 comes as timm / HF-hub safetensors and as facebookresearch/dinov3's own .pth files.
_DINOV3_CONVERTERS: Mapping[str, Converter] = {TIMM: keep_timm_names, TORCH_HUB: convert_dinov3_torch_hub_to_timm}


def _dinov3(name: str, timm_name: str, embed_dim: int, depth: int) -> BackboneSpec:
    """DINOv3: patch 16, rotary position embeddings (no position table: any grid works), the class token and
    4 registers, ImageNet mean/std; timm builds it as an ``Eva``."""
    return BackboneSpec(name, timm_name, patch=16, embed_dim=embed_dim, depth=depth, registers=4,
                        normalisation=IMAGENET, lora_targets=_ATTENTION, converters=_DINOV3_CONVERTERS,
                        family="DINOv3")


def _radio(name: str, timm_name: str, embed_dim: int, depth: int) -> BackboneSpec:
    """C-RADIOv3: patch 16, the class token and 7 registers, OpenAI CLIP mean/std, no final norm."""
    return BackboneSpec(name, timm_name, patch=16, embed_dim=embed_dim, depth=depth, registers=7,
                        normalisation=OPENAI_CLIP, lora_targets=_ATTENTION, converters=_TIMM_ONLY,
                        family="C-RADIOv3")


# The built-in entries; register_backbone adds more.
_REGISTRY: dict[str, BackboneSpec] = {spec.name: spec for spec in (
    _dinov2("dinov2_vits14", "vit_small_patch14_dinov2", 384, 12, 0),
    _dinov2("dinov2_vitb14", "vit_base_patch14_dinov2", 768, 12, 0),
    _dinov2("dinov2_vitl14", "vit_large_patch14_dinov2", 1024, 24, 0),
    _dinov2("dinov2_vits14_reg", "vit_small_patch14_reg4_dinov2", 384, 12, 4),
    _dinov2("dinov2_vitb14_reg", "vit_base_patch14_reg4_dinov2", 768, 12, 4),
    _dinov2("dinov2_vitl14_reg", "vit_large_patch14_reg4_dinov2", 1024, 24, 4),
    _dinov3("dinov3_vits16", "vit_small_patch16_dinov3", 384, 12),
    _dinov3("dinov3_vits16plus", "vit_small_plus_patch16_dinov3", 384, 12),
    _dinov3("dinov3_vitb16", "vit_base_patch16_dinov3", 768, 12),
    _dinov3("dinov3_vitl16", "vit_large_patch16_dinov3", 1024, 24),
    # SigLIP 2 (the v2_webli weights; the same architecture as SigLIP's): no class token, a learned 16x16 table.
    BackboneSpec("siglip2_vitb16", "vit_base_patch16_siglip_256.v2_webli", patch=16, embed_dim=768, depth=12,
                 registers=0, normalisation=INCEPTION, lora_targets=_ATTENTION, converters=_TIMM_ONLY,
                 family="SigLIP 2", class_tokens=0),
    BackboneSpec("clip_vitb16", "vit_base_patch16_clip_224.openai", patch=16, embed_dim=768, depth=12, registers=0,
                 normalisation=OPENAI_CLIP, lora_targets=_ATTENTION, converters=_TIMM_ONLY, family="CLIP"),
    _radio("radio_v3_vitb16", "vit_base_patch16_radio_v3.c_radio", 768, 12),
    _radio("radio_v3_vitl16", "vit_large_patch16_radio_v3.c_radio", 1024, 24),
)}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add a backbone to the registry; registering the same spec again changes nothing.

    Raises:
        ConfigError: another backbone is registered under the same name.
    """
    registered = _REGISTRY.get(spec.name)
    if registered is not None and registered != spec:
        raise ConfigError(f"backbone {spec.name!r} is already registered (as {registered.timm_name}); "
                          "give the new one another name")
    _REGISTRY[spec.name] = spec
    return spec


def unregister_backbone(name: str) -> None:
    """Remove a backbone from the registry.

    Raises:
        ConfigError: no backbone has that name.
    """
    backbone_spec(name)
    del _REGISTRY[name]


def backbone_spec(name: str) -> BackboneSpec:
    """The registered backbone called ``name``.

    Raises:
        ConfigError: no backbone has that name; the message lists those that exist.
    """
    spec = _REGISTRY.get(name)
    if spec is None:
        raise ConfigError(f"unknown backbone {name!r}; choose one of {', '.join(_REGISTRY)}")
    return spec


def registered_backbones() -> tuple[BackboneSpec, ...]:
    """Every registered backbone, in the order of registration."""
    return tuple(_REGISTRY.values())
