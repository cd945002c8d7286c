"""The precomputed teacher operator agrees with the plain upsample-lift-render-blend-downsample path."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from snd_stages.pipeline import load_config
from snd_stages.errors import ArtifactError
from snd_stages.geometry import Camera
from snd_stages.models.backbones import backbone_spec
from snd_stages.splat.operator import OperatorInputs, SplatOperator, build_splat_operator, build_splat_operators, splat_tokens
from snd_stages.splat.quirks import render_inputs
from snd_stages.splat.render import gsplat_cuda_available, render_features, render_weights
from snd_stages.artifacts.gaussians import load_gaussians
from snd_stages.artifacts.masks import load_masks
from snd_stages.artifacts.operators import load_operators
from snd_stages.stages.precompute_operators import precompute_operators
from snd_stages.artifacts.samples import load_samples
from snd_stages.models.checkpoints import build_model
from snd_stages.stages.train import TrainingData, teacher_targets, train
from snd_stages.store import Store
from tests.conftest import build_demo_artifacts

# Float32 rendering on both paths; the operator sums the same products in another order.
RELATIVE_TOLERANCE = 1e-5
VITS14 = backbone_spec("dinov2_vits14")

TINY = [
    "demo.train_scenes=1", "demo.eval_scenes=0", "demo.frames_per_scene=8", "demo.height=84", "demo.width=112",
    "sampling.samples_per_scene=2", "sampling.frame_gap=[3,4]",
    "train.weights=random", "train.allow_random_weights=true", "train.prototypes=256", "train.batch_size=2",
]


@pytest.fixture(scope="module")
def project(module_tmp_path):
    root = module_tmp_path / "operator"
    cfg = config(root)
    build_demo_artifacts(cfg, operators=False)
    return root


def config(root, *extra):
    return load_config(None, [*TINY, f"data.root={root / 'demo'}", f"store.root={root / 'store'}", *extra])


def training_data(cfg, store, operators=None):
    samples_artifact, samples = load_samples(store, cfg.data, cfg.sampling)
    return TrainingData(samples.samples, samples.dataset_root, load_gaussians(store, cfg.gaussians, samples_artifact.key),
                        load_masks(store, cfg.masks, samples_artifact.key), seed=0, operators=operators)


def relative_error(value, reference) -> float:
    return float((value.double() - reference.double()).abs().max() / reference.double().abs().max())


@pytest.mark.parametrize("quirks", [False, True])
@pytest.mark.parametrize("mask_aware", [True, False])
@pytest.mark.parametrize("blending", [0.5, 1.0, 0.0])
def test_operator_equals_the_plain_path(project, quirks, mask_aware, blending):
    cfg = config(project)
    sample = training_data(cfg, Store(cfg.store.root)).load(0)
    gaussians, camera = render_inputs(sample.pair.gaussians, sample.target_camera, quirks)
    grid = backbone_spec(cfg.train.backbone).token_grid(camera.height, camera.width)
    tokens = torch.randn(2, 24, *grid, generator=torch.Generator().manual_seed(0))
    operator = build_splat_operator(gaussians, camera, sample.context_masks, sample.target_mask, grid, grid, mask_aware)
    expected, coverage = splat_tokens(tokens, gaussians, camera, sample.context_masks, sample.target_mask, grid,
                                      blending, mask_aware)
    assert relative_error(operator.apply(tokens, blending), expected) < RELATIVE_TOLERANCE
    assert torch.equal(operator.coverage, coverage) and coverage.any()


def test_render_weights_reproduce_the_render():
    generator = torch.Generator().manual_seed(3)
    from snd_stages.gaussians import Gaussians

    count = 400
    means = torch.randn(count, 3, generator=generator) * torch.tensor([0.6, 0.4, 0.3]) + torch.tensor([0, 0, 3.0])
    quats = torch.nn.functional.normalize(torch.randn(count, 4, generator=generator), dim=-1)
    gaussians = Gaussians(means, quats, torch.rand(count, 3, generator=generator) * 0.08 + 0.01,
                          torch.rand(count, generator=generator) * 0.9 + 0.05,
                          torch.zeros(count, dtype=torch.long), torch.arange(count))
    camera = Camera(torch.tensor([[[60.0, 0, 31], [0, 60.0, 22], [0, 0, 1]]]), torch.eye(4)[None], 40, 56)
    features = torch.randn(count, 5, generator=generator)
    rendered = render_features(gaussians, features, camera)
    weights = render_weights(gaussians, camera)
    composed = torch.zeros(40 * 56, 5, dtype=torch.float64).index_add_(
        0, weights.pixel, weights.weight[:, None] * features[weights.gaussian].double())
    assert relative_error(composed.reshape(40, 56, 5), rendered.features[0]) < RELATIVE_TOLERANCE
    torch.testing.assert_close(weights.alpha().float(), rendered.alpha[0], atol=1e-6, rtol=0)
    assert (weights.weight > 0).all()


def test_stored_operators_drive_training_like_rendering(project):
    cfg = config(project)
    store = Store(cfg.store.root)
    with pytest.raises(ArtifactError, match="precompute-operators.*teacher_splatting"):
        train(cfg.data, cfg.sampling, cfg.gaussians, cfg.masks, cfg.train, store)
    result = precompute_operators(cfg.data, cfg.sampling, cfg.gaussians, cfg.masks, cfg.train, store)
    counts = result.artifact.manifest["counts"]
    samples_artifact, samples = load_samples(store, cfg.data, cfg.sampling)
    distinct = {(s.scene, s.context, target) for s in samples.samples for target in s.targets}
    assert counts["samples"] == len(distinct) == len(result.artifact.units())
    assert 0 < counts["bytes_per_sample"] < 200_000
    operators = load_operators(store, cfg.train, samples_artifact.key, load_gaussians(store, cfg.gaussians, samples_artifact.key).key,
                               load_masks(store, cfg.masks, samples_artifact.key).key)
    batch = training_data(cfg, store, operators).batch(0, 2)
    assert all(isinstance(sample.operator, SplatOperator) and sample.pair is None for sample in batch)
    torch.manual_seed(0)
    model = build_model(cfg.train)
    device = torch.device("cpu")
    fast, fast_coverage = teacher_targets(model, batch, cfg.train, device, contextlib.nullcontext)
    plain, plain_coverage = teacher_targets(model, training_data(cfg, store).batch(0, 2),
                                            config(project, "train.teacher_splatting=render").train,
                                            device, contextlib.nullcontext)
    assert relative_error(fast, plain) < RELATIVE_TOLERANCE and torch.equal(fast_coverage, plain_coverage)
    run = train(cfg.data, cfg.sampling, cfg.gaussians, cfg.masks, config(project, "train.steps=1").train, store)
    assert np.isfinite(run.final_loss)


def synthetic_sample(generator: torch.Generator, count: int = 3000, height: int = 70, width: int = 98):
    """Two context views' worth of Gaussians in front of a target camera, with blocky segment masks."""
    from snd_stages.gaussians import Gaussians

    means = torch.randn(count, 3, generator=generator) * torch.tensor([0.8, 0.6, 0.3]) + torch.tensor([0, 0, 3.0])
    gaussians = Gaussians(means, torch.nn.functional.normalize(torch.randn(count, 4, generator=generator), dim=-1),
                          torch.rand(count, 3, generator=generator) * 0.05 + 0.01,
                          torch.rand(count, generator=generator) * 0.9 + 0.05,
                          torch.randint(0, 2, (count,), generator=generator),
                          torch.randint(0, height * width, (count,), generator=generator))
    camera = Camera(torch.tensor([[[80.0, 0, 47], [0, 80.0, 36], [0, 0, 1]]]), torch.eye(4)[None], height, width)
    blocks = torch.randint(0, 5, (3, height // 7 + 1, width // 7 + 1), generator=generator)
    masks = blocks.repeat_interleave(7, 1).repeat_interleave(7, 2)[:, :height, :width]
    return gaussians, camera, masks[:2], masks[2]


@pytest.mark.gpu
@pytest.mark.skipif(not gsplat_cuda_available(), reason="needs a CUDA device and gsplat's CUDA extension")
@pytest.mark.parametrize("blending", [0.5, 1.0])
def test_gsplat_operator_equals_the_gsplat_path(blending):
    device = torch.device("cuda")
    gaussians, camera, masks, target_mask = synthetic_sample(torch.Generator().manual_seed(1))
    gaussians, camera, masks, target_mask = gaussians.to(device), camera.to(device), masks.to(device), target_mask.to(device)
    grid = VITS14.token_grid(camera.height, camera.width)
    tokens = torch.randn(2, 64, *grid, generator=torch.Generator().manual_seed(1)).to(device)
    operator = build_splat_operator(gaussians, camera, masks, target_mask, grid, grid, backend="gsplat")
    expected, coverage = splat_tokens(tokens, gaussians, camera, masks, target_mask, grid, blending, backend="gsplat")
    assert relative_error(operator.apply(tokens, blending), expected) < RELATIVE_TOLERANCE
    assert torch.equal(operator.coverage, coverage) and coverage.any()
    # The twin's operator against gsplat's render: the two rasterisers agree to float32 rounding.
    twin = build_splat_operator(gaussians, camera, masks, target_mask, grid, grid, backend="torch")
    assert relative_error(twin.apply(tokens, blending), expected) < 1e-4


def assert_same_operators(together: list[SplatOperator], alone: list[SplatOperator]) -> None:
    """Every stored array of each operator equal, bit for bit (what snd precompute-operators writes)."""
    assert len(together) == len(alone)
    for composed, reference in zip(together, alone):
        composed_arrays, reference_arrays = composed.to_arrays(), reference.to_arrays()
        assert sorted(composed_arrays) == sorted(reference_arrays)
        for name, values in reference_arrays.items():
            assert composed_arrays[name].dtype == values.dtype and np.array_equal(composed_arrays[name], values), name


def synthetic_batch(device: torch.device, seeds=(1, 2, 3, 4)) -> list[OperatorInputs]:
    inputs = []
    for seed in seeds:
        gaussians, camera, masks, target_mask = synthetic_sample(torch.Generator().manual_seed(seed))
        inputs.append(OperatorInputs(gaussians.to(device), camera.to(device), masks.to(device), target_mask.to(device)))
    return inputs


@pytest.mark.parametrize("mask_aware", [True, False])
def test_operators_composed_together_are_each_composed_alone(mask_aware):
    """Composing several samples at once (block-diagonal factors) changes no bit of any sample's operator."""
    samples = synthetic_batch(torch.device("cpu"))
    grid = VITS14.token_grid(samples[0].target_camera.height, samples[0].target_camera.width)
    alone = [build_splat_operator(s.gaussians, s.target_camera, s.context_masks, s.target_mask, grid, grid, mask_aware)
             for s in samples]
    together = build_splat_operators(samples, grid, grid, mask_aware)
    assert_same_operators(together, alone)
    assert len({operator.nonzeros() for operator in alone}) > 1  # the samples differ, so a mix-up would show


def test_the_composition_stores_what_it_stored_before_batching():
    """The sha256 of the operators of fixed synthetic samples, against the value the one-sample composition gave
    before samples were composed together (2026-12-05): a change here changes stored operators."""
    import hashlib

    digest = hashlib.sha256()
    for seed in (1, 2, 3):
        for mask_aware in (True, False):
            gaussians, camera, masks, target_mask = synthetic_sample(torch.Generator().manual_seed(seed))
            grid = VITS14.token_grid(camera.height, camera.width)
            operator = build_splat_operator(gaussians, camera, masks, target_mask, grid, grid, mask_aware)
            for name, values in sorted(operator.to_arrays().items()):
                digest.update(name.encode())
                digest.update(values.tobytes())
    assert digest.hexdigest()[:20] == "3321b4f1e8b285482697"


def test_operators_of_different_render_sizes_are_refused_together():
    samples = synthetic_batch(torch.device("cpu"), seeds=(1,))
    gaussians, camera, masks, target_mask = synthetic_sample(torch.Generator().manual_seed(2), height=56, width=84)
    samples.append(OperatorInputs(gaussians, camera, masks, target_mask))
    with pytest.raises(ValueError, match="must hold the 2 context views of one size"):
        build_splat_operators(samples, (5, 7), (5, 7))


@pytest.mark.gpu
@pytest.mark.skipif(not gsplat_cuda_available(), reason="needs a CUDA device and gsplat's CUDA extension")
def test_gsplat_operators_composed_together_are_each_composed_alone():
    samples = synthetic_batch(torch.device("cuda"))
    grid = VITS14.token_grid(samples[0].target_camera.height, samples[0].target_camera.width)
    alone = [build_splat_operator(s.gaussians, s.target_camera, s.context_masks, s.target_mask, grid, grid)
             for s in samples]
    assert_same_operators(build_splat_operators(samples, grid, grid, output_device="cpu"), alone)


def test_a_damaged_stored_operator_is_an_error_not_an_out_of_bounds_read():
    gaussians, camera, masks, target_mask = synthetic_sample(torch.Generator().manual_seed(3))
    grid = VITS14.token_grid(camera.height, camera.width)
    operator = build_splat_operator(gaussians, camera, masks, target_mask, grid, grid)
    arrays = operator.to_arrays()
    restored = SplatOperator.from_arrays(arrays)
    for name in ("local", "segment_means", "segment_spread"):
        assert torch.equal(getattr(restored, name).to_dense(), getattr(operator, name).to_dense()), name
    assert torch.equal(restored.coverage, operator.coverage) and restored.context_grid == operator.context_grid
    assert sorted(arrays) == ["columns", "coverage", "layout", "row_pointers", "values"]
    damaged = dict(arrays, columns=arrays["columns"].copy())
    local_nonzeros = int(arrays["layout"][2])
    damaged["columns"][local_nonzeros - 1] = int(arrays["layout"][1])  # the local matrix: one past its last column
    with pytest.raises(ArtifactError, match="operator matrix 'local' is damaged.*col_indices.*precompute-operators --force"):
        SplatOperator.from_arrays(damaged)
    short = dict(arrays, values=arrays["values"][:-1])  # a value lost: the last matrix asks for more than is stored
    with pytest.raises(ArtifactError, match="operator matrix 'segment_spread' is damaged.*beyond the stored arrays"):
        SplatOperator.from_arrays(short)
