"""The depthsplat reconstructor: parity with the official DepthSplat encoder (all 58 criteria of the fixture),
strict checkpoint loading in every format, size checks, the released configurations' shapes, the boundary to
snd's conventions, and ``snd precompute-gaussians`` + ``snd train`` on its Gaussians.

The parity fixture (official outputs of seeded random weights, see its README) lives outside the repository:
``../shared/fixtures/depthsplat`` beside the checkout, or ``$SND_DEPTHSPLAT_FIXTURE``. Tests that need it are
skipped where it is absent.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from snd_stages.errors import ConfigError, DataError
from snd_stages.pipeline import load_config
from snd_stages.reconstruct import GaussiansCfg, build_reconstructor
from snd_stages.reconstruct.depthsplat import (
    MODELS,
    DepthSplatEncoder,
    DepthSplatOutput,
    encoder_inputs,
    infer_model,
    load_depthsplat_encoder,
    read_depthsplat_checkpoint,
    reconstruct_pair,
)
from snd_stages.reconstruct.depthsplat.checkpoint import expected_state_dict
from snd_stages.reconstruct.depthsplat.settings import DepthSplatSettings
from snd_stages.reconstruct.mvsplat.reconstructor import full_float32
from tests.test_mvsplat import (
    TRIPPED,
    Tripwire,
    _array,
    assert_pixel_aligned,
    assert_rotations_scales_and_opacities_in_snd_conventions,
    max_abs,
    max_over_rms,
    posed_pair,
    run_case,
)

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


def run_parity_cases(device: str) -> dict[str, Case]:
    """Both cases of the fixture run through the encoder loaded from the fixture's safetensors (float16 -> 32),
    in true float32 (TF32 off, as snd reconstructs)."""
    inputs = np.load(FIXTURE / "inputs.npz")
    ref = dict(np.load(FIXTURE / "outputs.npz"))
    encoder = load_depthsplat_encoder(FIXTURE / "weights.safetensors", device=device)
    cases = {}
    with full_float32():
        for prefix, extrinsics in (("", "extrinsics"), ("posed_", "posed_extrinsics")):
            output, intermediates = run_case(encoder, inputs, extrinsics, device)
            cases[prefix] = Case(intermediates, output, ref, prefix)
    return cases


@pytest.fixture(scope="module")
def parity() -> dict[str, Case]:
    return run_parity_cases("cpu")


@pytest.fixture(scope="module")
def cuda_parity() -> dict[str, Case]:
    return run_parity_cases("cuda")


def cuda_tolerance(name: str, tolerance: float) -> float:
    """The fixture README (section 8): on a GPU expect a few times the CPU's float32 noise, and loosen only the
    depth, means, rotation and covariance tolerances, by about x3."""
    loosened = name.removeprefix("posed_").split("_")[0] in ("depths", "means", "rotations", "covariances")
    return 3 * tolerance if loosened else tolerance


def test_the_fixture_has_58_criteria() -> None:
    assert len(CRITERIA) == 58


@needs_fixture
@pytest.mark.parametrize("name", list(CRITERIA))
def test_parity_with_the_official_encoder(parity: dict[str, Case], name: str) -> None:
    prefix, measure, tolerance = CRITERIA[name]
    value = measure(parity[prefix])
    assert value <= tolerance, f"{name}: {value:.3g} > {tolerance:g}"


@pytest.mark.gpu
@needs_fixture
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(CRITERIA))
def test_parity_with_the_official_encoder_on_cuda(cuda_parity: dict[str, Case], name: str) -> None:
    prefix, measure, tolerance = CRITERIA[name]
    tolerance = cuda_tolerance(name, tolerance)
    value = measure(cuda_parity[prefix])
    print(f"\n{name}: {value:.3g} against {tolerance:g} (margin x{tolerance / max(value, 1e-30):.3g})")
    assert value <= tolerance, f"{name} on CUDA: {value:.3g} > {tolerance:g}"


# ---------------------------------------------------------------------------------------------------------------
# The released configurations and strict loading


# Tensors and parameters of the official encoders (fixture README, section 2.1).
OFFICIAL_COUNTS = {"small": (567, 38_346_416), "small_448x768": (567, 38_404_880), "base": (751, 120_747_896),
                   "large": (919, 354_337_760), "base_448x768": (751, 120_877_016)}


@pytest.mark.parametrize("model", list(MODELS))
def test_released_configurations_have_the_official_tensors_and_parameters(model):
    expected = expected_state_dict(model)
    assert (len(expected), sum(value.numel() for value in expected.values())) == OFFICIAL_COUNTS[model]
    assert infer_model(expected) == model


@needs_fixture
def test_the_encoder_has_exactly_the_fixture_checkpoint_keys():
    import json

    params = json.loads((FIXTURE / "params.json").read_text())["parameters"]
    expected = expected_state_dict("small")
    assert {entry["key"]: tuple(entry["shape"]) for entry in params} == {
        f"encoder.{key}": tuple(value.shape) for key, value in expected.items()
    }


def test_the_448x768_model_differs_only_where_the_1_8_branch_joins_the_dpt_heads():
    small, wide = expected_state_dict("small"), expected_state_dict("small_448x768")
    differing = sorted(key for key in small if small[key].shape != wide[key].shape)
    assert differing == [f"{head}.concat_projects.{index}.weight"
                         for head in ("depth_predictor.upsampler", "feature_upsampler") for index in range(3)]
    assert wide["depth_predictor.upsampler.concat_projects.2.weight"].shape == (192, 128 + 192 + 128 + 1, 1, 1)


def test_the_two_scale_models_have_pyramids_and_a_second_cost_volume():
    base = expected_state_dict("base")
    # The finer scale: 32 candidates, the CNN's 96-channel stage, 64-channel transformer and 384-channel DINOv2
    # features from the pyramids, a 64-wide U-Net with a fourth level whose attention sits at 1/8 of its input.
    assert base["depth_predictor.regressor.1.0.weight"].shape == (64, 32 + 96 + 64 + 384, 3, 3)
    assert base["depth_predictor.depth_head.1.2.weight"].shape == (32, 128, 3, 3)
    assert base["depth_predictor.mv_pyramid.stages.1.0.weight"].shape == (128, 64, 2, 2)
    assert base["depth_predictor.mono_pyramid.stages.1.2.weight"].shape == (384, 384, 3, 3)
    assert "depth_predictor.regressor.1.3.input_blocks.7.1.qkv.weight" in base
    assert base["depth_predictor.upsampler.concat_projects.0.weight"].shape == (96, 64 + 96 + 64 + 1 + 96, 1, 1)
    assert base["feature_upsampler.scratch.layer1_rn.weight"].shape == (96, 96, 3, 3)
    assert expected_state_dict("large")["depth_predictor.upsampler.projects.0.weight"].shape == (128, 1024, 1, 1)


@pytest.mark.parametrize("model, size", [("base", (32, 48)), ("base_448x768", (64, 128))])
def test_the_two_scale_models_run(model, size):
    torch.manual_seed(0)
    encoder = DepthSplatEncoder(MODELS[model]).eval()
    images, camera = posed_pair(*size)
    result = reconstruct_pair(encoder, images, camera, near=0.5, far=100.0)
    z = assert_pixel_aligned(result.gaussians, result.depth.double(), camera, near=0.5, far=100.0)
    torch.testing.assert_close(z, result.depth.double().reshape(2, -1), rtol=1e-5, atol=0)


def test_a_checkpoint_matching_no_configuration_is_reported_against_its_size(tmp_path):
    state = {f"encoder.{key}": torch.zeros(value.shape, dtype=torch.float16)
             for key, value in expected_state_dict("base").items()}
    del state["encoder.depth_predictor.mv_pyramid.stages.1.2.bias"]
    path = tmp_path / "base.safetensors"
    save_file(state, path)
    with pytest.raises(DataError, match=r"into the DepthSplat encoder \(751 tensors\).*1 missing keys: "
                                        r"encoder.depth_predictor.mv_pyramid.stages.1.2.bias"):
        load_depthsplat_encoder(path)


@pytest.fixture(scope="module")
def random_state() -> dict[str, torch.Tensor]:
    """Seeded random weights of the small model, keyed as the authors' checkpoints, stored in float16 as the
    fixture is (the loader casts to float32)."""
    torch.manual_seed(0)
    return {f"encoder.{key}": value.half() for key, value in DepthSplatEncoder().state_dict().items()}


def _assert_loaded(encoder: DepthSplatEncoder, state: dict[str, torch.Tensor]) -> None:
    loaded = encoder.state_dict()
    assert loaded.keys() == {key.removeprefix("encoder.") for key in state}
    for key in ("depth_predictor.pretrained.pos_embed", "gaussian_head.2.weight", "feature_upsampler.projects.0.bias"):
        assert loaded[key].dtype == torch.float32
        torch.testing.assert_close(loaded[key], state[f"encoder.{key}"].float(), rtol=0, atol=0)


def test_lightning_checkpoint_loads_without_running_pickled_code(random_state, tmp_path):
    path = tmp_path / "depthsplat-gs-small-re10k-256x256-view2-cfeab6b1.pth"
    torch.save({"epoch": 10, "global_step": 300000, "state_dict": random_state, "tripwire": Tripwire()}, path)
    encoder = load_depthsplat_encoder(path)
    assert not TRIPPED
    _assert_loaded(encoder, random_state)
    assert not encoder.training and encoder.cfg == MODELS["small"]


@pytest.mark.parametrize("prefixed", [True, False])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_bare_state_dicts_load_with_or_without_the_prefix(random_state, tmp_path, prefixed, suffix):
    state = random_state if prefixed else {key.removeprefix("encoder."): value for key, value in random_state.items()}
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    assert read_depthsplat_checkpoint(path).keys() == state.keys()
    _assert_loaded(load_depthsplat_encoder(path, model="small"), random_state)


def test_missing_unexpected_and_misshapen_keys_are_reported_together(random_state, tmp_path):
    state = dict(random_state)
    del state["encoder.depth_predictor.pretrained.blocks.7.ls1.gamma"]
    state["encoder.depth_predictor.pretrained.mask_token"] = torch.zeros(1, 384)
    state["decoder.background_color"] = torch.zeros(3)
    state["encoder.gaussian_head.2.bias"] = torch.zeros(84)
    path = tmp_path / "broken.pth"
    torch.save({"state_dict": state}, path)
    for model in ("auto", "small"):
        with pytest.raises(DataError) as error:
            load_depthsplat_encoder(path, model=model)
        message = str(error.value)
        assert str(path) in message and "\n" not in message
        assert "1 missing keys: encoder.depth_predictor.pretrained.blocks.7.ls1.gamma" in message
        assert "2 unexpected keys" in message and "decoder.background_color" in message
        assert "encoder.depth_predictor.pretrained.mask_token" in message
        assert "1 shape mismatches: encoder.gaussian_head.2.bias: checkpoint (84,) vs model (37,)" in message


def test_a_checkpoint_of_one_configuration_does_not_load_as_the_other(random_state, tmp_path):
    path = tmp_path / "small.safetensors"
    save_file(random_state, path)
    with pytest.raises(DataError, match="6 shape mismatches: encoder.depth_predictor.upsampler.concat_projects.0"):
        load_depthsplat_encoder(path, model="small_448x768")


def test_unreadable_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="DepthSplat checkpoint .*missing.pth does not exist.*gaussians.depthsplat"):
        read_depthsplat_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="cannot read"):
        read_depthsplat_checkpoint(tmp_path / "garbage.pth")


# ---------------------------------------------------------------------------------------------------------------
# Sizes, the other configuration, and the boundary: our cameras in, our Gaussians out




@pytest.fixture(scope="module")
def small_encoder() -> DepthSplatEncoder:
    torch.manual_seed(0)
    return DepthSplatEncoder().eval()


def test_sizes_are_checked_before_any_work(small_encoder):
    images, camera = posed_pair(40, 48)

    def fail(*args, **kwargs):
        raise AssertionError("the encoder ran")

    with pytest.raises(DataError, match=r"a.jpg, b.jpg\) are 40x48.*depthsplat reconstructor.*multiples of 16"):
        reconstruct_pair(FailingEncoder(16), images, camera, near=0.5, far=100.0, names=("a.jpg", "b.jpg"))
    images, camera = posed_pair(64, 96)
    with pytest.raises(DataError, match=r"64x96.*multiples of 64.*448x768"):
        reconstruct_pair(FailingEncoder(64), images, camera, near=0.5, far=200.0)
    with pytest.raises(ValueError, match="multiples of 16, got 40x48"):
        small_encoder(torch.zeros(1, 2, 3, 40, 48), torch.eye(3).expand(1, 2, 3, 3), torch.eye(4).expand(1, 2, 4, 4),
                      torch.ones(1, 2), torch.full((1, 2), 100.0))


class FailingEncoder(torch.nn.Module):
    """An encoder with DepthSplat's size rule whose forward must never be reached."""

    name = "depthsplat"

    def __init__(self, size_multiple: int) -> None:
        super().__init__()
        self.size_multiple = size_multiple
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, **inputs):
        raise AssertionError("the encoder ran before the size was checked")


