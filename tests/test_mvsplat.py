"""The mvsplat reconstructor: parity with the official MVSplat encoder, strict checkpoint loading, the boundary
to snd's conventions, configuration, and ``snd train`` on its Gaussians.

The parity fixture (official outputs of seeded random weights, see its README) lives outside the repository:
``../shared/fixtures/mvsplat`` beside the checkout, or ``$SND_MVSPLAT_FIXTURE``. Tests that need it are skipped
where it is absent.
"""

from __future__ import annotations

import math
import os
import pickle
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from snd_stages.reconstruct import GaussiansCfg
from snd_stages.reconstruct.mvsplat.settings import MVSplatSettings

from snd_stages.pipeline import load_config
from snd_stages.errors import ConfigError, DataError
from snd_stages.geometry import Camera, invert_rigid, project_points, quaternion_to_rotation_matrix
from snd_stages.reconstruct import RECONSTRUCTORS, build_reconstructor
from snd_stages.reconstruct.mvsplat import (
    MVSplatEncoder,
    encoder_inputs,
    load_mvsplat_encoder,
    read_mvsplat_checkpoint,
    reconstruct_pair,
)
from snd_stages.reconstruct.mvsplat.gaussian_adapter import quaternion_xyzw_to_matrix

FIXTURE = Path(
    os.environ.get("SND_MVSPLAT_FIXTURE") or Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "mvsplat"
)
needs_fixture = pytest.mark.skipif(
    not all((FIXTURE / name).is_file() for name in ("weights.safetensors", "inputs.npz", "outputs.npz")),
    reason=f"MVSplat parity fixture not found at {FIXTURE} (set SND_MVSPLAT_FIXTURE to its folder)",
)


# ---------------------------------------------------------------------------------------------------------------
# Parity with the official encoder (README of the fixture, sections 4.2 and 8)


@dataclass(frozen=True)
class Check:
    name: str
    measure: str
    value: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.value <= self.tolerance


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


def run_case(encoder: MVSplatEncoder, inputs, extrinsics_key: str, device: str = "cpu"):
    intermediates: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        output = encoder(
            *(torch.from_numpy(inputs[key]).to(device)
              for key in ("images", "intrinsics", extrinsics_key, "near", "far")),
            intermediates=intermediates,
        )
    return output, intermediates


