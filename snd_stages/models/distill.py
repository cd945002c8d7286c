"""The distillation model: a LoRA student, its EMA teacher, DINO heads, the per-token loss and the EMA schedule.

The student is a DINOv2 ViT (timm) with LoRA adapters on the attention projections; the teacher is a copy of
it that follows the student by an exponential moving average of the LoRA matrices and of the DINO head. Both
backbones share the frozen pretrained weights (the teacher holds its own copy of them; they never change). The
loss compares, per token, the teacher head's softmax with the student head's log-softmax over 65,536 prototypes.

.. note::
    ``reference_quirks=True`` reproduces two behaviours of the authors' code that we otherwise correct:

    - LoRA also lands on the patch-embedding convolution ``patch_embed.proj``, because PEFT matched the target
      names ``["qkv", "proj"]`` as suffixes;
    - the teacher stays in train mode, so its LoRA dropout (0.1) is active although it runs under ``no_grad``.

Example::

    from snd_stages.models.distill import StudentTeacher, distillation_loss, ema_schedule, export_backbone
    from snd_stages.models.weights import create_backbone

    model = StudentTeacher(create_backbone("dinov2_vits14", "embedded"))
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=2e-5)
    for step in range(num_steps):
        teacher_map = splat_and_blend(model.teacher_tokens(context_images))  # [B, C, h, w]
        student_map = model.student_tokens(target_images)  # [B, C, h, w]
        loss = distillation_loss(model.student_logits(student_map), model.teacher_logits(teacher_map))
        optimizer.zero_grad()
        loss.backward()
        if (momentum := ema_schedule(step)) is not None:
            model.update_teacher(momentum)  # before optimizer.step(), as in the reference
        optimizer.step()
    export_backbone(model.teacher, "teacher.safetensors")
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import struct
import tempfile
from pathlib import Path

import peft  # about 2 s on top of torch + timm on two CPU cores (it imports transformers)
import safetensors.torch
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

# PEFT's parameter names for LoRA matrices: "<module>.lora_A.<adapter>.weight" and "<module>.lora_B.<adapter>.weight".
_LORA_PARAMETER = re.compile(r"\.lora_[AB]\.")


# ---------------------------------------------------------------------------------------------------------------
# DINO head


class DINOHead(nn.Module):
    """DINOv2's projection head: a 3-layer MLP to a bottleneck, L2 normalisation, then a weight-normed prototype layer.

    ``Linear(in_dim, hidden_dim) -> GELU -> Linear(hidden_dim, hidden_dim) -> GELU -> Linear(hidden_dim,
    bottleneck_dim) -> L2-normalise -> weight-normed Linear(bottleneck_dim, out_dim, no bias)``.

    Initialisation as in DINOv2 and the reference: the MLP's weights are trunc-normal with std 0.02 and its biases
    zero; the prototype layer keeps ``nn.Linear``'s default init for its direction ``v`` (only the direction
    matters under weight norm) and its magnitude ``g`` is set to 1.

    .. note::
        State-dict keys (``torch.nn.utils.parametrizations.weight_norm``)::

            mlp.0.weight [hidden_dim, in_dim]           mlp.0.bias [hidden_dim]
            mlp.2.weight [hidden_dim, hidden_dim]       mlp.2.bias [hidden_dim]
            mlp.4.weight [bottleneck_dim, hidden_dim]   mlp.4.bias [bottleneck_dim]
            last_layer.parametrizations.weight.original0 [out_dim, 1]               magnitude g
            last_layer.parametrizations.weight.original1 [out_dim, bottleneck_dim]  direction v

        DINOv2 and the reference use the older ``torch.nn.utils.weight_norm``, whose keys for the last two are
        ``last_layer.weight_g`` and ``last_layer.weight_v`` (same shapes, same meaning).

    Args:
        in_dim: token channels C of the backbone (384 for ViT-S/14, 768 for ViT-B/14).
        out_dim: number of prototypes K.
        hidden_dim: width of the two hidden layers.
        bottleneck_dim: width of the normalised bottleneck.
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        with torch.no_grad():
            self.last_layer.parametrizations.weight.original0.fill_(1.0)

    def forward(self, tokens: Tensor) -> Tensor:
        """Prototype logits of each token.

        Args:
            tokens: [..., in_dim].

        Returns:
            [..., out_dim] logits (unnormalised; temperature 1).
        """
        return self.last_layer(self.bottleneck(tokens))

    def bottleneck(self, tokens: Tensor) -> Tensor:
        """The L2-normalised bottleneck of each token, [..., bottleneck_dim]: what the prototype layer multiplies."""
        bottleneck = self.mlp(tokens)
        # DINOv2's eps: 1e-12 underflows in float16.
        eps = 1e-6 if bottleneck.dtype == torch.float16 else 1e-12
        return F.normalize(bottleneck, dim=-1, p=2, eps=eps)

    def prototypes(self) -> Tensor:
        """The prototype layer's weight [out_dim, bottleneck_dim] (``g * v / |v|``, with gradients to g and v)."""
        return self.last_layer.weight


