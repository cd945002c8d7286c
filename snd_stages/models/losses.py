"""The distillation losses: the per-token soft cross-entropy over the prototypes (chunked, with a Triton kernel on
CUDA), and the cosine loss of ablation (C)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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