def parity_checks(encoder: MVSplatEncoder) -> list[Check]:
    """Every output and intermediate of the fixture, with the fixture README's measures and tolerances."""
    inputs, ref = np.load(FIXTURE / "inputs.npz"), np.load(FIXTURE / "outputs.npz")
    rows, cols = ref["subset_rows"], ref["subset_cols"]
    low_rows, low_cols = ref["lowres_subset_rows"], ref["lowres_subset_cols"]
    subset = ref["subset_gaussian_index"]
    grid = lambda maps: _array(maps)[:, :, rows][:, :, :, cols]  # noqa: E731  [(v b), C, 33, 33]
    low_grid = lambda maps: _array(maps)[:, :, low_rows][:, :, :, low_cols]  # noqa: E731
    checks: list[Check] = []

    def normalised(name, x, reference):
        checks.append(Check(name, "max|d|/RMS", max_over_rms(x, reference), 1e-3))

    def absolute(name, x, reference, tolerance=1e-6):
        checks.append(Check(name, "max|d|", max_abs(x, reference), tolerance))

    def gaussians(prefix: str, output, depth_ref: np.ndarray, index=None):
        """The adapter's outputs in the official (1, N, ...) layout; ``index`` picks the subset Gaussians."""
        count = depth_ref.size
        z = depth_ref.reshape(count)
        pick = (lambda x: x) if index is None else (lambda x: x[:, index])  # noqa: E731
        zs = z if index is None else z[index]
        suffix = "" if index is None else "_subset"
        flat = lambda x, *tail: _array(x).reshape(1, count, *tail)  # noqa: E731
        if f"{prefix}covariances{suffix}" in ref:
            d = np.abs(pick(flat(output.covariances, 3, 3)) - ref[f"{prefix}covariances{suffix}"]).max(axis=(-1, -2))
            checks.append(Check(f"{prefix}covariances{suffix}", "max|dS|/z^2", float((d[0] / zs**2).max()), 1e-7))
        if f"{prefix}scales{suffix}" in ref:
            d = np.abs(pick(flat(output.scales, 3)) - ref[f"{prefix}scales{suffix}"]).max(axis=-1)
            checks.append(Check(f"{prefix}scales{suffix}", "max|ds|/z", float((d[0] / zs).max()), 1e-5))
        if f"{prefix}rotations{suffix}" in ref:
            absolute(f"{prefix}rotations{suffix}", pick(flat(output.rotations, 4)), ref[f"{prefix}rotations{suffix}"], 1e-4)
        if f"{prefix}means" in ref and index is None:
            d = np.linalg.norm(flat(output.means, 3) - ref[f"{prefix}means"], axis=-1)
            checks.append(Check(f"{prefix}means", "max|dmu|/z^2", float((d[0] / z**2).max()), 1e-4))
        if f"{prefix}opacities" in ref and index is None:
            absolute(f"{prefix}opacities", flat(output.opacities), ref[f"{prefix}opacities"], 5e-5)
        harmonics = flat(output.harmonics, 3, 25)
        normalised(f"{prefix}harmonics_subset", harmonics[:, subset], ref[f"{prefix}harmonics_subset"])
        difference = np.abs(harmonics[0].sum(axis=0) - ref[f"{prefix}harmonics_sum"]) / ref[f"{prefix}harmonics_abs_sum"]
        checks.append(Check(f"{prefix}harmonics_sum", "max|dsum|/abs_sum", float(difference.max()), 1e-4))

    # Case A: rectified pair, every intermediate ((v b) layouts: batch 1, so [0] of ours).
    output, inter = run_case(encoder, inputs, "extrinsics")
    depths = ref["depths"][..., 0, 0]
    normalised("cnn_features", inter["cnn_features"], ref["cnn_features"])
    absolute("position_embedding", inter["position_embedding"], ref["position_embedding"])
    normalised("trans_features", inter["trans_features"], ref["trans_features"])
    absolute("disp_candidates", inter["disp_candidates"][0], ref["disp_candidates"])
    absolute("relative_pose", inter["relative_pose"][0], ref["relative_pose"])
    # Not in the README's table: pixel intrinsics up to ~130, compared relative to their largest entry.
    checks.append(Check("intrinsics_lowres_pixels", "max|d|/max|ref|",
                        max_abs(inter["intrinsics_lowres_pixels"][0], ref["intrinsics_lowres_pixels"])
                        / np.abs(ref["intrinsics_lowres_pixels"]).max(), 1e-6))
    normalised("cost_volume", inter["cost_volume"][0], ref["cost_volume"])
    normalised("refined_cost", inter["refined_cost"][0], ref["refined_cost"])
    normalised("coarse_disps", inter["coarse_disps"][0], ref["coarse_disps"])
    normalised("pdf_max_lowres", inter["pdf_max_lowres"][0], ref["pdf_max_lowres"])
    normalised("fullres_disps", inter["fullres_disps"][0], ref["fullres_disps"])
    normalised("proj_feature_subset", grid(inter["proj_feature"][0]), ref["proj_feature_subset"])
    normalised("refine_out_subset", grid(inter["refine_out"][0]), ref["refine_out_subset"])
    raw = inter["raw_gaussians"].permute(0, 1, 3, 4, 2).reshape(1, -1, 84)
    normalised("raw_gaussians_subset", raw[:, subset], ref["raw_gaussians_subset"])
    absolute("depths", 1 / _array(output.depths), 1 / depths, 1e-4)
    gaussians("", output, depths)

    # Case B: posed cameras, every rotation path.
    output, inter = run_case(encoder, inputs, "posed_extrinsics")
    depths = ref["posed_depths"][..., 0, 0]
    absolute("posed_relative_pose", inter["relative_pose"][0], ref["posed_relative_pose"])
    normalised("posed_cost_volume_subset", low_grid(inter["cost_volume"][0]), ref["posed_cost_volume_subset"])
    normalised("posed_coarse_disps", inter["coarse_disps"][0], ref["posed_coarse_disps"])
    absolute("posed_depths", 1 / _array(output.depths), 1 / depths, 1e-4)
    gaussians("posed_", output, depths)
    gaussians("posed_", output, depths, index=subset)
    return checks