# ---------------------------------------------------------------------------------------------------------------
# LoRA


def add_lora(
    backbone: VisionTransformer,
    rank: int = 8,
    alpha: float = 8.0,
    dropout: float = 0.1,
    targets: tuple[str, ...] = ("attn.qkv", "attn.proj"),
    reference_quirks: bool = False,
) -> peft.PeftModel:
    """Wrap a timm ViT with PEFT LoRA adapters on the attention projections of every block; freeze the rest.

    The backbone is modified in place (its target layers are replaced by LoRA layers) and becomes the returned
    model's base model. LoRA B starts at zero, so the wrapped model computes exactly what the backbone computed.
    The PeftModel forwards attribute access to the ViT: ``forward_features``, ``num_prefix_tokens`` and
    ``patch_embed`` work on it as on the backbone.

    Args:
        backbone: a timm VisionTransformer (see :func:`snd_stages.models.weights.create_backbone`).
        rank: LoRA rank r.
        alpha: LoRA alpha; the update is scaled by ``alpha / rank`` (1 for the reference's 8 / 8).
        dropout: dropout on the LoRA branch's input, active in train mode only.
        targets: module paths inside each block ``blocks.{i}``; LoRA goes on ``blocks.{i}.{target}`` for every i
            and nowhere else (not on ``patch_embed.proj``, not on the MLPs).
        reference_quirks: match the targets' last names as suffixes anywhere in the model, as the reference's
            ``target_modules=["qkv", "proj"]`` did; this also puts LoRA on the patch-embedding convolution
            ``patch_embed.proj`` (one more module).

    Returns:
        The PeftModel; its only trainable parameters are the LoRA matrices (``...lora_A.default.weight`` and
        ``...lora_B.default.weight``).

    Raises:
        ValueError: a target does not exist in every block.
    """
    depth = len(backbone.blocks)
    module_names = {name for name, _ in backbone.named_modules()}
    per_block = [f"blocks.{i}.{target}" for i in range(depth) for target in targets]
    missing = [name for name in per_block if name not in module_names]
    if missing:
        raise ValueError(
            f"LoRA targets {list(targets)} must name modules inside every ViT block, but {missing[:4]} do not "
            "exist; use paths such as 'attn.qkv', 'attn.proj', 'mlp.fc1'"
        )

    if reference_quirks:
        suffixes = sorted({target.rsplit(".", 1)[-1] for target in targets})
        target_modules: str | list[str] = suffixes  # PEFT matches a list by name suffix
        expected = {name for name in module_names if name.rsplit(".", 1)[-1] in suffixes}
    else:
        # A string is matched by PEFT against the whole module name (re.fullmatch).
        target_modules = r"blocks\.\d+\.(?:" + "|".join(re.escape(target) for target in targets) + ")"
        expected = set(per_block)

    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="none", target_modules=target_modules)
    model = peft.get_peft_model(backbone, config)

    adapted = set(lora_module_names(model))
    assert adapted == expected, f"LoRA landed on {sorted(adapted)}, expected {sorted(expected)}"
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    lora_parameters = {name for name, _ in model.named_parameters() if _LORA_PARAMETER.search(name)}
    assert trainable == lora_parameters and len(trainable) == 2 * len(expected), (
        f"trainable parameters {sorted(trainable - lora_parameters)} are not LoRA, or LoRA matrices "
        f"{sorted(lora_parameters - trainable)} are frozen"
    )
    return model


def lora_module_names(model: peft.PeftModel) -> list[str]:
    """Names (relative to the ViT, e.g. ``blocks.0.attn.qkv``) of the modules that carry LoRA adapters."""
    prefix = "base_model.model."
    return [
        name.removeprefix(prefix)
        for name, module in model.named_modules()
        if isinstance(module, peft.tuners.lora.LoraLayer)
    ]


def merged_backbone(model: peft.PeftModel) -> VisionTransformer:
    """A plain timm ViT with the LoRA updates merged into its weights; ``model`` itself is left untouched.

    Args:
        model: a LoRA-wrapped ViT from :func:`add_lora` (student or teacher).

    Returns:
        A deep copy with ``W + (alpha / r) B A`` folded into every adapted layer and timm's own parameter names
        (``blocks.0.attn.qkv.weight``, ...), in eval mode, all parameters frozen.
    """
    # safe_merge checks the merged weights for NaN/Inf before replacing the originals.
    merged = copy.deepcopy(model).merge_and_unload(safe_merge=True)
    assert isinstance(merged, VisionTransformer), f"merge_and_unload returned a {type(merged).__name__}"
    leftover = [name for name, _ in merged.named_parameters() if "lora_" in name or "base_layer" in name]
    assert not leftover, f"LoRA parameters survived the merge: {leftover[:4]}"
    return merged.eval().requires_grad_(False)