def test_the_448x768_configuration_runs_at_a_multiple_of_64():
    torch.manual_seed(0)
    encoder = DepthSplatEncoder(MODELS["small_448x768"]).eval()
    assert encoder.size_multiple == 64
    images, camera = posed_pair(64, 128)
    result = reconstruct_pair(encoder, images, camera, near=0.5, far=200.0)
    assert_pixel_aligned(result.gaussians, result.depth.double(), camera, near=0.5, far=200.0)
    scales = result.gaussians.scales
    assert torch.isfinite(result.gaussians.means).all() and (scales > 0).all() and (scales <= 0.1 + 1e-7).all()


def test_gaussians_follow_snd_conventions(small_encoder):
    images, camera = posed_pair()
    result = reconstruct_pair(small_encoder, images, camera, near=0.5, far=100.0)
    gaussians, depth = result.gaussians, result.depth.double()
    z = assert_pixel_aligned(gaussians, depth, camera, near=0.5, far=100.0)
    # Means: the predicted depth is the z-depth of the Gaussian in its source camera.
    torch.testing.assert_close(z, depth.reshape(2, -1), rtol=1e-5, atol=0)

    with torch.no_grad():
        output = small_encoder(**encoder_inputs(images, camera, 0.5, 100.0), with_harmonics=False)
    assert_rotations_scales_and_opacities_in_snd_conventions(gaussians, output, camera)