@pytest.fixture(scope="module")
def parity() -> dict[str, Check]:
    torch.manual_seed(0)
    encoder = load_mvsplat_encoder(FIXTURE / "weights.safetensors")
    return {check.name: check for check in parity_checks(encoder)}


PARITY_NAMES = [
    "cnn_features", "position_embedding", "trans_features", "disp_candidates", "relative_pose",
    "intrinsics_lowres_pixels", "cost_volume", "refined_cost", "coarse_disps", "pdf_max_lowres", "fullres_disps",
    "proj_feature_subset", "refine_out_subset", "raw_gaussians_subset", "depths", "covariances", "scales",
    "rotations", "means", "opacities", "harmonics_subset", "harmonics_sum",
    "posed_relative_pose", "posed_cost_volume_subset", "posed_coarse_disps", "posed_depths", "posed_means",
    "posed_opacities", "posed_harmonics_subset", "posed_harmonics_sum", "posed_covariances_subset",
    "posed_scales_subset", "posed_rotations_subset",
]


@pytest.mark.slow
@needs_fixture
def test_parity_table_covers_every_fixture_tensor(parity):
    print(f"\n{'check':<28} {'measure':<18} {'value':>10} {'tolerance':>10}  margin")
    for check in parity.values():
        margin = check.tolerance / check.value if check.value > 0 else math.inf
        print(f"{check.name:<28} {check.measure:<18} {check.value:>10.2e} {check.tolerance:>10.0e}  x{margin:.3g}")
    assert sorted(parity) == sorted(PARITY_NAMES)
    reference = np.load(FIXTURE / "outputs.npz")
    derived = {"subset_rows", "subset_cols", "lowres_subset_rows", "lowres_subset_cols", "subset_gaussian_index",
               "harmonics_abs_sum", "posed_harmonics_abs_sum"}
    assert set(reference.files) - derived <= set(parity), set(reference.files) - derived - set(parity)


@pytest.mark.slow
@needs_fixture
@pytest.mark.parametrize("name", PARITY_NAMES)
def test_parity_with_the_official_encoder(parity, name):
    check = parity[name]
    assert check.passed, f"{name}: {check.measure} = {check.value:.3e} > {check.tolerance:.0e}"


# ---------------------------------------------------------------------------------------------------------------
# Strict checkpoint loading


@pytest.fixture(scope="module")
def reference_state() -> dict[str, torch.Tensor]:
    """A random encoder's weights, keyed like the official checkpoint."""
    torch.manual_seed(1)
    return {f"encoder.{key}": value for key, value in MVSplatEncoder().state_dict().items()}


@dataclass
class TrainingConfig:
    """Stands for the experiment config Lightning stores beside the weights."""

    learning_rate: float = 1e-4


TRIPPED: list[str] = []


def _trip() -> str:
    TRIPPED.append("code from the checkpoint ran")
    return "tripped"


class Tripwire:
    def __reduce__(self):
        return _trip, ()


def test_lightning_checkpoint_with_bookkeeping_loads_without_running_its_code(reference_state, tmp_path):
    path = tmp_path / "re10k.ckpt"
    torch.save(
        {
            "epoch": 3,
            "global_step": 300000,
            "pytorch-lightning_version": "2.2.4",
            "state_dict": reference_state,
            "hyper_parameters": {"cfg": TrainingConfig(), "output_dir": PurePosixPath("/outputs/re10k")},
            "loops": {"fit_loop": defaultdict(int, {"epoch": 3})},
            "callbacks": {"ModelCheckpoint": {"best_model_score": torch.tensor(0.5), "tripwire": Tripwire()}},
            "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4}]}],
            "numpy_scalar": np.float64(1.5),
        },
        path,
    )
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # what the fallback is for
    encoder = load_mvsplat_encoder(path)
    assert not TRIPPED
    for key, value in encoder.state_dict().items():
        torch.testing.assert_close(value, reference_state[f"encoder.{key}"], rtol=0, atol=0)
    assert not encoder.training


