"""The checkpoint formats DINOv2 and DINOv3 weights come in, told apart by their keys, and their conversion to
timm's names.

- ``timm`` (``patch_embed.proj.weight`` and no ``mask_token``): timm / HF-hub ``model.safetensors``, FiT3D's
  ``dinov2_{small,base}_finetuned.pth``.
- ``torch_hub`` (``mask_token`` or ``register_tokens``): facebookresearch/dinov2 ``dinov2_vits14_pretrain.pth``
  and friends, and the Splat-and-Distill releases ``dinov2_{small,base}_snd*.pth`` (saved from the hub model after
  merging LoRA).
  DINOv3's own releases (facebookresearch/dinov3 ``dinov3_vits16_pretrain_lvd1689m-*.pth`` and friends) are
  told apart from DINOv2's by ``storage_tokens``, their name for the registers.
- ``hf`` (``embeddings.patch_embeddings.projection.weight``): transformers ``Dinov2Model`` /
  ``Dinov2WithRegistersModel`` weights, with the attention names of transformers 4 or 5.

Which of them a backbone accepts is its registry entry's ``converters`` (:mod:`snd_stages.models.backbones`).
"""

from __future__ import annotations

import re
from typing import Mapping

import torch
from torch import Tensor

TIMM, TORCH_HUB, HF = "timm", "torch_hub", "hf"


def checkpoint_format(state_dict: Mapping[str, Tensor]) -> str:
    """The format of a state dict without a wrapper prefix, told from its keys: ``timm``, ``torch_hub`` or ``hf``."""
    if "embeddings.patch_embeddings.projection.weight" in state_dict:
        return HF
    if "mask_token" in state_dict or "register_tokens" in state_dict or "storage_tokens" in state_dict:
        return TORCH_HUB
    return TIMM


def keep_timm_names(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A timm-named state dict needs no renaming."""
    return dict(state_dict)


def convert_torch_hub_to_timm(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a torch-hub DINOv2 state dict (facebookresearch/dinov2 ``DinoVisionTransformer``) to timm.

    The block parameters already share timm's names. What differs:

    - ``mask_token`` [1, C] is iBOT's embedding for masked patches, used only in self-supervised training: dropped.
    - With registers, the hub adds ``pos_embed[:, 0]`` to the class token and inserts ``register_tokens`` after it
      without position embedding, while timm's register models (``no_embed_class``) keep a patch-only table and
      add none to class or register tokens. Folding the class position into ``cls_token`` makes the two identical
      (the same conversion as timm's own ``_convert_dinov2``).

    SwiGLU MLPs (``w12``/``w3``, ViT-g only) are not converted; they surface as unexpected keys.

    Args:
        state_dict: hub names; ``pos_embed`` [1, 1 + N, C], ``register_tokens`` [1, R, C] if present.

    Returns:
        timm names; with registers ``reg_token`` [1, R, C] and ``pos_embed`` [1, N, C].
    """
    converted = dict(state_dict)
    converted.pop("mask_token", None)
    if {"register_tokens", "cls_token", "pos_embed"} <= converted.keys():
        position_table = converted["pos_embed"]  # [1, 1 + N, C]
        converted["reg_token"] = converted.pop("register_tokens")
        converted["cls_token"] = converted["cls_token"] + position_table[:, :1]
        converted["pos_embed"] = position_table[:, 1:]
    return converted


# facebookresearch/dinov3 name -> timm Eva name (the renames of timm's own eva.checkpoint_filter_fn).
_DINOV3_RENAMES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"^storage_tokens$", "reg_token"),
        (r"^(blocks\.\d+)\.ls([12])\.gamma$", r"\1.gamma_\2"),
        # SwiGLU MLP (ViT-S+): gate, value and output projections.
        (r"^(blocks\.\d+)\.mlp\.w1\.(weight|bias)$", r"\1.mlp.fc1_g.\2"),
        (r"^(blocks\.\d+)\.mlp\.w2\.(weight|bias)$", r"\1.mlp.fc1_x.\2"),
        (r"^(blocks\.\d+)\.mlp\.w3\.(weight|bias)$", r"\1.mlp.fc2.\2"),
    )
)
# Tensors timm's DINOv3 has no place for and needs none of: iBOT's mask embedding (self-supervised training only),
# the rotary embedding's periods (timm computes them) and the constant mask that zeroes the key bias.
_DINOV3_UNUSED = re.compile(r"^mask_token$|\.periods$|\.bias_mask$")
_DINOV3_QKV_BIAS = re.compile(r"^blocks\.\d+\.attn\.qkv\.bias$")


