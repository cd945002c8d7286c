"""snd eval end to end on tiny generated scenes: every probe, baseline beside the trained model, report files."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from snd_stages.pipeline import load_config
from snd_stages.errors import ConfigError
from snd_stages.report.markdown import markdown_report
from snd_stages.stages.evaluate import evaluate
from snd_stages.artifacts.runs import finished_run_manifest, run_directory
from snd_stages.stages.train import train
from snd_stages.store import Store
from tests.conftest import build_demo_artifacts

TINY = [
    "demo.train_scenes=1", "demo.eval_scenes=2", "demo.frames_per_scene=6", "demo.height=56", "demo.width=70",
    "sampling.samples_per_scene=1", "sampling.frame_gap=[3,4]",
    "train.weights=random", "train.allow_random_weights=true", "train.prototypes=64", "train.steps=1",
    "train.batch_size=1", "eval.baseline_weights=random", "eval.probe_train_scenes=1", "eval.probe_steps=3",
    "eval.correspondence_pairs=2", "eval.correspondence_gap=[2,3]", "eval.correspondence_top_k=50",
]


@pytest.fixture(scope="module")
def project(module_tmp_path):
    root = module_tmp_path / "eval"
    cfg = load_config(None, [*TINY, f"data.root={root / 'demo'}", f"store.root={root / 'store'}",
                             f"train.runs_root={root / 'runs'}", f"eval.report_dir={root / 'report'}"])
    store = build_demo_artifacts(cfg, operators=True)
    with pytest.warns(UserWarning, match="random weights"):
        train(cfg.data, cfg.sampling, cfg.gaussians, cfg.masks, cfg.train, store)
    return cfg, store


@pytest.mark.filterwarnings("ignore:random weights")
def test_report_compares_the_baseline_with_the_trained_model(project):
    cfg, store = project
    run = run_directory(cfg.data, cfg.sampling, cfg.gaussians, cfg.masks, cfg.train, store)
    report = evaluate(cfg.data, cfg.train, cfg.eval, [run])
    models = report.results["models"]
    assert len(models) == 2
    for scores in models.values():
        assert set(scores) >= {"depth", "normals", "segmentation", "correspondence"}
        assert math.isfinite(scores["depth"]["rmse"]) and scores["depth"]["rmse"] > 0
        assert 0 <= scores["normals"]["within_30"] <= 100
        assert 0 <= scores["segmentation"]["miou"] <= 1
        assert 0 <= scores["correspondence"]["recall_10px"] <= 1
    on_disk = json.loads((report.report_dir / "report.json").read_text())
    assert on_disk["models"].keys() == models.keys()
    table = (report.report_dir / "report.md").read_text()
    assert table == markdown_report(on_disk) and "| depth | rmse ↓ |" in table and "Δ Splat-and-Distill" in table
    assert {p.name for p in report.figures} == {"depth.png", "normals.png", "correspondence.png", "pca.png"}
    assert all(p.stat().st_size > 0 for p in report.figures)


@pytest.mark.filterwarnings("ignore:random weights")
def test_report_keeps_per_seed_and_per_image_values_intervals_and_paired_deltas(project):
    cfg, store = project
    run = run_directory(cfg.data, cfg.sampling, cfg.gaussians, cfg.masks, cfg.train, store)
    report = evaluate(cfg.data, cfg.train, cfg.eval, [run])
    on_disk = json.loads((report.report_dir / "report.json").read_text())
    baseline, trained = on_disk["models"].values()
    test_frames = on_disk["protocol"]["test_frames"]
    for model in (baseline, trained):
        # Anyone can recompute a score from the per-image values: the mean over seeds of each seed's mean.
        values = np.array(model["per_unit"]["depth"]["rmse"]["values"], dtype=float)
        assert values.shape == (len(cfg.eval.seeds), test_frames)
        assert model["depth"]["rmse"] == pytest.approx(float(np.nanmean(values, axis=1).mean()), rel=1e-12)
        assert model["per_seed"]["depth"]["rmse"] == pytest.approx(list(np.nanmean(values, axis=1)), rel=1e-12)
        for probe in ("depth", "normals", "segmentation", "correspondence"):
            for metric, (low, high) in model["intervals"][probe].items():
                value = model[probe][metric]
                if value is None:  # e.g. a rotation bin without pairs
                    assert low is None and high is None
                    continue
                assert low <= value + 1e-12 and value <= high + 1e-12, (probe, metric)
        hits = np.array(model["per_unit"]["correspondence"]["recall_10px"]["hits"], dtype=float)
        totals = np.array(model["per_unit"]["correspondence"]["recall_10px"]["totals"], dtype=float)
        assert model["correspondence"]["recall_10px"] == pytest.approx(hits.sum() / totals.sum(), rel=1e-12)
    # The fitted probes' seeds differ: their scores are not all the same.
    assert len(set(baseline["per_seed"]["normals"]["rmse"])) == len(cfg.eval.seeds)
    delta = on_disk["deltas"][next(iter(on_disk["deltas"]))]["normals"]["rmse"]
    assert delta["delta"] == pytest.approx(trained["normals"]["rmse"] - baseline["normals"]["rmse"], rel=1e-9)
    low, high = delta["interval"]
    assert low <= delta["delta"] <= high and delta["excludes_zero"] == (low > 0 or high < 0)
    # One training sample is far too short to expect a change, and the report says so.
    assert any("too few to expect any change" in note for note in on_disk["notes"])
    assert "too few to expect any change" in (report.report_dir / "report.md").read_text()


@pytest.mark.filterwarnings("ignore:random weights")
def test_deltas_against_a_reference_run(project, tmp_path):
    cfg, store = project
    run = run_directory(cfg.data, cfg.sampling, cfg.gaussians, cfg.masks, cfg.train, store)
    against_run = load_config(None, [*TINY, f"data.root={cfg.data.root}", f"eval.report_dir={tmp_path}",
                                     f"eval.reference={run}", "eval.probes=[depth,correspondence]"])
    results = evaluate(against_run.data, against_run.train, against_run.eval, [run]).results
    baseline, trained = results["models"]
    assert results["reference"] == trained and set(results["deltas"]) == {baseline}
    delta = results["deltas"][baseline]["depth"]["rmse"]
    assert delta["delta"] == pytest.approx(results["models"][baseline]["depth"]["rmse"]
                                           - results["models"][trained]["depth"]["rmse"], rel=1e-9)
    # the same pair of models against the baseline: the same paired draws, the opposite sign
    default = load_config(None, [*TINY, f"data.root={cfg.data.root}", f"eval.report_dir={tmp_path / 'baseline'}",
                                 "eval.probes=[depth,correspondence]"])
    flipped = evaluate(default.data, default.train, default.eval, [run]).results["deltas"][trained]["depth"]["rmse"]
    assert flipped["delta"] == pytest.approx(-delta["delta"], rel=1e-9)
    assert flipped["interval"] == pytest.approx([-delta["interval"][1], -delta["interval"][0]], rel=1e-9)
    table = (tmp_path / "report.md").read_text()
    assert f"Each Δ is taken against {trained}" in table
    assert f"| {trained} | " in table and f"| {baseline} | " in table  # the summary table, one row per model


def test_a_reference_outside_the_probed_runs_is_a_config_error(project, tmp_path):
    cfg, _ = project
    bad = load_config(None, [*TINY, f"data.root={cfg.data.root}", f"eval.reference={tmp_path / 'elsewhere'}"])
    with pytest.raises(ConfigError, match="eval.reference = .*elsewhere is not one of the probed runs"):
        evaluate(bad.data, bad.train, bad.eval, [])


@pytest.mark.filterwarnings("ignore:random weights")
def test_probe3d_dense_depth_probe_on_four_blocks(project, tmp_path):
    cfg, _ = project
    dense = load_config(None, [*TINY, f"data.root={cfg.data.root}", "eval.probes=[depth_dense]",
                               f"eval.report_dir={tmp_path}"])
    report = evaluate(dense.data, dense.train, dense.eval, [])
    scores = next(iter(report.results["models"].values()))
    assert set(scores) >= {"depth_dense"} and math.isfinite(scores["depth_dense"]["abs_rel"])
    assert "| depth_dense | rmse ↓ |" in (report.report_dir / "report.md").read_text()


@pytest.mark.filterwarnings("ignore:random weights")
def test_identical_settings_give_identical_scores(project):
    cfg, _ = project
    first = evaluate(cfg.data, cfg.train, cfg.eval, []).results["models"]
    second = evaluate(cfg.data, cfg.train, cfg.eval, []).results["models"]
    assert first == second


def test_no_test_scene_left_is_a_config_error(project):
    cfg, _ = project
    bad = load_config(None, [*TINY, f"data.root={cfg.data.root}", "eval.probe_train_scenes=2"])
    with pytest.raises(ConfigError, match="leaves no test scene"):
        evaluate(bad.data, bad.train, bad.eval, [])


@pytest.mark.filterwarnings("ignore:random weights")
def test_nyuv2_labeled_mat_through_the_same_probes(project, tmp_path):
    from tests.test_nyuv2 import write_labeled_mat, write_v5_files

    cfg, _ = project
    files = write_v5_files(tmp_path)
    mat = write_labeled_mat(tmp_path / "nyu_depth_v2_labeled.mat")
    nyu = load_config(None, [*TINY, f"data.root={cfg.data.root}", "eval.dataset=nyuv2", f"eval.nyuv2_mat={mat}",
                             f"eval.nyuv2_splits={files['splits']}", f"eval.nyuv2_mapping_40={files['map40']}",
                             f"eval.nyuv2_mapping_13={files['map13']}", "eval.frame_stride=1",
                             f"eval.report_dir={tmp_path / 'report'}"])
    report = evaluate(nyu.data, nyu.train, nyu.eval, [])
    protocol = report.results["protocol"]
    assert protocol["dataset"] == "nyuv2" and "correspondence" not in protocol["probes"]
    assert (protocol["probe_train_frames"], protocol["test_frames"]) == (2, 1)  # splits.mat: train 1, 3; test 2
    scores = next(iter(report.results["models"].values()))
    assert math.isfinite(scores["depth"]["rmse"]) and len(scores["segmentation"]["per_class_iou"]) == 13


def test_nyuv2_without_its_file_says_what_to_set(project):
    cfg, _ = project
    nyu = load_config(None, [*TINY, f"data.root={cfg.data.root}", "eval.dataset=nyuv2"])
    with pytest.raises(ConfigError, match="eval.nyuv2_mat"):
        evaluate(nyu.data, nyu.train, nyu.eval, [])


@pytest.mark.filterwarnings("ignore:random weights")
def test_scannet1500_pairs_for_correspondence(project, tmp_path):
    from tests.test_correspondence_data import write_scannet1500

    cfg, _ = project
    pairs_txt = write_scannet1500(tmp_path)
    scannet = load_config(None, [*TINY, f"data.root={cfg.data.root}", "eval.probes=[correspondence]",
                                 f"eval.scannet1500_pairs={pairs_txt}", f"eval.scannet1500_root={tmp_path / 'scannet_test_1500'}",
                                 f"eval.report_dir={tmp_path / 'report'}"])
    report = evaluate(scannet.data, scannet.train, scannet.eval, [])
    assert report.results["protocol"]["correspondence"] == {**report.results["protocol"]["correspondence"],
                                                            "source": "ScanNet-1500", "pairs": 2}
    scores = next(iter(report.results["models"].values()))
    assert set(scores) >= {"correspondence"} and 0 <= scores["correspondence"]["recall_20px"] <= 1


@pytest.mark.filterwarnings("ignore:random weights")
def test_a_second_eval_reuses_the_cached_features(project, tmp_path):
    from tests.test_probe_cache import counting_backbone_passes

    cfg, store = project
    run = run_directory(cfg.data, cfg.sampling, cfg.gaussians, cfg.masks, cfg.train, store)
    features = Store(tmp_path / "store")
    first = evaluate(cfg.data, cfg.train, cfg.eval, [run], store=features)
    assert {use.status for use in first.feature_uses} == {"computed"}
    assert len(features.complete_artifacts("features")) == len(first.feature_uses) == 2 * 7  # 2 models x 7 sets
    assert len(features.complete_artifacts("ground_truth")) == 2  # train and test frames, shared by both models

    other_steps = load_config(None, [*TINY, f"data.root={cfg.data.root}", "eval.probe_steps=4",
                                     "eval.feature_memory_gb=0", f"eval.report_dir={tmp_path / 'again'}"])
    with counting_backbone_passes() as passes:
        cached = evaluate(other_steps.data, other_steps.train, other_steps.eval, [run], store=features)
    assert passes == [] and {use.status for use in cached.feature_uses} == {"reused"}
    assert len(features.complete_artifacts("ground_truth")) == 2  # the same frames' ground truth, read back
    # no store, and forced (the report folder holds this very report): extracted anew
    fresh = evaluate(other_steps.data, other_steps.train, other_steps.eval, [run], force=True)
    assert not fresh.up_to_date
    assert cached.results["models"] == fresh.results["models"]
    assert cached.results["models"] != first.results["models"]  # 4 probe steps instead of 3


@pytest.mark.filterwarnings("ignore:random weights")
def test_scannetpp_held_out_scenes_with_fitted_normals(project, tmp_path):
    from tests.scannetpp_fixture import write_fixture, write_val_split

    cfg, _ = project
    root = tmp_path / "scannetpp"
    for scene_id in ("0a5c013435", "1ada7a0617"):
        write_fixture(root, scene_id, frame_numbers=(1, 2, 3, 4, 7))  # frame 7 is marked bad
    write_val_split(root, ["0a5c013435", "1ada7a0617"])
    spp = load_config(None, [*TINY, f"data.root={cfg.data.root}", "eval.dataset=scannetpp", f"eval.scannetpp_root={root}",
                             "eval.frame_stride=1", "eval.correspondence_gap=[1,2]", f"eval.report_dir={tmp_path / 'report'}"])
    report = evaluate(spp.data, spp.train, spp.eval, [], store=Store(tmp_path / "store"))
    protocol = report.results["protocol"]
    assert protocol["dataset"] == "scannetpp" and protocol["probes"] == ["depth", "normals", "correspondence"]
    assert (protocol["probe_train_scenes"], protocol["test_scenes"]) == (["0a5c013435"], ["1ada7a0617"])
    assert (protocol["probe_train_frames"], protocol["test_frames"]) == (4, 4)  # the bad frame is left out
    scores = next(iter(report.results["models"].values()))
    assert math.isfinite(scores["depth"]["rmse"]) and math.isfinite(scores["normals"]["rmse"])
    assert 0 <= scores["correspondence"]["recall_10px"] <= 1 and "segmentation" not in scores
    skipped, fitted = report.results["notes"]
    assert skipped.startswith("segmentation skipped") and "no semantic_segmentation/ folder" in skipped
    assert fitted.startswith("normals: 8 of the 8 frames")
    assert "- segmentation skipped" in (report.report_dir / "report.md").read_text()


@pytest.mark.filterwarnings("ignore:random weights")
def test_scannetpp_segmentation_where_the_scenes_have_labels(project, tmp_path):
    from tests.scannetpp_fixture import write_fixture, write_val_split

    cfg, _ = project
    root = tmp_path / "scannetpp"
    for scene_id in ("aaa", "bbb"):
        write_fixture(root, scene_id, frame_numbers=(1, 2, 3), semantic_classes=3)
    write_val_split(root, ["aaa", "bbb"])
    spp = load_config(None, [*TINY, "eval.dataset=scannetpp", f"data.root={root}", "eval.probes=[segmentation]",
                             "eval.frame_stride=1", f"eval.report_dir={tmp_path / 'report'}"])
    report = evaluate(spp.data, spp.train, spp.eval, [])
    scores = next(iter(report.results["models"].values()))
    assert report.results["notes"] == [] and len(scores["segmentation"]["per_class_iou"]) == 3
    assert 0 <= scores["segmentation"]["miou"] <= 1


def test_runs_are_labelled_by_the_settings_that_set_them_apart(tmp_path):
    from snd_stages.stages.evaluate import distinguishing_settings

    def run(name: str, **train) -> Path:
        folder = tmp_path / name
        (folder / "checkpoints").mkdir(parents=True)
        (folder / "config.yaml").write_text(yaml.safe_dump({
            "data": {"root": f"/somewhere/{name}"}, "sampling": {"targets": train.pop("targets", "novel")},
            "train": {"blending": 0.5, "loss": "dino", "device": "auto", **train}}))
        return folder

    default, blending, cosine = run("a"), run("b", blending=1.0, device="cuda"), run("c", loss="cosine")
    context = run("d", targets="context")
    assert distinguishing_settings([default, blending, cosine, context]) == [
        [], ["train.blending=1.0"], ["train.loss=cosine"], ["sampling.targets=context"]]
    # A checkpoint speaks for its run; identical runs, and a lone run, have nothing to set them apart.
    assert distinguishing_settings([default / "checkpoints" / "step-000010.pt", default]) == [[], []]
    # A run without a readable config.yaml neither gets a label nor makes the others look different.
    assert distinguishing_settings([tmp_path / "missing", default, cosine]) == [[], [], ["train.loss=cosine"]]


@pytest.mark.filterwarnings("ignore:random weights")
def test_an_unchanged_eval_is_up_to_date_and_does_no_work(project, tmp_path, monkeypatch):
    from snd_stages.artifacts import reports
    from tests.test_probe_cache import counting_backbone_passes

    cfg, store = project
    run = run_directory(cfg.data, cfg.sampling, cfg.gaussians, cfg.masks, cfg.train, store)
    settings = load_config(None, [*TINY, f"data.root={cfg.data.root}", "eval.probes=[depth,correspondence]",
                                  f"eval.report_dir={tmp_path / 'report'}"])
    first = evaluate(settings.data, settings.train, settings.eval, [run], store=Store(tmp_path / "store"))
    assert not first.up_to_date and first.results["headline"]["depth"] == "rmse"
    written = {path.name: path.read_bytes() for path in first.report_dir.iterdir()}
    assert reports.REPORT_RECORD in written

    with counting_backbone_passes() as passes:  # no backbone pass, no probe fit, nothing read from the store
        again = evaluate(settings.data, settings.train, settings.eval, [run], store=Store(tmp_path / "elsewhere"))
    assert again.up_to_date and passes == [] and not (tmp_path / "elsewhere").exists()
    assert again.results == json.loads(written["report.json"]) and again.figures == first.figures
    assert {path.name: path.read_bytes() for path in first.report_dir.iterdir()} == written

    # anything the numbers depend on makes it out of date: a setting, the data, a damaged report file
    changed = load_config(None, [*TINY, f"data.root={cfg.data.root}", "eval.probes=[depth,correspondence]",
                                 "eval.probe_steps=4", f"eval.report_dir={tmp_path / 'report'}"])
    manifests = [finished_run_manifest(run)]
    spec = reports.report_spec(settings.data, settings.train, settings.eval, [run], manifests, 0, settings.data.root)
    assert reports.finished_report(first.report_dir, spec) is not None
    assert reports.report_spec(changed.data, changed.train, changed.eval, [run], manifests, 0,
                               changed.data.root).key != spec.key
    assert reports.report_spec(settings.data, settings.train, settings.eval, [run], manifests, 1,
                               settings.data.root).key != spec.key
    moved = dataclasses.replace(settings.eval, device="cpu", feature_memory_gb=0.5)
    assert reports.report_spec(settings.data, settings.train, moved, [run], manifests, 0,
                               settings.data.root).key == spec.key
    (first.report_dir / "report.md").write_text("edited")
    assert reports.finished_report(first.report_dir, spec) is None
    image = next(Path(settings.data.root, "scenes").glob("*/images/*.png"))
    image.touch()
    try:
        assert reports.report_spec(settings.data, settings.train, settings.eval, [run], manifests, 0,
                                   settings.data.root).key != spec.key
    finally:
        (first.report_dir / "report.md").write_bytes(written["report.md"])
    redone = evaluate(settings.data, settings.train, settings.eval, [run], store=Store(tmp_path / "store"))
    assert not redone.up_to_date and redone.results["models"] == first.results["models"]


@pytest.mark.filterwarnings("ignore:random weights")
def test_snd_eval_twice_says_up_to_date_the_second_time(project, tmp_path):
    from typer.testing import CliRunner

    from snd_stages.cli import app

    cfg, store = project
    run = run_directory(cfg.data, cfg.sampling, cfg.gaussians, cfg.masks, cfg.train, store)
    settings = [*(s for s in TINY if not s.startswith("demo.")), f"data.root={cfg.data.root}",
                f"store.root={tmp_path / 'store'}", "eval.probes=[depth]",
                f"eval.runs=[{run}]", f"eval.report_dir={tmp_path / 'report'}"]
    command = ["--profile", "cpu", "eval", *(part for setting in settings for part in ("--set", setting))]
    first = CliRunner().invoke(app, command)
    assert first.exit_code == 0, first.output
    assert "eval: up to date" not in first.output and "wrote" in first.output
    second = CliRunner().invoke(app, command)
    assert second.exit_code == 0 and "eval: up to date" in second.output and "extracted" not in second.output
    forced = CliRunner().invoke(app, [*command, "--force"])
    assert forced.exit_code == 0 and "eval: up to date" not in forced.output
    assert "0 extracted" in " ".join(forced.output.split())
