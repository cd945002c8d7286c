"""The distillation model: a LoRA student and its EMA teacher with their DINO heads, and the EMA schedule.

The heads are in :mod:`~snd_stages.models.heads`, LoRA and the export in :mod:`~snd_stages.models.lora`, the
token grids in :mod:`~snd_stages.models.tokens` and the losses in :mod:`~snd_stages.models.losses`.

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

    from snd_stages.models.backbones import backbone_spec
    from snd_stages.models.distill import StudentTeacher, ema_schedule
    from snd_stages.models.lora import export_backbone
    from snd_stages.models.losses import distillation_loss
    from snd_stages.models.weights import create_backbone

    model = StudentTeacher(create_backbone("dinov2_vits14", "embedded"), backbone_spec("dinov2_vits14"))
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
import math

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from .backbones import BackboneSpec
from .heads import DINOHead
from .lora import LORA_PARAMETER, MergedView, add_lora
from .tokens import patch_tokens, token_rows


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
        spec: its registry entry: where LoRA goes, how images become tokens.
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
        spec: BackboneSpec,
        out_dim: int = 65536,
        lora_rank: int = 8,
        lora_alpha: float = 8.0,
        lora_dropout: float = 0.1,
        reference_quirks: bool = False,
        heads: bool = True,
    ):
        super().__init__()
        self.reference_quirks = reference_quirks
        self.backbone_spec = spec
        self.student = add_lora(backbone, spec.lora_targets, rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout,
                                reference_quirks=reference_quirks)
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
        lora = [parameter for name, parameter in self.student.named_parameters() if LORA_PARAMETER.search(name)]
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
            [B, C, H // p, W // p], p the patch size (see :func:`patch_tokens`).
        """
        return self.patch_tokens(self.student, self.backbone_spec, images)

    @torch.no_grad()
    def teacher_tokens(self, images: Tensor) -> Tensor:
        """Teacher patch tokens, without gradients.

        Args:
            images: [B, 3, H, W] RGB in [0, 1].

        Returns:
            [B, C, H // p, W // p], p the patch size (see :func:`patch_tokens`).
        """
        if self.teacher.training:  # reference quirks: its LoRA dropout is active, so the update cannot be merged
            return self.patch_tokens(self.teacher, self.backbone_spec, images)
        return self.patch_tokens(self._merged_teacher(), self.backbone_spec, images)

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
        teacher_lora = {name: p for name, p in self.teacher.named_parameters() if LORA_PARAMETER.search(name)}
        student_lora = {name: p for name, p in self.student.named_parameters() if LORA_PARAMETER.search(name)}
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
