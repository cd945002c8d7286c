"""The depthsplat reconstructor: parity with the official DepthSplat encoder (all 58 criteria of the fixture),
strict checkpoint loading in every format, size checks, the released configurations' shapes, the boundary to
snd's conventions, and ``snd precompute-gaussians`` + ``snd train`` on its Gaussians.

The parity fixture (official outputs of seeded random weights, see its README) lives outside the repository:
``../shared/fixtures/depthsplat`` beside the checkout, or ``$SND_DEPTHSPLAT_FIXTURE``. Tests that need it are
skipped where it is absent.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from snd_stages.reconstruct.depthsplat import DepthSplatEncoder, DepthSplatOutput, load_depthsplat_encoder

FIXTURE = Path(
    os.environ.get("SND_DEPTHSPLAT_FIXTURE")
    or Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "depthsplat"
)
needs_fixture = pytest.mark.skipif(
    not all((FIXTURE / name).is_file() for name in ("weights.safetensors", "inputs.npz", "outputs.npz")),
    reason=f"DepthSplat parity fixture not found at {FIXTURE} (set SND_DEPTHSPLAT_FIXTURE to its folder)",
)


# ---------------------------------------------------------------------------------------------------------------
# Parity with the official encoder (README of the fixture, sections 4.2 and 8)


def _array(x) -> np.ndarray:
    return (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)).astype(np.float64)


def max_over_rms(x, reference) -> float:
    x, reference = _array(x), _array(reference)
    assert x.shape == reference.shape, (x.shape, reference.shape)
    return float(np.abs(x - reference).max() / np.sqrt(np.mean(reference**2)))


def max_abs(x, reference) -> float:
    x, reference = _array(x), _array(reference)
    assert x.shape == reference.shape, (x.shape, reference.shape)
    return float(np.abs(x - reference).max())


def disparity_error(depths, reference) -> float:
    return max_abs(1.0 / _array(depths), 1.0 / _array(reference))


def means_error(means, reference, reference_depths) -> float:
    """max over Gaussians of |mu - mu_ref| / z_ref^2 (z_ref in the Gaussians' (view, row, column) order)."""
    distance = np.linalg.norm(_array(means).reshape(-1, 3) - _array(reference).reshape(-1, 3), axis=-1)
    return float((distance / _array(reference_depths).reshape(-1) ** 2).max())


def harmonics_error(harmonics, reference) -> float:
    """Each degree block separately: max |delta_l| / RMS(ref_l), the worst degree."""
    return max(max_over_rms(_array(harmonics)[..., l * l : (l + 1) ** 2], _array(reference)[..., l * l : (l + 1) ** 2])
               for l in range(3))


def sum_error(total, reference_sum, reference_abs_sum) -> float:
    return float((np.abs(_array(total) - _array(reference_sum)) / _array(reference_abs_sum)).max())


def _grid(stop: int, step: int) -> list[int]:
    """0, step, ... below ``stop``, and ``stop`` itself: the fixture's subset grids."""
    return list(range(0, stop, step)) + [stop]


FULL = _grid(255, 8)  # 33 of 256
LOWRES = _grid(63, 4)  # 17 of the 64 x 64 (1/4) grid
HALFRES = _grid(127, 8)  # 17 of the 128 x 128 (1/2) grid
COARSE = _grid(63, 8)  # 9 of the 64 x 64 grid
EIGHTH_5 = [0, 8, 16, 24, 31]  # of the 32 x 32 (1/8) grid
EIGHTH_9 = _grid(31, 4)
VIT_GRID = _grid(251, 9)  # 29 of the 252 x 252 ViT input
PATCHES = (0, 3, 6, 9, 12, 15, 17)
TOKENS = [0] + [1 + 18 * row + col for row in PATCHES for col in PATCHES]


def on_grid(x: torch.Tensor, grid: list[int]) -> torch.Tensor:
    return x[..., grid, :][..., grid]


def per_view(x: torch.Tensor) -> torch.Tensor:
    """``[B, V, ...]`` -> ``[B V, ...]`` (the official ``(b v)`` layout; B = 1)."""
    return x.reshape(-1, *x.shape[2:])


def run_case(encoder: DepthSplatEncoder, inputs, extrinsics_key: str) -> tuple[dict, object]:
    intermediates: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        output = encoder(
            torch.from_numpy(inputs["images"]),
            torch.from_numpy(inputs["intrinsics"]),
            torch.from_numpy(inputs[extrinsics_key]),
            torch.from_numpy(inputs["near"]),
            torch.from_numpy(inputs["far"]),
            intermediates=intermediates,
        )
    return intermediates, output


def gaussian_subset(x: torch.Tensor, index: np.ndarray) -> torch.Tensor:
    """``[1, V, H, W, ...]`` -> the fixture's subset Gaussians ``[1, 2178, ...]``."""
    return x.reshape(1, -1, *x.shape[4:])[:, torch.from_numpy(index)]


def gaussian_sum(x: torch.Tensor) -> torch.Tensor:
    """Summed over all Gaussians (leading axes), in float64."""
    return x.to(torch.float64).reshape(-1, *x.shape[4:]).sum(0)


@dataclass(frozen=True)
class Case:
    """One run of the encoder on the fixture's inputs, with the reference outputs."""

    i: dict  # intermediates
    out: DepthSplatOutput
    ref: dict  # outputs.npz
    prefix: str  # "" for case A, "posed_" for case B

    def key(self, name: str) -> np.ndarray:
        return self.ref[self.prefix + name]

    def subset(self, x: torch.Tensor) -> torch.Tensor:
        return gaussian_subset(x, self.ref["subset_gaussian_index"])

    def sum_check(self, name: str) -> float:
        return sum_error(gaussian_sum(getattr(self.out, name)), self.key(f"{name}_sum"), self.key(f"{name}_abs_sum"))


Measure = Callable[[Case], float]

# Checked in both cases (names of case B get the prefix ``posed_``): name -> (measure, tolerance).
BOTH_CASES: dict[str, tuple[Measure, float]] = {
    "depths": (lambda c: disparity_error(c.out.depths, c.key("depths")[..., 0, 0]), 2e-4),
    "means": (lambda c: means_error(c.out.means, c.key("means"), c.key("depths")), 2e-4),
    "opacities_subset": (lambda c: max_abs(c.subset(c.out.opacities), c.key("opacities_subset")), 5e-5),
    "scales_subset": (lambda c: max_over_rms(c.subset(c.out.scales), c.key("scales_subset")), 1e-3),
    "covariances_subset": (lambda c: max_over_rms(c.subset(c.out.covariances), c.key("covariances_subset")), 1e-3),
    "rotations_subset": (lambda c: max_abs(c.subset(c.out.rotations), c.key("rotations_subset")), 1e-4),
    "harmonics_subset": (lambda c: harmonics_error(c.subset(c.out.harmonics), c.key("harmonics_subset")), 1e-3),
    "relative_pose": (lambda c: max_abs(per_view(c.i["relative_pose"]), c.key("relative_pose")), 1e-6),
    "coarse_disps": (lambda c: max_over_rms(c.i["coarse_disps"], c.key("coarse_disps")), 1e-3),
    "cost_volume_subset": (lambda c: max_over_rms(on_grid(c.i["cost_volume"], LOWRES), c.key("cost_volume_subset")),
                           1e-3),
    **{f"{name}_sum": ((lambda c, name=name: c.sum_check(name)), 2e-5)
       for name in ("scales", "rotations", "covariances", "harmonics", "opacities")},
}


def _on_grid_check(name: str, grid: list[int], flatten: bool = False) -> Measure:
    def measure(c: Case) -> float:
        x = per_view(c.i[name]) if flatten else c.i[name]
        return max_over_rms(on_grid(x, grid), c.ref[f"{name}_subset"])

    return measure


# Checked in case A only (the intermediates).
CASE_A_ONLY: dict[str, tuple[Measure, float]] = {
    "vit_input_subset": (_on_grid_check("vit_input", VIT_GRID), 1e-4),
    "vit_pos_embed_subset": (lambda c: max_abs(c.i["vit_pos_embed"][..., ::8], c.ref["vit_pos_embed_subset"]), 1e-6),
    "vit_embed_subset": (lambda c: max_over_rms(c.i["vit_embed"][:, TOKENS], c.ref["vit_embed_subset"]), 1e-4),
    **{f"vit_tokens_l{layer}_subset": (
        (lambda c, layer=layer: max_over_rms(c.i[f"vit_tokens_l{layer}"][:, TOKENS],
                                             c.ref[f"vit_tokens_l{layer}_subset"])), 1e-4)
       for layer in (2, 5, 8, 11)},
    **{f"mono_intermediate_{index}_subset": (_on_grid_check(f"mono_intermediate_{index}", EIGHTH_5), 1e-4)
       for index in range(4)},
    "mono_features_subset": (_on_grid_check("mono_features", COARSE), 1e-4),
    "cnn_half64_subset": (_on_grid_check("cnn_half64", HALFRES), 1e-3),
    "cnn_half96_subset": (_on_grid_check("cnn_half96", HALFRES), 1e-3),
    "cnn_features_subset": (_on_grid_check("cnn_features", LOWRES), 1e-3),
    "position_embedding": (lambda c: max_abs(c.i["position_embedding"], c.ref["position_embedding"]), 1e-6),
    "trans_features_subset": (_on_grid_check("trans_features", LOWRES, flatten=True), 1e-3),
    "intrinsics_lowres_pixels": (
        lambda c: max_abs(per_view(c.i["intrinsics_lowres_pixels"]), c.ref["intrinsics_lowres_pixels"]), 1e-6),
    "disp_candidates": (lambda c: max_abs(c.i["disp_candidates"], c.ref["disp_candidates"]), 1e-6),
    "refined_cost_subset": (_on_grid_check("refined_cost", LOWRES), 1e-3),
    "pdf_max_lowres": (lambda c: max_over_rms(c.i["pdf_max_lowres"], c.ref["pdf_max_lowres"]), 1e-3),
    "residual_disp_subset": (_on_grid_check("residual_disp", FULL), 1e-3),
    "upsampler_path1_subset": (_on_grid_check("upsampler_path1", FULL), 1e-3),
    "features_path4_subset": (_on_grid_check("features_path4", EIGHTH_9), 1e-3),
    "features_subset": (_on_grid_check("features", FULL), 1e-3),
    "regressor_out_subset": (_on_grid_check("regressor_out", FULL), 1e-3),
    "raw_gaussians_subset": (lambda c: max_over_rms(
        on_grid(c.i["raw_gaussians"], FULL).permute(0, 2, 3, 1).reshape(1, -1, 37), c.ref["raw_gaussians_subset"]),
        1e-3),
    "opacities": (lambda c: max_abs(c.out.opacities.reshape(1, -1), c.ref["opacities"]), 5e-5),
}

CRITERIA: dict[str, tuple[str, Measure, float]] = {
    **{name: ("", measure, tolerance) for name, (measure, tolerance) in CASE_A_ONLY.items()},
    **{name: ("", measure, tolerance) for name, (measure, tolerance) in BOTH_CASES.items()},
    **{f"posed_{name}": ("posed_", measure, tolerance) for name, (measure, tolerance) in BOTH_CASES.items()},
}


@pytest.fixture(scope="module")
def parity() -> dict[str, Case]:
    """Both cases of the fixture run through the encoder loaded from the fixture's safetensors (float16 -> 32)."""
    inputs = np.load(FIXTURE / "inputs.npz")
    ref = dict(np.load(FIXTURE / "outputs.npz"))
    encoder = load_depthsplat_encoder(FIXTURE / "weights.safetensors")
    cases = {}
    for prefix, extrinsics in (("", "extrinsics"), ("posed_", "posed_extrinsics")):
        intermediates, output = run_case(encoder, inputs, extrinsics)
        cases[prefix] = Case(intermediates, output, ref, prefix)
    return cases


def test_the_fixture_has_58_criteria() -> None:
    assert len(CRITERIA) == 58


@needs_fixture
@pytest.mark.parametrize("name", list(CRITERIA))
def test_parity_with_the_official_encoder(parity: dict[str, Case], name: str) -> None:
    prefix, measure, tolerance = CRITERIA[name]
    value = measure(parity[prefix])
    assert value <= tolerance, f"{name}: {value:.3g} > {tolerance:g}"