@pytest.mark.parametrize("prefixed", [True, False])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_bare_state_dicts_load_with_or_without_the_prefix(reference_state, tmp_path, prefixed, suffix):
    state = reference_state if prefixed else {key.removeprefix("encoder."): value for key, value in reference_state.items()}
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    assert read_mvsplat_checkpoint(path).keys() == state.keys()
    encoder = load_mvsplat_encoder(path)
    key = "depth_predictor.to_gaussians.2.weight"
    torch.testing.assert_close(encoder.state_dict()[key], reference_state[f"encoder.{key}"], rtol=0, atol=0)


def test_missing_unexpected_and_misshapen_keys_are_reported_together(reference_state, tmp_path):
    state = dict(reference_state)
    del state["encoder.backbone.transformer.layers.3.self_attn.q_proj.weight"]
    state["encoder.depth_predictor.extra_head.weight"] = torch.zeros(2)
    state["decoder.background_color"] = torch.zeros(3)
    state["encoder.depth_predictor.to_disparity.2.bias"] = torch.zeros(4)
    path = tmp_path / "broken.ckpt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(DataError) as error:
        load_mvsplat_encoder(path)
    message = str(error.value)
    assert str(path) in message
    assert "1 missing keys: encoder.backbone.transformer.layers.3.self_attn.q_proj.weight" in message
    assert "2 unexpected keys" in message and "decoder.background_color" in message
    assert "encoder.depth_predictor.extra_head.weight" in message
    assert "1 shape mismatches: encoder.depth_predictor.to_disparity.2.bias: checkpoint (4,) vs model (2,)" in message


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda s: s.pop("encoder.backbone.backbone.conv1.weight"), "missing keys: encoder.backbone.backbone.conv1.weight"),
        (lambda s: s.update({"encoder.gaussian_adapter.sh_mask": torch.ones(25)}), "unexpected keys: encoder.gaussian_adapter.sh_mask"),
        (lambda s: s.update({"encoder.depth_predictor.proj_feature.bias": torch.zeros(64)}), "shape mismatches: encoder.depth_predictor.proj_feature.bias"),
    ],
    ids=["missing", "unexpected", "shape"],
)
def test_any_single_mismatch_refuses_to_load(reference_state, tmp_path, change, expected):
    state = dict(reference_state)
    change(state)
    path = tmp_path / "weights.safetensors"
    save_file(state, path)
    with pytest.raises(DataError, match="weights.safetensors") as error:
        load_mvsplat_encoder(path)
    assert expected in str(error.value)


def test_unreadable_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_mvsplat_checkpoint(tmp_path / "missing.ckpt")
    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="cannot read"):
        read_mvsplat_checkpoint(tmp_path / "garbage.ckpt")
    torch.save({"state_dict": {"encoder.x": [1, 2]}}, tmp_path / "lists.ckpt")
    with pytest.raises(DataError, match="not tensors"):
        read_mvsplat_checkpoint(tmp_path / "lists.ckpt")


# ---------------------------------------------------------------------------------------------------------------
# The boundary: our cameras in, our Gaussians out


HEIGHT, WIDTH = 32, 48