# ---------------------------------------------------------------------------------------------------------------
# Configuration and registry


def test_depthsplat_needs_a_checkpoint():
    with pytest.raises(ConfigError, match="gaussians.depthsplat.checkpoint.*DepthSplat's checkpoints"):
        load_config(None, ["gaussians.reconstructor=depthsplat"])
    with pytest.raises(ConfigError, match="gaussians.depthsplat.checkpoint = '/nowhere/d.pth' does not exist"):
        build_reconstructor(GaussiansCfg(reconstructor="depthsplat",
                                         depthsplat=DepthSplatSettings(Path("/nowhere/d.pth"))))


def test_settings_are_validated():
    settings = GaussiansCfg().depthsplat
    assert (settings.model, settings.near, settings.far) == ("auto", 0.5, 100.0)
    with pytest.raises(ConfigError, match="gaussians.depthsplat.model"):
        load_config(None, ["gaussians.depthsplat.model=huge"])
    with pytest.raises(ConfigError, match="gaussians.depthsplat.far"):
        load_config(None, ["gaussians.depthsplat.near=5", "gaussians.depthsplat.far=2"])


def test_registry_entry_needs_no_depth_and_keys_the_checkpoint_by_content(random_state, tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file(random_state, path)
    cfg = GaussiansCfg(reconstructor="depthsplat", depthsplat=DepthSplatSettings(path), device="cpu")
    reconstructor = build_reconstructor(cfg)
    assert reconstructor.name == "depthsplat" and not reconstructor.requires_depth
    assert reconstructor.reconstruct_with_depth is not None
    params, inputs = cfg.key()
    assert params["reconstructor"] == "depthsplat" and params["depthsplat"]["model"] == "auto"
    assert set(inputs) == {"depthsplat_checkpoint_sha256"}


# ---------------------------------------------------------------------------------------------------------------
# snd precompute-gaussians and snd train on depthsplat Gaussians


def _write_config(path: Path, settings: list[str]) -> Path:
    """``key.sub=value`` settings as a pipeline.yaml (values parsed as YAML, as ``--set`` parses them)."""
    tree: dict = {}
    for setting in settings:
        key, value = setting.split("=", 1)
        *sections, leaf = key.split(".")
        node = tree
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.mark.slow
def test_precompute_gaussians_then_training_run_on_depthsplat_gaussians(random_state, tmp_path):
    from typer.testing import CliRunner

    from snd_stages.artifacts.gaussians import load_gaussians, read_pair
    from snd_stages.artifacts.samples import load_samples
    from snd_stages.cli import app
    from snd_stages.stages.precompute_masks import precompute_masks
    from snd_stages.stages.precompute_operators import precompute_operators
    from snd_stages.stages.train import train
    from tests.conftest import build_demo_samples

    checkpoint = tmp_path / "depthsplat-small.safetensors"
    save_file(random_state, checkpoint)
    config = _write_config(tmp_path / "pipeline.yaml", [
        "demo.train_scenes=1", "demo.eval_scenes=0", "demo.frames_per_scene=8", "demo.height=48", "demo.width=64",
        "sampling.samples_per_scene=2", "sampling.frame_gap=[3,4]",
        "gaussians.reconstructor=depthsplat", f"gaussians.depthsplat.checkpoint={checkpoint}",
        "gaussians.device=cpu",
        "train.weights=random", "train.allow_random_weights=true", "train.prototypes=256", "train.batch_size=1",
        "train.log_every=1", "train.steps=2", "train.device=cpu",
        f"data.root={tmp_path / 'demo'}", f"store.root={tmp_path / 'store'}", f"train.runs_root={tmp_path / 'runs'}",
    ])
    cfg = load_config(config, [])
    store = build_demo_samples(cfg)

    result = CliRunner().invoke(app, ["precompute-gaussians", "--config", str(config)])
    assert result.exit_code == 0, result.output
    samples_artifact, _ = load_samples(store, cfg.data, cfg.sampling)
    artifact = load_gaussians(store, cfg.gaussians, samples_artifact.key)
    assert artifact.group().attrs["reconstructor"] == "depthsplat"
    pair = read_pair(artifact.unit(artifact.units()[0]))
    assert len(pair.gaussians) == 2 * 48 * 64 and torch.isfinite(pair.gaussians.means).all()
    assert ((pair.gaussians.scales > 0) & (pair.gaussians.scales <= 3.0)).all()

    precompute_masks(cfg.data, cfg.sampling, cfg.masks, store)
    precompute_operators(cfg.data, cfg.sampling, cfg.gaussians, cfg.masks, cfg.train, store)
    run = train(cfg.data, cfg.sampling, cfg.gaussians, cfg.masks, cfg.train, store)
    lines = (run.run_dir / "metrics.csv").read_text().splitlines()
    losses = [float(line.split(",")[lines[0].split(",").index("loss")]) for line in lines[1:]]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
