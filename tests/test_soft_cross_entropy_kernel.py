"""The Triton soft cross-entropy kernel against its plain twin ``_soft_cross_entropy_rows``.

On the CPU the kernel runs under Triton's interpreter, which must be switched on (``TRITON_INTERPRET=1``) before
the kernel is decorated, that is before its module is first imported: a fresh Python process runs it on inputs
saved by the test and saves its outputs, and the comparisons are made here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

from snd_stages.models.losses import _soft_cross_entropy_rows  # noqa: E402
from snd_stages.models.soft_cross_entropy_kernel import soft_cross_entropy_rows  # noqa: E402

# Relative errors, max |difference| / max |expected|. Measured on an H200: loss and entropy within 2.0e-6 of the
# reference, float32 gradients within 3.7e-6 (2.6e-6 and 3.8e-6 for the per-lane kernel before, and under the
# interpreter, numpy's exp and log).
FLOAT32_BOUND = 1e-5
# The interpreter casts float32 to bfloat16 by truncation (the GPU rounds to nearest): one bf16 step, 2**-8 of
# the largest gradient, measured there; 1.5e-5 on the H200 at the training chunk.
BFLOAT16_GRADIENT_BOUND = 2**-7
FLOAT16_GRADIENT_BOUND = 2**-10
OFFSET_STATISTICS_BOUND = 5e-6  # against float64; the float32 reference is off by 3e-5 (loss), 1e-3 (entropy)
OFFSET_GRADIENT_BOUND = 1e-4  # s - lse at |s| ~ 500 carries float32's 3e-5 spacing, in both implementations

_RUN_KERNEL = textwrap.dedent(
    """
    import sys

    import torch

    from snd_stages.models.soft_cross_entropy_kernel import soft_cross_entropy_rows

    inputs, outputs = sys.argv[1:]
    results = {}
    for name, (student, teacher) in torch.load(inputs).items():
        for with_entropy in (True, False):
            results[f"{name}/{with_entropy}"] = soft_cross_entropy_rows(student, teacher, with_entropy)
    torch.save(results, outputs)
    """
)


def _interpreter_cases() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Small chunks (the interpreter runs a block at a time in numpy): 5000 columns are a full 4096-column
    block and a masked tail, 7 columns a block of 128 that is mostly mask."""
    generator = torch.Generator().manual_seed(0)

    def logits(rows, columns, spread=8.0):
        return torch.randn(rows, columns, generator=generator) * spread

    student, teacher = logits(4, 5000), logits(4, 5000)
    # Row 1: one dominant logit each, the student's in the tail block, the teacher's in the first column.
    student[1, 4990] = 200.0
    teacher[1, 0] = 150.0
    # Row 2: logits rising along the row, so that every block raises the running maxima.
    student[2] += torch.linspace(0, 40, 5000)
    teacher[2] += torch.linspace(0, 40, 5000)
    # Large offsets, where float32's spacing (3e-5 at 500) shows: the reference, which subtracts two large
    # numbers, is compared with float64 instead.
    offset_student, offset_teacher = logits(2, 5000), logits(2, 5000)
    offset_student[0] += 500.0
    offset_teacher[0] += 500.0
    offset_student[1] += torch.linspace(0, 300, 5000)
    offset_teacher[1] += torch.linspace(0, 300, 5000)
    return {
        "float32": (student, teacher),
        "bfloat16": (student.bfloat16(), teacher.bfloat16()),
        "float32_offset": (offset_student, offset_teacher),
        # A spread of 2 keeps the entropies of 7 columns near 1: at 8 they fall to 0.002, where the reference's
        # own float32 error (1.4e-5 of the largest, against float64) is above the bound.
        "float32_7_columns": (logits(3, 7, spread=2.0), logits(3, 7, spread=2.0)),
        "float16_7_columns": (logits(3, 7, spread=2.0).half(), logits(3, 7, spread=2.0).half()),
    }


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """The cases, and the kernel's outputs on them under Triton's interpreter, from a fresh Python."""
    cases = _interpreter_cases()
    folder = tmp_path_factory.mktemp("interpreted")
    torch.save(cases, folder / "inputs.pt")
    result = subprocess.run(
        [sys.executable, "-c", _RUN_KERNEL, str(folder / "inputs.pt"), str(folder / "outputs.pt")],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return cases, torch.load(folder / "outputs.pt")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


def _float64_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor):
    student_log_probabilities = torch.log_softmax(student_logits.double(), dim=-1)
    teacher_log_probabilities = torch.log_softmax(teacher_logits.double(), dim=-1)
    teacher_probabilities = teacher_log_probabilities.exp()
    loss = -(teacher_probabilities * student_log_probabilities).sum(dim=-1)
    entropy = -(teacher_probabilities * teacher_log_probabilities).sum(dim=-1)
    return loss, entropy, student_log_probabilities.exp() - teacher_probabilities