def posed_pair(height: int = HEIGHT, width: int = WIDTH) -> tuple[np.ndarray, Camera]:
    """Random images and two rotated cameras with off-centre principal points."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, height, width, 3), dtype=np.uint8)
    poses = []
    for angle, shift in ((0.2, 0.0), (0.35, 0.3)):
        axis = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
        axis = axis / axis.norm()
        skew = torch.tensor([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        rotation = torch.linalg.matrix_exp(angle * skew)
        camera_to_world = torch.eye(4, dtype=torch.float64)
        camera_to_world[:3, :3] = rotation
        camera_to_world[:3, 3] = torch.tensor([shift, -0.2, 1.5])
        poses.append(invert_rigid(camera_to_world))
    K = torch.tensor([[40.0, 0, 21.3], [0, 41.0, 17.9], [0, 0, 1]], dtype=torch.float64)
    return images, Camera(torch.stack([K, K * torch.tensor([[1.05], [1.0], [1.0]], dtype=torch.float64)]),
                          torch.stack(poses), height, width)


@pytest.fixture(scope="module")
def small_encoder() -> MVSplatEncoder:
    torch.manual_seed(0)
    return MVSplatEncoder().eval()


def test_encoder_inputs_are_normalised_intrinsics_and_camera_to_world():
    images, camera = posed_pair()
    inputs = encoder_inputs(images, camera, near=1.0, far=100.0)
    scale = torch.tensor([[1 / WIDTH], [1 / HEIGHT], [1.0]], dtype=torch.float64)
    torch.testing.assert_close(inputs["intrinsics"][0].double(), camera.intrinsics * scale, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(inputs["camera_to_world"][0].double(), torch.linalg.inv(camera.world_to_camera),
                               rtol=0, atol=1e-6)
    assert inputs["images"].shape == (1, 2, 3, HEIGHT, WIDTH) and inputs["images"].max() <= 1.0
    torch.testing.assert_close(inputs["images"][0, 1, :, 5, 7] * 255, torch.from_numpy(images[1, 5, 7]).float())


def test_gaussians_follow_snd_conventions(small_encoder):
    images, camera = posed_pair()
    result = reconstruct_pair(small_encoder, images, camera, near=1.0, far=100.0)
    gaussians, depth = result.gaussians, result.depth.double()
    assert_pixel_aligned(gaussians, depth, camera, near=1.0, far=100.0)
    # Means: the predicted depth is the distance along the unit ray through the (offset) source pixel.
    distance = (gaussians.means.double().reshape(2, -1, 3) - camera.center[:, None]).norm(dim=-1)
    torch.testing.assert_close(distance, depth.reshape(2, -1), rtol=1e-5, atol=0)

    with torch.no_grad():
        output = small_encoder(**encoder_inputs(images, camera, 1.0, 100.0), with_harmonics=False)
    assert_rotations_scales_and_opacities_in_snd_conventions(gaussians, output, camera)


def assert_pixel_aligned(gaussians, depth: torch.Tensor, camera: Camera, near: float, far: float) -> torch.Tensor:
    """One Gaussian per pixel of both views, in (view, row, column) order, in front of its source camera within
    half a pixel of its pixel's centre, with depth in [near, far]. Returns the Gaussians' z in their source
    cameras, ``[2, H W]``."""
    height, width = camera.height, camera.width
    assert len(gaussians) == 2 * height * width and depth.shape == (2, height, width)
    assert ((depth >= near - 1e-4) & (depth <= far * (1 + 1e-4))).all()
    assert gaussians.source_view.tolist() == [0] * (height * width) + [1] * (height * width)
    assert gaussians.source_pixel.tolist() == list(range(height * width)) * 2
    uv, z = project_points(gaussians.means.double().reshape(2, -1, 3), camera)
    pixels = gaussians.source_pixel.reshape(2, -1)
    rows, cols = torch.div(pixels, width, rounding_mode="floor"), pixels % width
    centres = torch.stack([cols + 0.5, rows + 0.5], dim=-1).double()
    assert (z > 0).all() and ((uv - centres).abs() <= 0.5 + 1e-3).all()  # offsets move at most half a pixel
    return z


def assert_rotations_scales_and_opacities_in_snd_conventions(gaussians, output, camera: Camera) -> None:
    """``gaussians`` (snd's) are ``output``'s (the encoder's, batch element 0) turned into snd's conventions."""
    # Quaternions: unit wxyz in the world frame = the camera-frame rotation (xyzw) turned by the camera's R.
    quats = gaussians.quats.double()
    torch.testing.assert_close(quats.norm(dim=-1), torch.ones(len(quats), dtype=torch.float64), rtol=0, atol=1e-6)
    assert (quats[:, 0] >= 0).all()
    local = quaternion_xyzw_to_matrix(output.rotations[0].double()).reshape(2, -1, 3, 3)
    expected = camera.camera_to_world[:, None, :3, :3] @ local
    torch.testing.assert_close(quaternion_to_rotation_matrix(quats).reshape(2, -1, 3, 3), expected, rtol=0, atol=1e-5)
    # Scales are standard deviations: snd's covariance R diag(s)^2 R^T is the encoder's world covariance.
    covariances = output.covariances[0].double().reshape(-1, 3, 3)
    size = covariances.abs().amax(dim=(-1, -2), keepdim=True)
    torch.testing.assert_close(gaussians.covariances().double() / size, covariances / size, rtol=0, atol=1e-5)
    torch.testing.assert_close(gaussians.opacities, output.opacities[0].reshape(-1))


def test_context_size_must_be_a_multiple_of_16(small_encoder):
    images, camera = posed_pair(40, 48)
    with pytest.raises(DataError, match=r"40x48.*multiples of 16.*576x880"):
        reconstruct_pair(small_encoder, images, camera, near=1.0, far=100.0, names=("a.jpg", "b.jpg"))
    with pytest.raises(ValueError, match="multiples of 16"):
        small_encoder(torch.zeros(1, 2, 3, 40, 48), torch.eye(3).expand(1, 2, 3, 3), torch.eye(4).expand(1, 2, 4, 4),
                      torch.ones(1, 2), torch.full((1, 2), 100.0))


# ---------------------------------------------------------------------------------------------------------------
# Configuration and registry


def test_mvsplat_needs_a_checkpoint():
    with pytest.raises(ConfigError, match="gaussians.mvsplat.checkpoint.*re10k.ckpt"):
        load_config(None, ["gaussians.reconstructor=mvsplat"])
    with pytest.raises(ConfigError, match="does not exist"):
        build_reconstructor(GaussiansCfg(reconstructor="mvsplat", mvsplat=MVSplatSettings(Path("/nowhere/re10k.ckpt"))))


def test_depth_range_is_validated():
    assert (GaussiansCfg().mvsplat.near, GaussiansCfg().mvsplat.far) == (1.0, 100.0)
    with pytest.raises(ConfigError, match="gaussians.mvsplat.near"):
        load_config(None, ["gaussians.mvsplat.near=0"])
    with pytest.raises(ConfigError, match="gaussians.mvsplat.far"):
        load_config(None, ["gaussians.mvsplat.near=5", "gaussians.mvsplat.far=2"])


def test_registry_entry_needs_no_depth(reference_state, tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file(reference_state, path)
    reconstructor = build_reconstructor(GaussiansCfg(reconstructor="mvsplat", mvsplat=MVSplatSettings(path), device="cpu"))
    assert "mvsplat" in RECONSTRUCTORS and reconstructor.name == "mvsplat" and not reconstructor.requires_depth
    assert reconstructor.reconstruct_with_depth is not None


# ---------------------------------------------------------------------------------------------------------------
# snd train on mvsplat Gaussians


@pytest.mark.slow
@needs_fixture
def test_training_runs_on_mvsplat_gaussians(tmp_path):
    from snd_stages.artifacts.gaussians import load_gaussians, read_pair
    from snd_stages.artifacts.samples import load_samples
    from snd_stages.stages.train import train
    from tests.conftest import build_demo_artifacts

    cfg = load_config(None, [
        "demo.train_scenes=1", "demo.eval_scenes=0", "demo.frames_per_scene=8", "demo.height=48", "demo.width=64",
        "sampling.samples_per_scene=2", "sampling.frame_gap=[3,4]",
        "gaussians.reconstructor=mvsplat", f"gaussians.mvsplat.checkpoint={FIXTURE / 'weights.safetensors'}",
        "gaussians.device=cpu",
        "train.weights=random", "train.allow_random_weights=true", "train.prototypes=256", "train.batch_size=1",
        "train.log_every=1", "train.steps=2", "train.device=cpu",
        f"data.root={tmp_path / 'demo'}", f"store.root={tmp_path / 'store'}", f"train.runs_root={tmp_path / 'runs'}",
    ])
    store = build_demo_artifacts(cfg, operators=True)

    samples_artifact, _ = load_samples(store, cfg.data, cfg.sampling)
    artifact = load_gaussians(store, cfg.gaussians, samples_artifact.key)
    assert artifact.group().attrs["reconstructor"] == "mvsplat"
    pair = read_pair(artifact.unit(artifact.units()[0]))
    assert len(pair.gaussians) == 2 * 48 * 64 and torch.isfinite(pair.gaussians.means).all()

    result = train(cfg.data, cfg.sampling, cfg.gaussians, cfg.masks, cfg.train, store)
    lines = (result.run_dir / "metrics.csv").read_text().splitlines()
    losses = [float(line.split(",")[lines[0].split(",").index("loss")]) for line in lines[1:]]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