class MergedView:
    """A plain timm ViT computing what a LoRA-wrapped one computes in eval mode, from that model's current LoRA.

    Calling the view refreshes ``W + (alpha / r) B A`` in every adapted layer from the wrapped model's LoRA
    matrices and returns the plain ViT. Every other tensor is shared with the wrapped model, so the frozen weights
    exist once. Why: PEFT's unmerged layers run two skinny matrix products and a full-size addition each, per
    call; a model that needs no gradient and changes once per step (the EMA teacher) is cheaper merged once per
    step. At 574x868 the teacher forward on 16 images took 12.6 instead of 17.0 ms on an H100 (compiled).

    Args:
        model: a LoRA-wrapped ViT from :func:`add_lora`.
    """

    def __init__(self, model: peft.PeftModel):
        self.wrapped = model
        self._plain: VisionTransformer | None = None
        self._merged: list[tuple[Tensor, nn.Module, tuple | None]] = []

    def __call__(self) -> VisionTransformer:
        if self._plain is None or self._left_behind():
            self._build()
        with torch.no_grad():
            for merged, layer, product in self._merged:
                if product is not None:
                    base, b, a, scaling = product
                    torch.addmm(base, b, a, alpha=scaling, out=merged)
                else:
                    base = layer.get_base_layer().weight
                    merged.copy_(base + layer.get_delta_weight(layer.active_adapters[0]).to(base.dtype))
        return self._plain

    def _left_behind(self) -> bool:
        """Whether the wrapped model moved to another device or dtype since the view was built: the shared tensors
        moved with it, the view's own merged weights did not."""
        merged, layer, _ = self._merged[0]
        base = layer.get_base_layer().weight
        return merged.device != base.device or merged.dtype != base.dtype

    def _build(self) -> None:
        plain = merged_backbone(self.wrapped)
        layers = {name: module for name, module in self.wrapped.named_modules()
                  if isinstance(module, peft.tuners.lora.LoraLayer)}
        wrapped_parameters = dict(self.wrapped.named_parameters())
        self._merged = []
        for name, parameter in list(plain.named_parameters()):
            module_name, _, leaf = name.rpartition(".")
            layer = layers.get(f"base_model.model.{module_name}")
            if layer is not None and leaf == "weight":
                # The view's own tensor, refreshed on every call.
                self._merged.append((parameter, layer, _merge_product(layer)))
                continue
            adapted = "base_layer" if layer is not None else ""  # an adapted layer's bias sits in its base layer
            source = ".".join(part for part in ("base_model.model", module_name, adapted, leaf) if part)
            plain.get_submodule(module_name).register_parameter(leaf, wrapped_parameters[source])
        self._plain = plain


def _merge_product(layer: peft.tuners.lora.LoraLayer) -> tuple | None:
    """``addmm`` arguments giving ``W + scaling B A`` of a plain LoRA linear layer in one call, or None where PEFT's
    own ``get_delta_weight`` must do it (convolutions, DoRA, transposed weights, mixed dtypes). Why: the merged
    teacher is refreshed every step, and PEFT's path costs about ten host-side operations per layer."""
    adapter = layer.active_adapters[0]
    if not isinstance(layer, peft.tuners.lora.Linear) or layer.fan_in_fan_out or layer.use_dora[adapter]:
        return None
    base, a, b = layer.get_base_layer().weight, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    if not base.dtype == a.dtype == b.dtype:
        return None
    return base, b, a, layer.scaling[adapter]


def export_backbone(model: peft.PeftModel, path: str | Path) -> None:
    """Save the LoRA-merged backbone as a timm-named safetensors state dict.

    The file loads offline (no hub access, no environment variable needed) with::

        timm.create_model(timm_name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                          num_classes=0, dynamic_img_size=True)

    and with ``create_backbone(name, path)``. The file is written to a temporary name and renamed, so a reader
    never sees a partial file.

    Args:
        model: a LoRA-wrapped ViT from :func:`add_lora`.
        path: destination ``.safetensors`` file; its folder must exist.
    """
    path = Path(path)
    merged = merged_backbone(model)
    state_dict = {name: tensor.detach().cpu().contiguous() for name, tensor in merged.state_dict().items()}
    # timm's architecture name (e.g. vit_small_patch14_dinov2) tells a reader which create_model call fits.
    metadata = {"format": "pt", "architecture": str(getattr(merged, "pretrained_cfg", {}).get("architecture", ""))}
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(descriptor)
    try:
        with open(temporary, "wb") as handle:
            handle.write(_canonical_header(safetensors.torch.save(state_dict, metadata=metadata)))
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _canonical_header(blob: bytes) -> bytes:
    """A safetensors file with its JSON header's keys sorted, so that the same tensors give the same bytes.

    safetensors writes the metadata map in hash order, which changes from process to process; the run's manifest
    records the exports' checksums, and one run trained twice must give the same ones. The sorted header has the
    same content, hence the same length: the tensors' offsets stay valid.
    """
    length = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + length])
    canonical = json.dumps(header, sort_keys=True, separators=(",", ":")).encode().ljust(length)
    if len(canonical) != length:  # cannot happen for safetensors' own compact header; never write a broken file
        return blob
    return blob[:8] + canonical + blob[8 + length:]


