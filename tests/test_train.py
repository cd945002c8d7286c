"""snd train end to end on tiny generated scenes: loss falls on a fixed batch, resume is exact, export loads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from snd_stages.pipeline import load_config
from snd_stages.errors import ConfigError
from snd_stages.stages.train import TrainingData, train
from snd_stages.artifacts.runs import checkpoint_path, latest_checkpoint
from snd_stages.store import Store
from tests.conftest import build_demo_artifacts

TINY = [
    "demo.train_scenes=1", "demo.eval_scenes=0", "demo.frames_per_scene=8", "demo.height=56", "demo.width=70",
    "sampling.samples_per_scene=2", "sampling.frame_gap=[3,4]",
    "train.weights=random", "train.allow_random_weights=true", "train.prototypes=256", "train.batch_size=1",
    "train.log_every=1",
]


@pytest.fixture(scope="module")
def project(module_tmp_path):
    root = module_tmp_path / "train"
    cfg = load_config(None, [*TINY, f"data.root={root / 'demo'}", f"store.root={root / 'store'}"])
    build_demo_artifacts(cfg, operators=True)
    return root


def config(root: Path, *extra: str):
    return load_config(None, [*TINY, f"data.root={root / 'demo'}", f"store.root={root / 'store'}", *extra])


def run(root: Path, *extra: str, **options):
    cfg = config(root, *extra)
    return train(cfg.data, cfg.sampling, cfg.gaussians, cfg.masks, cfg.train, Store(cfg.store.root), **options)


def read_metric(run_dir: Path, name: str) -> list[float]:
    lines = (run_dir / "metrics.csv").read_text().splitlines()
    column = lines[0].split(",").index(name)
    return [float(line.split(",")[column]) for line in lines[1:]]


def test_loss_is_finite_and_falls_when_overfitting_a_fixed_batch(project):
    # Two samples, seen in turn: with a large learning rate the student must fit their teacher targets.
    result = run(project, "train.steps=8", "train.learning_rate=3e-3", "train.warmup_fraction=0.1",
                 f"train.runs_root={project / 'runs-overfit'}", "train.ema_momentum=1.0")
    losses, kl = read_metric(result.run_dir, "loss"), read_metric(result.run_dir, "kl")
    assert len(losses) == 8 and torch.isfinite(torch.tensor(losses)).all()
    # The loss is teacher entropy (fixed: EMA off) + KL(teacher || student); only the KL can fall.
    assert losses[-1] < losses[0] and kl[-1] < 0.5 * kl[0], (losses, kl)
    assert min(read_metric(result.run_dir, "coverage")) > 0.5
    assert sorted(p.name for p in (result.run_dir / "pictures").iterdir())[-1] == "step-000008.png"


def test_cuda_graphs_are_refused_off_cuda_before_anything_is_written(project):
    runs = project / "runs-graphs"
    with pytest.raises(ConfigError, match="train.cuda_graphs = true needs one process on a CUDA device, not 1 on cpu"):
        run(project, "train.compile=true", "train.cuda_graphs=true", f"train.runs_root={runs}")
    assert not runs.exists()


def test_resume_continues_exactly(project):
    straight = run(project, "train.steps=4", f"train.runs_root={project / 'runs-straight'}")
    # Same config, stopped after 2 steps (a checkpoint every 2 steps), then resumed to 4.
    runs = project / "runs-resumed"
    first = run(project, "train.steps=4", "train.checkpoint_every=2", f"train.runs_root={runs}")
    run_dir = first.run_dir
    (run_dir / "manifest.json").unlink()
    checkpoint_path(run_dir, 4).unlink()
    assert latest_checkpoint(run_dir) == checkpoint_path(run_dir, 2)
    resumed = run(project, "train.steps=4", "train.checkpoint_every=2", f"train.runs_root={runs}")
    assert resumed.start_step == 2 and not resumed.skipped
    for name in ("student.safetensors", "teacher.safetensors"):
        a, b = load_file(straight.run_dir / name), load_file(resumed.run_dir / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    # Steps 3 and 4 were logged before the interruption and again after it: each is in metrics.csv once.
    assert read_metric(resumed.run_dir, "step") == [1, 2, 3, 4]
    assert read_metric(resumed.run_dir, "loss") == read_metric(straight.run_dir, "loss")
    again = run(project, "train.steps=4", "train.checkpoint_every=2", f"train.runs_root={runs}")
    assert again.skipped


def test_exported_student_loads_in_timm(project):
    result = run(project, "train.steps=2", "train.learning_rate=1e-2", f"train.runs_root={project / 'runs-export'}")
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=True, num_classes=0, dynamic_img_size=True,
                              pretrained_cfg_overlay=dict(file=str(result.student_path)))
    exported = load_file(result.student_path)
    torch.testing.assert_close(model.state_dict()["blocks.0.attn.qkv.weight"], exported["blocks.0.attn.qkv.weight"])
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["complete"] and manifest["steps"] == 2


def test_training_order_depends_only_on_seed_and_step():
    samples = list(range(7))
    data = TrainingData.__new__(TrainingData)
    data.samples, data.seed = samples, 3
    first = [data.indices(step, 2) for step in range(7)]
    assert sorted(i for batch in first for i in batch) == sorted(samples * 2)  # each epoch visits every sample
    assert first == [data.indices(step, 2) for step in range(7)]


def test_random_weights_need_the_explicit_flag(project):
    with pytest.raises(ConfigError, match="allow_random_weights"):
        run(project, "train.allow_random_weights=false", "train.steps=1", f"train.runs_root={project / 'runs-x'}")


def test_uncovered_tokens_are_zeroed_on_both_sides(project):
    import contextlib

    from snd_stages.geometry import Camera
    from snd_stages.models.losses import distillation_loss
    from snd_stages.artifacts.gaussians import load_gaussians
    from snd_stages.artifacts.masks import load_masks
    from snd_stages.artifacts.samples import load_samples
    from snd_stages.models.checkpoints import build_model
    from snd_stages.stages.train import distillation_step, teacher_targets

    cfg = config(project, "train.teacher_splatting=render")  # the turned camera is rendered, not precomputed
    store = Store(cfg.store.root)
    samples_artifact, samples = load_samples(store, cfg.data, cfg.sampling)
    data = TrainingData(samples.samples, samples.dataset_root, load_gaussians(store, cfg.gaussians, samples_artifact.key),
                        load_masks(store, cfg.masks, samples_artifact.key), seed=0)
    sample = data.load(0)
    # Turn the target camera around: no Gaussian lies in front of it any more.
    turned = sample.target_camera.world_to_camera.clone()
    turned[:, :3] *= -1
    turned[:, 0] *= -1  # keep a proper rotation (det +1): flip z and y, keep x
    sample.target_camera = Camera(sample.target_camera.intrinsics, turned, sample.target_camera.height,
                                  sample.target_camera.width)
    torch.manual_seed(0)
    model = build_model(cfg.train)
    targets, coverage = teacher_targets(model, [sample], cfg.train, torch.device("cpu"), contextlib.nullcontext)
    assert not coverage.any() and targets.abs().max() == 0
    loss, result = distillation_step(model, [sample], cfg.train, torch.device("cpu"), contextlib.nullcontext)
    zeros = torch.zeros(coverage.numel(), model.student_head.mlp[0].in_features)
    expected = distillation_loss(model.student_head(zeros), model.teacher_head(zeros))
    torch.testing.assert_close(loss, expected)  # "head(0) vs head(0)" at every token, still averaged
    assert result.statistics.tolist()[2] == 0.0  # coverage


def training_data_of(root: Path) -> TrainingData:
    from snd_stages.artifacts.gaussians import load_gaussians
    from snd_stages.artifacts.masks import load_masks
    from snd_stages.artifacts.samples import load_samples

    cfg = config(root)
    store = Store(cfg.store.root)
    samples_artifact, samples = load_samples(store, cfg.data, cfg.sampling)
    return TrainingData(samples.samples, samples.dataset_root, load_gaussians(store, cfg.gaussians, samples_artifact.key),
                        load_masks(store, cfg.masks, samples_artifact.key), seed=0)


def test_batches_read_ahead_are_the_batches_of_their_steps(project):
    read_ahead = list(training_data_of(project).batches(range(3, 8), batch_size=3))
    one_at_a_time = training_data_of(project)
    assert len(read_ahead) == 5
    for step, batch in zip(range(3, 8), read_ahead):
        for sample, expected in zip(batch, one_at_a_time.batch(step, 3), strict=True):
            for name in ("context_images", "context_masks", "target_image", "target_mask"):
                torch.testing.assert_close(getattr(sample, name), getattr(expected, name), rtol=0, atol=0)
            torch.testing.assert_close(sample.pair.gaussians.means, expected.pair.gaussians.means, rtol=0, atol=0)
    assert list(training_data_of(project).batches(range(0), batch_size=3)) == []


def test_batches_carry_the_stored_pixels_and_upload_converts_them(project):
    from snd_stages.geometry import image_to_tensor
    from snd_stages.scenes.layout import read_scene
    from snd_stages.stages.train import upload

    data = training_data_of(project)
    batch = data.batch(0, 2)
    for sample, index in zip(batch, data.indices(0, 2), strict=True):
        description = data.samples[index]
        scene = read_scene(data.dataset_root, description.scene)
        assert sample.context_images.dtype == sample.target_image.dtype == torch.uint8
        for image, frame in zip([*sample.context_images, sample.target_image],
                                [*description.context, description.targets[0]], strict=True):
            assert np.array_equal(image.permute(1, 2, 0).numpy(), scene.load_image(frame))
    uploaded = upload([sample.context_images for sample in batch], torch.device("cpu"))
    expected = torch.stack([image_to_tensor(image.permute(1, 2, 0).numpy()) for s in batch for image in s.context_images])
    assert uploaded.dtype == torch.float32 and torch.equal(uploaded, expected)
    with pytest.raises(TypeError, match="uint8 images .* torch.float32"):
        upload([expected], torch.device("cpu"))


def test_frames_are_decoded_once_and_the_cache_stays_within_its_bytes(project, monkeypatch):
    from snd_stages.scenes.layout import Scene

    decoded = []
    real_load_image = Scene.load_image

    def counting_load_image(self, index):
        decoded.append((self.scene_id, index))
        return real_load_image(self, index)

    monkeypatch.setattr(Scene, "load_image", counting_load_image)
    cached = training_data_of(project)
    first = [cached.batch(step, 2) for step in range(4)]
    assert len(decoded) == len(set(decoded))  # no frame decoded twice
    again = [cached.batch(step, 2) for step in range(4)]
    assert len(decoded) == len(set(decoded))
    height, width = first[0][0].target_image.shape[-2:]
    one_frame = height * width * (3 + 4)  # uint8 RGB image, int32 mask
    small = training_data_of(project)
    small._frames.capacity = 2 * one_frame  # room for two frames: every sample evicts
    decoded.clear()
    for batches in (first, again, [small.batch(step, 2) for step in range(4)]):
        for step, batch in enumerate(batches):
            for sample, expected in zip(batch, training_data_of(project).batch(step, 2), strict=True):
                for name in ("context_images", "context_masks", "target_image", "target_mask"):
                    assert getattr(sample, name).dtype == getattr(expected, name).dtype
                    torch.testing.assert_close(getattr(sample, name), getattr(expected, name), rtol=0, atol=0)
    assert len(small._frames) == 2 and small._frames.size == 2 * one_frame
    # A sample's tensors are its own: changing them leaves the cached frames as decoded.
    batch = cached.batch(0, 1)
    batch[0].target_image.fill_(7.0)
    batch[0].target_mask.fill_(7)
    assert not torch.equal(cached.batch(0, 1)[0].target_image, batch[0].target_image)
    assert not torch.equal(cached.batch(0, 1)[0].target_mask, batch[0].target_mask)


def test_the_frame_cache_size_is_not_part_of_the_run(project):
    runs = f"train.runs_root={project / 'runs-frame-cache'}"
    uncached = run(project, "train.steps=2", "train.frame_cache_mb=0", runs)
    assert not uncached.skipped and math.isfinite(uncached.final_loss)
    again = run(project, "train.steps=2", "train.frame_cache_mb=64", runs)
    assert again.skipped and again.run_dir == uncached.run_dir


def test_a_batch_that_fails_to_read_ahead_raises_when_it_is_due(project, monkeypatch):
    data = training_data_of(project)
    real_batch = TrainingData.batch

    def fails_at_step_2(self, step, *args):
        if step == 2:
            raise OSError("unreadable image of step 2")
        return real_batch(self, step, *args)

    monkeypatch.setattr(TrainingData, "batch", fails_at_step_2)
    batches = data.batches(range(0, 4), batch_size=1)
    assert len(next(batches)) == 1 and len(next(batches)) == 1  # step 2 is being read meanwhile, and fails
    with pytest.raises(OSError, match="step 2"):
        next(batches)


def test_a_non_finite_loss_changes_nothing_that_lasts(project):
    import copy
    import math

    from snd_stages.models.checkpoints import build_model
    from snd_stages.stages.train import learn, make_optimizer

    cfg = config(project)
    torch.manual_seed(0)
    model = build_model(cfg.train)
    optimizer, scheduler = make_optimizer(model, cfg.train, 10)
    before = copy.deepcopy(model.state_dict())
    head_weight = model.student_head.mlp[0].weight

    def loss_of(scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        loss = head_weight.square().mean() * scale
        return loss, torch.stack([loss.detach().double(), torch.tensor(0.0, dtype=torch.float64),
                                  torch.tensor(1.0, dtype=torch.float64)])

    value, _, _ = learn(*loss_of(math.nan), model, optimizer, scheduler, ema_momentum=0.5)
    assert math.isnan(value)
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)  # weights and teacher (EMA) untouched
    assert not optimizer.state and scheduler.last_epoch == 0
    value, _, coverage = learn(*loss_of(1.0), model, optimizer, scheduler, ema_momentum=0.5)
    assert math.isfinite(value) and coverage == 1.0
    assert not torch.equal(before["student_head.mlp.0.weight"], model.state_dict()["student_head.mlp.0.weight"])
    learn(*loss_of(1.0), model, optimizer, scheduler, ema_momentum=0.5)  # EMA comes before the optimiser step
    assert not torch.equal(before["teacher_head.mlp.0.weight"], model.state_dict()["teacher_head.mlp.0.weight"])
    assert scheduler.last_epoch == 2
