"""Learning curves: validation while training (real recall, training untouched), TensorBoard events, the PNG,
and snd eval probing a run's checkpoints."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from snd_stages.config import EvalCfg

from snd_stages.pipeline import load_config
from snd_stages.errors import ConfigError
from snd_stages.artifacts.runs import run_backbone, with_checkpoints
from snd_stages.probes.backbone import DENSE_FEATURES, ProbeBackbone
from snd_stages.artifacts.features import probe_features
from snd_stages.probes.correspondence import correspondence_probe, held_out_pairs, pairs_frame_set
from snd_stages.scenes.layout import list_scene_ids
from snd_stages.stages.evaluate import evaluate
from snd_stages.artifacts.runs import checkpoint_path
from snd_stages.stages.train import train
from snd_stages.store import Store
from tests.conftest import build_demo_artifacts

pytestmark = pytest.mark.filterwarnings("ignore:random weights")

TINY = [
    "demo.train_scenes=1", "demo.eval_scenes=2", "demo.frames_per_scene=8", "demo.height=56", "demo.width=70",
    "sampling.samples_per_scene=2", "sampling.frame_gap=[3,4]",
    "train.weights=random", "train.allow_random_weights=true", "train.prototypes=256", "train.batch_size=1",
    "train.log_every=1", "train.validation_pairs=3", "eval.baseline_weights=random", "eval.probe_train_scenes=1",
    "eval.probes=[correspondence]", "eval.correspondence_pairs=2", "eval.correspondence_top_k=50",
]


@pytest.fixture(scope="module")
def project(module_tmp_path):
    root = module_tmp_path / "curves"
    build_demo_artifacts(config(root), operators=True)
    return root


def config(root: Path, *extra: str):
    return load_config(None, [*TINY, f"data.root={root / 'demo'}", f"store.root={root / 'store'}",
                              f"eval.report_dir={root / 'report'}", *extra])


def run(root: Path, *extra: str):
    cfg = config(root, *extra)
    return train(cfg.data, cfg.sampling, cfg.gaussians, cfg.masks, cfg.train, Store(cfg.store.root))


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def eval_recall(backbone: ProbeBackbone, cfg) -> dict[str, float]:
    """snd eval's correspondence probe of ``backbone`` on the pairs validation draws, at validation's scale."""
    root = cfg.data.root
    defaults = EvalCfg()
    pairs = held_out_pairs(root, list_scene_ids(root, "val"), cfg.train.validation_pairs, defaults.correspondence_gap,
                           defaults.seed)
    sets, _ = probe_features(backbone, pairs_frame_set(pairs, None), [DENSE_FEATURES], None, "", math.inf)
    scores, _ = correspondence_probe(sets[DENSE_FEATURES], pairs, EvalCfg(correspondence_scale=cfg.train.validation_scale))
    return {name: measurement.estimate() for name, measurement in scores.items()}


@pytest.fixture(scope="module")
def validated(project):
    return run(project, "train.steps=3", "train.validate_every=2", f"train.runs_root={project / 'runs-validated'}")


def test_validation_recall_is_the_eval_probe_of_the_pretrained_and_the_exported_model(project, validated):
    cfg = config(project)
    logged = rows(validated.run_dir / "validation.csv")
    assert [int(row["step"]) for row in logged] == [0, 2, 3]  # step 0, every 2 steps, the last one
    assert [int(row["samples_seen"]) for row in logged] == [0, 2, 3]
    torch.manual_seed(cfg.train.seed)  # the run's random base weights: the baseline snd eval builds
    baseline = ProbeBackbone(cfg.train.backbone, "random", "baseline", allow_random=True)
    final = run_backbone(validated.run_dir)
    for row, backbone in ((logged[0], baseline), (logged[-1], final)):
        expected = eval_recall(backbone, cfg)
        for name in ("recall_5px", "recall_10px", "recall_20px"):
            assert float(row[f"val_{name}"]) == pytest.approx(expected[name], rel=1e-5, abs=1e-6), (row, expected)
        assert 0 < expected["recall_20px"] <= 1
    recalls = [float(logged[0][f"val_recall_{px}px"]) for px in (5, 10, 20)]
    assert recalls == sorted(recalls)


def test_validation_leaves_the_trained_weights_bit_identical(project, validated):
    # LoRA dropout is on (0.1): anything drawing from the training's random stream would change the weights.
    plain = run(project, "train.steps=3", "train.validate_every=0", f"train.runs_root={project / 'runs-plain'}")
    assert not (plain.run_dir / "validation.csv").exists()
    for name in ("student.safetensors", "teacher.safetensors"):
        a, b = load_file(plain.run_dir / name), load_file(validated.run_dir / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert [row["loss"] for row in rows(plain.run_dir / "metrics.csv")] == \
        [row["loss"] for row in rows(validated.run_dir / "metrics.csv")]


def test_tensorboard_events_and_the_png_hold_the_logged_values(validated):
    events = EventAccumulator(str(validated.run_dir))
    events.Reload()
    assert {"train/loss", "train/kl", "train/coverage", "train/lr", "validation/recall_10px"} <= set(events.Tags()["scalars"])
    metrics = rows(validated.run_dir / "metrics.csv")
    losses = events.Scalars("train/loss")
    assert [event.step for event in losses] == [int(row["step"]) for row in metrics] == [1, 2, 3]
    np.testing.assert_allclose([event.value for event in losses], [float(row["loss"]) for row in metrics], rtol=1e-5)
    validation = rows(validated.run_dir / "validation.csv")
    recalls = events.Scalars("validation/recall_10px")
    assert [event.step for event in recalls] == [int(row["step"]) for row in validation]
    np.testing.assert_allclose([event.value for event in recalls], [float(row["val_recall_10px"]) for row in validation],
                               rtol=1e-5, atol=1e-6)
    with Image.open(validated.run_dir / "curves.png") as picture:
        assert picture.format == "PNG" and picture.width > 400 and picture.height > 200


def test_a_resumed_run_logs_each_step_once(project):
    runs = project / "runs-resumed"
    first = run(project, "train.steps=4", "train.checkpoint_every=2", "train.validate_every=2", f"train.runs_root={runs}")
    (first.run_dir / "manifest.json").unlink()
    checkpoint_path(first.run_dir, 4).unlink()
    resumed = run(project, "train.steps=4", "train.checkpoint_every=2", "train.validate_every=2", f"train.runs_root={runs}")
    assert resumed.start_step == 2
    assert [int(row["step"]) for row in rows(resumed.run_dir / "validation.csv")] == [0, 2, 4]
    assert [int(row["step"]) for row in rows(resumed.run_dir / "metrics.csv")] == [1, 2, 3, 4]
    events = EventAccumulator(str(resumed.run_dir))
    events.Reload()  # the resumed run's events replace those the first one logged after step 2
    assert [event.step for event in events.Scalars("validation/recall_10px")] == [0, 2, 4]
    assert [event.step for event in events.Scalars("train/loss")] == [1, 2, 3, 4]


def test_eval_probes_a_runs_checkpoints_and_the_last_one_is_the_exported_student(project):
    result = run(project, "train.steps=2", "train.checkpoint_every=1", "train.keep_checkpoints=0",
                 "train.validate_every=0", f"train.runs_root={project / 'runs-checkpoints'}")
    assert checkpoint_path(result.run_dir, 1).is_file()  # keep_checkpoints: 0 keeps every one
    last = run_backbone(checkpoint_path(result.run_dir, 2))
    exported = run_backbone(result.run_dir)
    assert last.label.endswith("step 2)")
    images = torch.rand(2, 3, 56, 70, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(last.features(images, DENSE_FEATURES).tokens,
                               exported.features(images, DENSE_FEATURES).tokens, rtol=1e-5, atol=1e-5)
    cfg = config(project)
    probed = with_checkpoints([result.run_dir], [1])
    assert probed == [checkpoint_path(result.run_dir, 1), result.run_dir]
    report = evaluate(cfg.data, cfg.train, cfg.eval, probed)
    labels = list(report.results["models"])
    assert len(labels) == 3 and labels[1].endswith("step 1)")
    assert all(0 <= scores["correspondence"]["recall_10px"] <= 1 for scores in report.results["models"].values())


def test_a_missing_checkpoint_names_those_kept_and_the_fix(project):
    result = run(project, "train.steps=2", "train.checkpoint_every=1", "train.keep_checkpoints=1",
                 "train.validate_every=0", f"train.runs_root={project / 'runs-pruned'}")
    with pytest.raises(ConfigError, match=r"eval.checkpoints: .* has no checkpoint of step\(s\) \[1\]; it kept steps "
                                          r"\[2\] .*train.keep_checkpoints: 0"):
        with_checkpoints([result.run_dir], [1, 2])
    with pytest.raises(ConfigError, match=r"eval.runs: .* has no checkpoint step-000001.pt; it kept steps \[2\]"):
        run_backbone(checkpoint_path(result.run_dir, 1))