@pytest.mark.parametrize("with_entropy", [True, False])
@pytest.mark.parametrize("case", list(_interpreter_cases()))
def test_kernel_matches_the_reference_under_the_interpreter(interpreted, case, with_entropy):
    cases, outputs = interpreted
    student, teacher = cases[case]
    loss, entropy, gradient = outputs[f"{case}/{with_entropy}"]
    rows, columns = student.shape
    assert loss.dtype == entropy.dtype == torch.float32 and loss.shape == entropy.shape == (rows,)
    assert gradient.dtype == student.dtype and gradient.shape == (rows, columns)
    if not with_entropy:
        assert torch.equal(entropy, torch.zeros(rows))

    expected_loss, expected_entropy, expected_gradient = _soft_cross_entropy_rows(student, teacher, with_entropy)
    measured = dict(loss=relative_error(loss, expected_loss), gradient=relative_error(gradient, expected_gradient))
    if with_entropy:
        measured["entropy"] = relative_error(entropy, expected_entropy)
    if case == "float32_offset":
        exact_loss, exact_entropy, exact_gradient = _float64_rows(student, teacher)
        measured.update(
            loss_to_float64=relative_error(loss, exact_loss),
            reference_loss_to_float64=relative_error(expected_loss, exact_loss),
            gradient_to_float64=relative_error(gradient, exact_gradient),
            reference_gradient_to_float64=relative_error(expected_gradient, exact_gradient),
        )
        if with_entropy:
            measured.update(
                entropy_to_float64=relative_error(entropy, exact_entropy),
                reference_entropy_to_float64=relative_error(expected_entropy, exact_entropy),
            )
    print(case, with_entropy, measured)

    if case == "float32_offset":
        assert measured["loss_to_float64"] < OFFSET_STATISTICS_BOUND, measured
        assert measured.get("entropy_to_float64", 0.0) < OFFSET_STATISTICS_BOUND, measured
        assert measured["gradient"] < OFFSET_GRADIENT_BOUND, measured
        assert measured["gradient_to_float64"] < OFFSET_GRADIENT_BOUND, measured
        return
    gradient_bound = {torch.bfloat16: BFLOAT16_GRADIENT_BOUND, torch.float16: FLOAT16_GRADIENT_BOUND}.get(
        student.dtype, FLOAT32_BOUND
    )
    assert measured["loss"] < FLOAT32_BOUND, measured
    assert measured.get("entropy", 0.0) < FLOAT32_BOUND, measured
    assert measured["gradient"] < gradient_bound, measured


def test_kernel_rejects_mismatched_logits_before_launching():
    student = torch.zeros(4, 16)
    with pytest.raises(ValueError, match=r"student \(4, 16\) and teacher \(4, 15\)"):
        soft_cross_entropy_rows(student, torch.zeros(4, 15), True)
    with pytest.raises(ValueError, match=r"student \(64,\) and teacher \(64,\)"):
        soft_cross_entropy_rows(student.flatten(), torch.zeros(64), True)
    with pytest.raises(ValueError, match="share a dtype"):
        soft_cross_entropy_rows(student, torch.zeros(4, 16, dtype=torch.bfloat16), True)
    with pytest.raises(ValueError, match="float16, bfloat16, float32 or float64"):
        soft_cross_entropy_rows(student.long(), student.long(), True)


def test_kernel_returns_zero_statistics_for_empty_chunks_without_launching():
    loss, entropy, gradient = soft_cross_entropy_rows(torch.zeros(0, 16), torch.zeros(0, 16), True)
    assert loss.shape == entropy.shape == (0,) and gradient.shape == (0, 16)
    loss, entropy, gradient = soft_cross_entropy_rows(torch.zeros(3, 0), torch.zeros(3, 0), True)
    expected_loss, expected_entropy, _ = _soft_cross_entropy_rows(torch.zeros(3, 0), torch.zeros(3, 0), True)
    assert torch.equal(loss, expected_loss) and torch.equal(entropy, expected_entropy)
    assert gradient.shape == (3, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel runs on CUDA (or the interpreter)")
@pytest.mark.parametrize(
    "dtype, rows, columns, spread",
    [
        (torch.bfloat16, 4096, 65536, 8.0),  # the training chunk
        (torch.float32, 257, 65536, 8.0),
        (torch.float32, 100, 5000, 8.0),  # a masked tail block
        (torch.float16, 33, 7, 2.0),  # one mostly masked block
    ],
)
def test_kernel_matches_the_reference_on_cuda(dtype, rows, columns, spread):
    generator = torch.Generator(device="cuda").manual_seed(0)
    student = (torch.randn(rows, columns, device="cuda", generator=generator) * spread).to(dtype)
    teacher = (torch.randn(rows, columns, device="cuda", generator=generator) * spread).to(dtype)
    loss, entropy, gradient = soft_cross_entropy_rows(student, teacher, True)
    expected_loss, expected_entropy, expected_gradient = _soft_cross_entropy_rows(student, teacher, True)
    measured = dict(
        loss=relative_error(loss, expected_loss),
        entropy=relative_error(entropy, expected_entropy),
        gradient=relative_error(gradient, expected_gradient),
    )
    print(dtype, rows, columns, measured)
    gradient_bound = {torch.bfloat16: BFLOAT16_GRADIENT_BOUND, torch.float16: FLOAT16_GRADIENT_BOUND}.get(
        dtype, FLOAT32_BOUND
    )
    assert measured["loss"] < FLOAT32_BOUND and measured["entropy"] < FLOAT32_BOUND, measured
    assert measured["gradient"] < gradient_bound, measured
    assert gradient.dtype == dtype and loss.dtype == entropy.dtype == torch.float32
    _, no_entropy, _ = soft_cross_entropy_rows(student, teacher, False)
    assert torch.equal(no_entropy, torch.zeros_like(no_entropy))