# ---------------------------------------------------------------------------------------------------------------
# Features


def patch_tokens(backbone: nn.Module, images: Tensor) -> Tensor:
    """Patch tokens after the final LayerNorm, as a feature map, the way the reference extracts them.

    Images are bilinearly resized to ``(H - H mod p, W - W mod p)`` (p = patch size, 14; skipped when already
    multiples), ImageNet-normalised and passed through ``forward_features``; the class and register tokens are
    dropped.

    Args:
        backbone: a timm ViT, or a PeftModel wrapping one (:func:`add_lora`).
        images: [B, 3, H, W] RGB in [0, 1], H and W at least the patch size.

    Returns:
        [B, C, H // p, W // p] token features. A view of channels-last memory: ``.view`` on it needs
        ``.contiguous()`` first.

    Raises:
        ValueError: ``images`` is not [B, 3, H, W] with sides of at least one patch.
    """
    patch_height, patch_width = backbone.patch_embed.patch_size
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] < patch_height or images.shape[3] < patch_width:
        raise ValueError(
            f"images must be [B, 3, H, W] with H >= {patch_height} and W >= {patch_width}, got {tuple(images.shape)}"
        )
    height, width = images.shape[-2:]
    grid = (height // patch_height, width // patch_width)
    size = (grid[0] * patch_height, grid[1] * patch_width)
    if size != (height, width):
        images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    mean = images.new_tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    tokens = backbone.forward_features((images - mean) / std)  # [B, prefix + h*w, C], after the final norm
    return tokens[:, backbone.num_prefix_tokens :].unflatten(1, grid).permute(0, 3, 1, 2)


def token_rows(features: Tensor) -> Tensor:
    """[B, C, h, w] -> [B*h*w, C], rows in (b, y, x) order."""
    return features.movedim(1, -1).reshape(-1, features.shape[1])


# ---------------------------------------------------------------------------------------------------------------
# Student and teacher


class StudentTeacher(nn.Module):
    """A LoRA student with its DINO head, and an EMA teacher that starts as an exact copy of both.

    Attributes:
        student: the LoRA-wrapped backbone (:func:`add_lora`); only its LoRA matrices train.
        student_head: :class:`DINOHead`, trained; None without heads.
        teacher: a deep copy of ``student``, frozen; its LoRA matrices follow the student's by EMA.
        teacher_head: a copy of ``student_head``, frozen; follows it by EMA. None without heads.
        reference_quirks: LoRA also on ``patch_embed.proj``, and the teacher in train mode whenever this module is
            (its LoRA dropout active, as in the reference). Otherwise the teacher is always in eval mode.

    Args:
        backbone: the pretrained timm ViT; modified in place (it becomes the student's base model).
        out_dim: number of prototypes K of both heads.
        lora_rank: LoRA rank r.
        lora_alpha: LoRA alpha (scaling ``alpha / r``).
        lora_dropout: LoRA dropout of the student (and of the teacher under ``reference_quirks``).
        reference_quirks: see above and :func:`add_lora`.
        heads: build the DINO heads. Without them (the cosine-loss ablation compares the tokens themselves) the
            LoRA matrices are all that trains and all that the EMA follows.
    """

    def __init__(
        self,
        backbone: VisionTransformer,
        out_dim: int = 65536,
        lora_rank: int = 8,
        lora_alpha: float = 8.0,
        lora_dropout: float = 0.1,
        reference_quirks: bool = False,
        heads: bool = True,
    ):
        super().__init__()
        self.reference_quirks = reference_quirks
        self.student = add_lora(
            backbone, rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout, reference_quirks=reference_quirks
        )
        self.student_head = DINOHead(backbone.embed_dim, out_dim) if heads else None
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.teacher_head = copy.deepcopy(self.student_head).requires_grad_(False) if heads else None
        # How tokens are taken from either backbone: patch_tokens, or its compiled twin (compile_backbones).
        self.patch_tokens = patch_tokens
        # The teacher in eval mode runs as a plain ViT with its LoRA merged (not a submodule: no state of its own).
        self._merged_teacher = MergedView(self.teacher)
        self._ema_pairs: tuple[list[Tensor], list[Tensor]] | None = None
        self._cuda_graphs = False
        self.train()

    def _apply(self, fn, recurse: bool = True):
        # Moving or casting may replace parameter tensors: pair them again on the next EMA step.
        self._ema_pairs = None
        return super()._apply(fn, recurse)

    def compile_backbones(self, cuda_graphs: bool = False) -> None:
        """Run token extraction through ``torch.compile`` (Inductor): student and teacher, forward and backward.

        Inductor fuses the ViT's LayerNorms, residual additions, GELUs, LoRA dropout and autocast casts into a few
        kernels per block; at 574x868 the network-only step on an H100 went from 69 to 52 ms. The first step
        of each image size compiles (about a minute). Results equal the eager ones up to float rounding of the
        fused operations. The function is compiled, not the modules, so copies of the backbones (export) stay
        plain modules.

        Args:
            cuda_graphs: also replay the compiled kernels as CUDA graphs (``mode="reduce-overhead"``; CUDA only).
                Each step must then start with :meth:`begin_step`, and a step's tokens are valid until the next
                step begins (the graphs reuse their output memory).
        """
        self.patch_tokens = torch.compile(patch_tokens, dynamic=False, mode="reduce-overhead" if cuda_graphs else None)
        self._cuda_graphs = cuda_graphs

    def begin_step(self) -> None:
        """Mark the start of a training step: CUDA graphs (:meth:`compile_backbones`) may then reuse the memory of
        the previous step's outputs. Nothing to do otherwise."""
        if self._cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()

    def train(self, mode: bool = True) -> StudentTeacher:
        """Set the student's mode; the teacher follows only under ``reference_quirks`` and is otherwise in eval."""
        super().train(mode)
        teacher_mode = mode and self.reference_quirks
        self.teacher.train(teacher_mode)
        if self.teacher_head is not None:
            self.teacher_head.train(teacher_mode)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The student's LoRA matrices, then the student head's parameters: all that the optimiser should see."""
        lora = [parameter for name, parameter in self.student.named_parameters() if _LORA_PARAMETER.search(name)]
        parameters = lora + list(_named_parameters(self.student_head).values())
        requiring_grad = [parameter for parameter in self.parameters() if parameter.requires_grad]
        assert {id(p) for p in parameters} == {id(p) for p in requiring_grad}, (
            f"{len(requiring_grad)} parameters require grad but {len(parameters)} are LoRA or student head"
        )
        return parameters

    def student_tokens(self, images: Tensor) -> Tensor:
        """Student patch tokens, with gradients to the LoRA matrices.

        Args:
            images: [B, 3, H, W] RGB in [0, 1].

        Returns:
            [B, C, H // 14, W // 14] (see :func:`patch_tokens`).
        """
        return self.patch_tokens(self.student, images)

    @torch.no_grad()
    def teacher_tokens(self, images: Tensor) -> Tensor:
        """Teacher patch tokens, without gradients.

        Args:
            images: [B, 3, H, W] RGB in [0, 1].

        Returns:
            [B, C, H // 14, W // 14] (see :func:`patch_tokens`).
        """
        if self.teacher.training:  # reference quirks: its LoRA dropout is active, so the update cannot be merged
            return self.patch_tokens(self.teacher, images)
        return self.patch_tokens(self._merged_teacher(), images)

    def student_logits(self, features: Tensor) -> Tensor:
        """Student head on every token of a feature map.

        Args:
            features: [B, C, h, w] student tokens (masked tokens zeroed by the caller, still counted).

        Returns:
            [B*h*w, K] logits, rows in (b, y, x) order.
        """
        return self.student_head(token_rows(features))

    @torch.no_grad()
    def teacher_logits(self, features: Tensor) -> Tensor:
        """Teacher head on every token of a feature map, without gradients.

        Args:
            features: [B, C, h, w] target-view teacher features (splatted, blended, downsampled).

        Returns:
            [B*h*w, K] logits, rows in (b, y, x) order.
        """
        return self.teacher_head(token_rows(features))

    def ema_pairs(self) -> tuple[list[Tensor], list[Tensor]]:
        """The tensors that the EMA updates: (teacher, student) LoRA matrices and head parameters, paired by name.

        Paired once and kept: walking both models' parameters by name cost about as much host time as a whole
        small-image step's kernel launches.

        Returns:
            (teacher tensors, student tensors), equally long; entry i of both has the same parameter name and shape.
        """
        if self._ema_pairs is None:
            self._ema_pairs = self._pair_ema_tensors()
        return self._ema_pairs

    def _pair_ema_tensors(self) -> tuple[list[Tensor], list[Tensor]]:
        teacher_lora = {name: p for name, p in self.teacher.named_parameters() if _LORA_PARAMETER.search(name)}
        student_lora = {name: p for name, p in self.student.named_parameters() if _LORA_PARAMETER.search(name)}
        teacher_head = _named_parameters(self.teacher_head)
        student_head = _named_parameters(self.student_head)
        assert teacher_lora.keys() == student_lora.keys() and teacher_lora, (
            f"teacher and student LoRA differ: {sorted(teacher_lora.keys() ^ student_lora.keys())[:4]}"
        )
        assert teacher_head.keys() == student_head.keys(), (
            f"teacher and student heads differ: {sorted(teacher_head.keys() ^ student_head.keys())}"
        )
        names = [("lora", name) for name in student_lora] + [("head", name) for name in student_head]
        teacher = [teacher_lora[name] if part == "lora" else teacher_head[name] for part, name in names]
        student = [student_lora[name] if part == "lora" else student_head[name] for part, name in names]
        mismatched = [name for (_, name), t, s in zip(names, teacher, student) if t.shape != s.shape]
        assert not mismatched, f"teacher and student shapes differ at {mismatched[:4]}"
        return teacher, student

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA step ``teacher <- momentum * teacher + (1 - momentum) * student`` on LoRA matrices and head.

        One fused ``torch._foreach_lerp_`` over all pairs. Lerp computes ``t + (1 - m) (s - t)``, which equals the
        formula up to float rounding and leaves a tensor bit-identical where teacher and student already agree
        (e.g. right after construction). The frozen base weights are equal in both and are not touched.

        Args:
            momentum: m in [0, 1]; 1 keeps the teacher, 0 copies the student.

        Raises:
            ValueError: momentum outside [0, 1].
        """
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
        teacher, student = self.ema_pairs()
        torch._foreach_lerp_(teacher, student, 1.0 - momentum)

    @torch.no_grad()
    def _update_teacher(self, momentum: float) -> None:
        """Reference for :meth:`update_teacher`: the textbook formula, one tensor at a time, as the authors wrote it."""
        for teacher, student in zip(*self.ema_pairs()):
            teacher.copy_(teacher * momentum + student * (1.0 - momentum))


def _named_parameters(head: DINOHead | None) -> dict[str, nn.Parameter]:
    """A head's parameters by name; none for a model built without heads."""
    return {} if head is None else dict(head.named_parameters())


# ---------------------------------------------------------------------------------------------------------------
# Loss and schedule


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Per-token cross-entropy ``-sum_k softmax(teacher)_k * log_softmax(student)_k``, averaged over all tokens.

    Temperature 1 for both, no centering; the teacher side carries no gradient. Computed in float32 even when the
    logits come from bf16/fp16 autocast, since a log-softmax over 65,536 classes loses too much in half precision.

    Args:
        student_logits: [N, K].
        teacher_logits: [N, K]; detached here.

    Returns:
        Scalar loss (float32). log(K) when both sides are uniform.

    Raises:
        ValueError: the two shapes differ or are not [N, K].
    """
    if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
        raise ValueError(
            f"student and teacher logits must both be [N, K], got {tuple(student_logits.shape)} and "
            f"{tuple(teacher_logits.shape)}"
        )
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        teacher_probabilities = torch.softmax(teacher_logits.detach().float(), dim=-1)
        # cross_entropy with class probabilities as target is -sum_k p_k log_softmax(x)_k, then mean over rows.
        return F.cross_entropy(student_logits.float(), teacher_probabilities)


def cosine_distillation_loss(student: Tensor, teacher: Tensor, coverage: Tensor) -> Tensor:
    """``1 - cos(student token, teacher token)``, averaged over the covered tokens: the paper's ablation (C).

    Compares the backbones' final-normed patch tokens themselves, with no head. The coverage mask is the one the
    DINO loss uses, but an uncovered token counts for nothing here (the DINO loss still averages its "head(0) vs
    head(0)" term): the cosine with a zeroed teacher token is undefined. Computed in float32 even under autocast;
    the teacher side carries no gradient.

    Args:
        student: [B, C, h, w] student tokens.
        teacher: [B, C, h, w] teacher targets (splatted, blended, downsampled); detached here.
        coverage: [B, h, w] bool, the tokens some Gaussian reached.

    Returns:
        Scalar float32 loss in [0, 2]; 0 when no token is covered.

    Raises:
        ValueError: the feature maps differ in shape, or the coverage does not match their grid.
    """
    if student.ndim != 4 or student.shape != teacher.shape or coverage.shape != (student.shape[0], *student.shape[2:]):
        raise ValueError(
            f"student and teacher tokens must both be [B, C, h, w] and coverage [B, h, w], got "
            f"{tuple(student.shape)}, {tuple(teacher.shape)} and {tuple(coverage.shape)}"
        )
    with torch.autocast(device_type=student.device.type, enabled=False):
        cosine = F.cosine_similarity(student.float(), teacher.detach().float(), dim=1)  # [B, h, w]
        covered = coverage.float()
        return ((1.0 - cosine) * covered).sum() / covered.sum().clamp(min=1.0)


def prototype_cross_entropy(
    student_bottleneck: Tensor,
    student_prototypes: Tensor,
    teacher_bottleneck: Tensor,
    teacher_prototypes: Tensor,
    with_teacher_entropy: bool = False,
    chunk_rows: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """:func:`distillation_loss` of the two heads' prototype layers, without ever holding the [N, K] logits.

    Equal to ``distillation_loss(student_bottleneck @ student_prototypes.T, teacher_bottleneck @
    teacher_prototypes.T)`` up to float rounding, in value and in the gradients to the student's bottleneck and
    prototypes. At the authors' size (20,336 tokens x 65,536 prototypes) each logits matrix takes 2.7 GB in bf16
    and the plain loss makes some ten passes over float32 copies of it; here the tokens are taken ``chunk_rows``
    at a time: both chunks of logits are formed, the loss rows and their gradient ``softmax(student) -
    softmax(teacher)`` come out of one fused kernel (Triton, on CUDA), and the gradient is multiplied
    straight back into the bottleneck and prototype gradients, which are all that backward keeps.

    Under autocast the two matrix products run in the autocast dtype, as ``nn.Linear`` would, and everything
    after them in float32, as :func:`distillation_loss` does.

    Args:
        student_bottleneck: [N, D] normalised student bottleneck (:meth:`DINOHead.bottleneck`).
        student_prototypes: [K, D] student prototypes (:meth:`DINOHead.prototypes`).
        teacher_bottleneck: [N, D]; no gradient flows to it.
        teacher_prototypes: [K, D]; no gradient flows to it.
        with_teacher_entropy: also return the mean entropy of the teacher's softmax (the log's ``kl`` is the
            loss minus it), at the cost of one more reduction per chunk.
        chunk_rows: tokens per chunk; by default as many as make 2^28 logits (4,096 at K = 65,536).

    Returns:
        (scalar float32 loss, scalar float32 teacher entropy or None).

    Raises:
        ValueError: the bottlenecks are not both [N, D], or the prototypes not both [K, D].
    """
    if (
        student_bottleneck.ndim != 2
        or student_bottleneck.shape != teacher_bottleneck.shape
        or student_prototypes.ndim != 2
        or student_prototypes.shape != teacher_prototypes.shape
        or student_prototypes.shape[1] != student_bottleneck.shape[1]
    ):
        raise ValueError(
            f"bottlenecks must both be [N, D] and prototypes both [K, D], got student {tuple(student_bottleneck.shape)}"
            f" x {tuple(student_prototypes.shape)}, teacher {tuple(teacher_bottleneck.shape)} x "
            f"{tuple(teacher_prototypes.shape)}"
        )
    device_type = student_bottleneck.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else student_prototypes.dtype
    chunk_rows = chunk_rows or max(1, 2**28 // student_prototypes.shape[0])
    with torch.autocast(device_type=device_type, enabled=False):
        loss, entropy = _PrototypeCrossEntropy.apply(
            student_bottleneck.to(dtype), student_prototypes.to(dtype), teacher_bottleneck.detach().to(dtype),
            teacher_prototypes.detach().to(dtype), with_teacher_entropy, chunk_rows,
        )
    return loss, (entropy if with_teacher_entropy else None)


def _soft_cross_entropy_rows(student_logits: Tensor, teacher_logits: Tensor, with_teacher_entropy: bool):
    """Per row of a chunk: the loss, the teacher's entropy (or zeros) and ``softmax(student) - softmax(teacher)``.

    Float32 inside, whatever the logits' dtype; the gradient comes back in the logits' dtype, the dtype the
    backward matrix products of ``nn.Linear`` would receive it in.
    """
    student = student_logits.float()
    teacher = teacher_logits.float()
    student_log_probabilities = student - torch.logsumexp(student, dim=-1, keepdim=True)
    teacher_log_probabilities = teacher - torch.logsumexp(teacher, dim=-1, keepdim=True)
    teacher_probabilities = teacher_log_probabilities.exp()
    loss = -(teacher_probabilities * student_log_probabilities).sum(dim=-1)
    entropy = (
        -(teacher_probabilities * teacher_log_probabilities).sum(dim=-1) if with_teacher_entropy else torch.zeros_like(loss)
    )
    gradient = (student_log_probabilities.exp() - teacher_probabilities).to(student_logits.dtype)
    return loss, entropy, gradient


def _rows_function(device: torch.device):
    """The row function for ``device``: on CUDA the Triton kernel of :mod:`.soft_cross_entropy_kernel`, which
    reads each logit twice where Inductor's fusion of this function read it three times (per 4,096 x 65,536 bf16
    chunk on an H100: 0.95 ms for the kernel's per-lane form against Inductor's 1.41; on an H200 its per-block
    form takes 0.75-0.82 ms); on the CPU this function's plain twin."""
    if device.type != "cuda":
        return _soft_cross_entropy_rows
    from .soft_cross_entropy_kernel import soft_cross_entropy_rows  # Triton compiles on first use, CUDA only

    return soft_cross_entropy_rows


class _PrototypeCrossEntropy(torch.autograd.Function):
    """Chunked soft cross-entropy through the prototype layer; gradients formed in forward (see the caller)."""

    @staticmethod
    def forward(ctx, student_bottleneck, student_prototypes, teacher_bottleneck, teacher_prototypes,
                with_teacher_entropy, chunk_rows):
        rows_function = _rows_function(student_bottleneck.device)
        needs_bottleneck_grad, needs_prototype_grad = ctx.needs_input_grad[:2]
        tokens = student_bottleneck.shape[0]
        loss = torch.zeros((), dtype=torch.float32, device=student_bottleneck.device)
        entropy = torch.zeros_like(loss)
        bottleneck_grad = torch.empty_like(student_bottleneck) if needs_bottleneck_grad else None
        prototype_grad = torch.zeros_like(student_prototypes, dtype=torch.float32) if needs_prototype_grad else None
        for start in range(0, tokens, chunk_rows):
            rows = slice(start, min(start + chunk_rows, tokens))
            student_logits = student_bottleneck[rows] @ student_prototypes.T
            teacher_logits = teacher_bottleneck[rows] @ teacher_prototypes.T
            chunk_loss, chunk_entropy, logits_grad = rows_function(student_logits, teacher_logits, with_teacher_entropy)
            loss += chunk_loss.sum()
            entropy += chunk_entropy.sum()
            if needs_bottleneck_grad:
                bottleneck_grad[rows] = logits_grad @ student_prototypes
            if needs_prototype_grad:
                prototype_grad += logits_grad.T @ student_bottleneck[rows]
            del student_logits, teacher_logits, logits_grad
        ctx.tokens = tokens
        ctx.prototype_dtype = student_prototypes.dtype  # its gradient was accumulated in float32
        ctx.save_for_backward(bottleneck_grad, prototype_grad)  # None where not needed
        mean_entropy = entropy / tokens
        ctx.mark_non_differentiable(mean_entropy)
        return loss / tokens, mean_entropy

    @staticmethod
    def backward(ctx, loss_grad, entropy_grad):
        bottleneck_grad, prototype_grad = ctx.saved_tensors
        scale = loss_grad / ctx.tokens  # a 0-dim float32: the products keep the gradients' own dtypes
        return (
            None if bottleneck_grad is None else bottleneck_grad * scale,
            None if prototype_grad is None else (prototype_grad * scale).to(ctx.prototype_dtype),
            None, None, None, None,
        )


def ema_schedule(
    step: int,
    every: int = 10,
    momentum: float = 0.999,
    final_momentum: float | None = None,
    total_steps: int | None = None,
) -> float | None:
    """The teacher's EMA momentum at an optimiser step, or None when the teacher is not updated at that step.

    The reference updates every ``every``-th step (``step % every == 0``, first at step 0) with a constant 0.999.
    With ``final_momentum`` and ``total_steps`` the momentum instead follows DINO's cosine ramp from ``momentum``
    at step 0 to ``final_momentum`` at ``total_steps`` (declared in the reference's config, never used there).

    Args:
        step: 0-based index of the optimiser step about to be taken.
        every: update period in steps.
        momentum: constant momentum, or the start of the cosine ramp.
        final_momentum: end of the cosine ramp; None for a constant momentum.
        total_steps: length of the ramp; required with ``final_momentum``.

    Returns:
        The momentum to pass to :meth:`StudentTeacher.update_teacher`, or None.

    Raises:
        ValueError: ``final_momentum`` without a positive ``total_steps``, or ``every`` < 1.
    """
    if every < 1:
        raise ValueError(f"the EMA period must be at least one step, got {every}")
    if step % every != 0:
        return None
    if final_momentum is None:
        return momentum
    if total_steps is None or total_steps < 1:
        raise ValueError(f"a cosine EMA ramp to {final_momentum} needs total_steps >= 1, got {total_steps}")
    progress = min(step / total_steps, 1.0)
    return final_momentum - (final_momentum - momentum) * (1.0 + math.cos(math.pi * progress)) / 2.0
