"""The Triton soft cross-entropy kernel against its plain twin ``_soft_cross_entropy_rows``.

On the CPU the kernel runs under Triton's interpreter, which must be switched on (``TRITON_INTERPRET=1``) before
the kernel is decorated, that is before its module is first imported: those checks run in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

from snd_stages.models.distill import _soft_cross_entropy_rows  # noqa: E402
from snd_stages.models.soft_cross_entropy_kernel import soft_cross_entropy_rows  # noqa: E402

# Measured under the interpreter (numpy's exp and log): float32 errors stay below 1e-6 (the entropy of the
# 7-column rows, whose largest value is small, at about 6e-6); bf16 gradients differ by at most one bf16 rounding
# (2**-8 relative) where the float32 values fall on either side of a rounding boundary.
FLOAT32_BOUND = 1e-5
HALF_STATISTICS_BOUND = 1e-5  # loss and entropy are float32 from the same 16-bit inputs
BFLOAT16_GRADIENT_BOUND = 2**-7
FLOAT16_GRADIENT_BOUND = 2**-10

_INTERPRETED_CASES = textwrap.dedent(
    """
    import json

    import torch

    from snd_stages.models.distill import _soft_cross_entropy_rows
    from snd_stages.models.soft_cross_entropy_kernel import _launch_config, soft_cross_entropy_rows


    def relative_error(actual, expected):
        return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


    generator = torch.Generator().manual_seed(0)


    def logits(rows, columns):
        return torch.randn(rows, columns, generator=generator) * 8


    # 5000 columns: two full 2048-column blocks and a masked tail. Row 1 has one dominant student and teacher
    # logit in the tail block; row 2 one in the first column; row 3 rises along the row, so every block raises
    # the maxima; row 4 shares a large offset.
    student, teacher = logits(5, 5000), logits(5, 5000)
    student[1, 4990] = teacher[1, 4990] = 200.0
    student[2, 0] = teacher[2, 0] = 150.0
    student[3] += torch.linspace(0, 300, 5000)
    teacher[3] += torch.linspace(0, 300, 5000)
    student[4] += 500.0
    teacher[4] += 500.0
    assert _launch_config(5000)[0] == 2048 and _launch_config(7)[0] > 7
    cases = {
        "float32": (student, teacher),
        "bfloat16": (student.bfloat16(), teacher.bfloat16()),
        "float32_7_columns": (logits(3, 7), logits(3, 7)),
        "float16_7_columns": (logits(3, 7).half(), logits(3, 7).half()),
    }
    measured = {}
    for name, (student_logits, teacher_logits) in cases.items():
        for with_entropy in (True, False):
            loss, entropy, gradient = soft_cross_entropy_rows(student_logits, teacher_logits, with_entropy)
            expected_loss, expected_entropy, expected_gradient = _soft_cross_entropy_rows(
                student_logits, teacher_logits, with_entropy
            )
            rows, columns = student_logits.shape
            assert loss.dtype == entropy.dtype == torch.float32, (loss.dtype, entropy.dtype)
            assert loss.shape == entropy.shape == (rows,), (loss.shape, entropy.shape)
            assert gradient.dtype == student_logits.dtype and gradient.shape == (rows, columns), gradient
            errors = dict(loss=relative_error(loss, expected_loss), gradient=relative_error(gradient, expected_gradient))
            if with_entropy:
                errors["entropy"] = relative_error(entropy, expected_entropy)
            else:
                assert torch.equal(entropy, torch.zeros(rows)), entropy
            measured[f"{name}{'_with_entropy' if with_entropy else ''}"] = errors
    print(json.dumps(measured))
    """
)


def test_kernel_matches_the_reference_under_the_interpreter():
    result = subprocess.run(
        [sys.executable, "-c", _INTERPRETED_CASES],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    print(measured)
    for case, errors in measured.items():
        half = case.startswith(("bfloat16", "float16"))
        statistics_bound = HALF_STATISTICS_BOUND if half else FLOAT32_BOUND
        gradient_bound = (
            BFLOAT16_GRADIENT_BOUND if case.startswith("bfloat16")
            else FLOAT16_GRADIENT_BOUND if case.startswith("float16")
            else FLOAT32_BOUND
        )
        assert errors["loss"] < statistics_bound, (case, errors)
        assert errors.get("entropy", 0.0) < statistics_bound, (case, errors)
        assert errors["gradient"] < gradient_bound, (case, errors)


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


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel runs on CUDA (or the interpreter)")
@pytest.mark.parametrize(
    "dtype, rows, columns",
    [(torch.bfloat16, 4096, 65536), (torch.float32, 257, 65536), (torch.float32, 100, 5000), (torch.float16, 33, 7)],
)
def test_kernel_matches_the_reference_on_cuda(dtype, rows, columns):
    generator = torch.Generator(device="cuda").manual_seed(0)
    student = (torch.randn(rows, columns, device="cuda", generator=generator) * 8).to(dtype)
    teacher = (torch.randn(rows, columns, device="cuda", generator=generator) * 8).to(dtype)
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