def convert_dinov3_torch_hub_to_timm(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a facebookresearch/dinov3 ``DinoVisionTransformer`` state dict to timm's ``Eva`` names.

    ``storage_tokens`` [1, 4, C] become ``reg_token``, layer scales ``ls{1,2}.gamma`` become ``gamma_{1,2}``, the
    SwiGLU projections ``w1``/``w2``/``w3`` become ``fc1_g``/``fc1_x``/``fc2``; ``mask_token``, the rotary
    ``periods`` and the key-bias ``bias_mask`` are dropped. The fused ``attn.qkv.bias`` is dropped only where its
    query and value thirds are zero (its key third is masked to zero in DINOv3 anyway), as in the released
    distilled models that timm's ``vit_*_patch16_dinov3`` (no qkv bias) load; a non-zero one keeps its name, so a
    strict load reports it instead of losing it.
    """
    converted: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if _DINOV3_UNUSED.search(key):
            continue
        if _DINOV3_QKV_BIAS.match(key):
            query, _, value_bias = value.chunk(3, dim=-1)
            if not (query.any() or value_bias.any()):
                continue
        for pattern, replacement in _DINOV3_RENAMES:
            if pattern.match(key):
                key = pattern.sub(replacement, key)
                break
        converted[key] = value
    return converted


# transformers Dinov2 name -> torch-hub name, for every parameter but q/k/v (which are fused, below).
_HF_TO_TORCH_HUB_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"^embeddings\.cls_token$", "cls_token"),
        (r"^embeddings\.mask_token$", "mask_token"),
        (r"^embeddings\.register_tokens$", "register_tokens"),
        (r"^embeddings\.position_embeddings$", "pos_embed"),
        (r"^embeddings\.patch_embeddings\.projection\.(weight|bias)$", r"patch_embed.proj.\1"),
        (r"^encoder\.layer\.(\d+)\.norm([12])\.(weight|bias)$", r"blocks.\1.norm\2.\3"),
        # transformers 4 names the attention output "attention.output.dense", transformers 5 "attention.o_proj".
        (r"^encoder\.layer\.(\d+)\.attention\.(?:output\.dense|o_proj)\.(weight|bias)$", r"blocks.\1.attn.proj.\2"),
        (r"^encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
        (r"^encoder\.layer\.(\d+)\.mlp\.fc([12])\.(weight|bias)$", r"blocks.\1.mlp.fc\2.\3"),
        (r"^layernorm\.(weight|bias)$", r"norm.\1"),
    )
)
# transformers 4: "attention.attention.{query,key,value}", transformers 5: "attention.{q,k,v}_proj".
_HF_QKV = re.compile(
    r"^encoder\.layer\.(?P<layer>\d+)\.attention\.(?:attention\.(?P<long>query|key|value)|(?P<short>[qkv])_proj)"
    r"\.(?P<kind>weight|bias)$"
)
_HF_QKV_ROLES = {"query": "q", "key": "k", "value": "v"}


def convert_hf_to_torch_hub(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a transformers ``Dinov2Model`` (or ``Dinov2WithRegistersModel``) state dict to torch-hub names.

    Separate query/key/value projections are concatenated, in that order, into the hub's fused ``attn.qkv``
    ([3C, C] weight, [3C] bias). Keys that match no rule, and q/k/v groups with a member missing, keep their
    names so that a strict load reports them. Chain with :func:`convert_torch_hub_to_timm` for timm names.

    Args:
        state_dict: transformers names without a model prefix (``embeddings.*``, ``encoder.layer.*``,
            ``layernorm.*``); ``embeddings.position_embeddings`` [1, 1 + N, C].

    Returns:
        torch-hub names (``cls_token``, ``pos_embed``, ``blocks.{i}.attn.qkv.weight``, ...).
    """
    converted: dict[str, Tensor] = {}
    qkv_parts: dict[tuple[str, str], dict[str, tuple[str, Tensor]]] = {}
    for key, value in state_dict.items():
        match = _HF_QKV.match(key)
        if match:
            role = _HF_QKV_ROLES[match["long"]] if match["long"] else match["short"]
            qkv_parts.setdefault((match["layer"], match["kind"]), {})[role] = (key, value)
            continue
        for pattern, replacement in _HF_TO_TORCH_HUB_RULES:
            if pattern.match(key):
                converted[pattern.sub(replacement, key)] = value
                break
        else:
            converted[key] = value
    for (layer, kind), parts in qkv_parts.items():
        if parts.keys() == {"q", "k", "v"}:
            converted[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts[role][1] for role in "qkv"], dim=0)
        else:
            converted.update(dict(parts.values()))
    return converted


def convert_hf_to_timm(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a transformers Dinov2 state dict to timm, through the torch-hub names."""
    return convert_torch_hub_to_timm(convert_hf_to_torch_hub(state_dict))
