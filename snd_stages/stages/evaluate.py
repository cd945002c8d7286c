"""``snd eval``: probe the baseline and every fine-tuned model side by side, with identical settings and seeds.

Usage::

    snd eval --config pipeline.yaml                       # baseline vs the run of this config's train section
    snd eval --set eval.runs=[data/runs/<key>] --set eval.probes=[depth,correspondence]
    snd eval --set eval.dataset=scannetpp --set eval.scannetpp_root=/data/scannetpp --set eval.max_depth=20

Data (``eval.dataset``):

- ``demo``: the held-out scenes of ``data.root`` (its val split, never sampled for training); the first
  ``eval.probe_train_scenes`` of them train the probes, the others test them (every ``frame_stride``-th frame).
- ``scannetpp``: the same reader and the same protocol on ScanNet++ as FiT3D prepares it, under
  ``eval.scannetpp_root`` (default ``data.root``): the scenes of FiT3D's held-out list ``metadata/nvs_sem_val.txt``,
  the first ``probe_train_scenes`` of them train the probes, the others test them; frames marked ``is_bad`` are
  left out. Depth comes from each scene's ``depth/`` folder; normals from its ``normals/`` folder or, where there is
  none (real ScanNet++ has none), are fitted to the depth (:mod:`snd_stages.scenes.normals`). Segmentation needs
  ``semantic_segmentation/`` in every probe scene and ``metadata/semantic_classes.txt``; without them (real
  ScanNet++ DSLR data has no 2D semantic labels: FiT3D renders its own from the annotated meshes) the probe is
  skipped and the report says so. FiT3D's own ScanNet++ protocol trains the probes on the 230 training scenes
  instead; training scenes are what the fine-tuning saw, so held-out scenes are used here for both.
- ``nyuv2``: the labeled ``.mat``'s official train/test splits (no correspondence: single views).

Probes, on frozen features (``reference/method.md`` §2, with a scaled-down iteration budget):

- depth: FiT3D's linear bin probe (256 bins, SigLoss + 0.5 gradient loss, last block without final norm + CLS);
- depth_dense (opt-in): Probe3D's multi-block dense probe on four blocks, same loss and metrics;
- normals: linear probe with the uncertainty-aware angular loss (last block, no final norm);
- segmentation: linear probe on the final-normed last block, mIoU over the dataset's semantic classes;
- correspondence: Probe3D's cosine nearest neighbour + ratio test, top-k, recall at 5/10/20 px at
  ``correspondence_scale`` of the image size, and recall@10 binned by relative rotation.

The dense probes live in :mod:`snd_stages.probes.dense`, their fitting in :mod:`snd_stages.probes.fitting`; this
stage loads the frames, runs the probes of every model and writes the report.

Features come from the artifact store (:mod:`snd_stages.artifacts.features`): the backbone runs once per model, frame
set and feature spec, and a later eval with other probe settings reuses its output. So does the probes' ground
truth (:mod:`snd_stages.artifacts.ground_truth`): depth is decoded and normals are fitted once per frame set.

Writes ``<report_dir>/report.json``, ``report.md`` (a summary table of one metric per probe, then every metric of
every model with deltas against the baseline or ``eval.reference``, then notes)
and PNG figures (depth and normal predictions vs truth, correspondences coloured by error, PCA feature maps).
"""

from __future__ import annotations

import collections
import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from rich.progress import Progress

from ..artifacts.features import CacheUse, probe_features
from ..artifacts.reports import finished_report, forget_report, report_spec, write_report
from ..artifacts.ground_truth import FrameTruth, GroundTruthRequest, load_ground_truth
from ..artifacts.runs import finished_run_manifest, run_backbone, run_of
from ..config import TRAIN_OBSERVATION_ONLY, DataCfg, EvalCfg, TrainCfg, dump_sections, require_choice
from ..errors import ConfigError, DataError
from ..models.backbones import backbone_spec
from ..probes.backbone import SEGMENTATION_FEATURES, ProbeBackbone
from ..probes.correspondence import held_out_pairs, pairs_frame_set
from ..probes.frames import ProbeFrames
from ..probes.figures import pca_figure
from ..probes.registry import PROBES, ProbeInputs
from ..progress import track
from ..report.markdown import markdown_report
from ..report.summary import samples_seen, short_run_notes, summarise
from ..runtime import resolve_device
from ..scenes.correspondence import CorrespondencePair, read_scannet1500, scannet1500_identity
from ..scenes.layout import IGNORE_LABEL, Scene, list_scene_ids, read_scene
from ..scenes.normals import normals_from_depth_plane_fit
from ..scenes.nyuv2 import NYU_HEIGHT, NYU_WIDTH, NYUv2Labeled, eigen_crop_mask
from ..store import Store, file_stamp, small_file_identity
from ..throughput import phase

# Which tokens each frame probe reads (correspondence reads its features of the pairs' views).
PROBE_FEATURES = {name: probe.features for name, probe in PROBES.items() if not probe.reads_pairs}


def load_nyuv2_frames(cfg: EvalCfg, split: str, probes: list[str], device, progress: Progress | None = None,
                      store: Store | None = None, config_yaml: str = "") -> ProbeFrames:
    """Every ``frame_stride``-th frame of NYUv2's official ``split``; normals fitted to depth (no GT normals).

    With a ``store`` the ground truth is cached there (:mod:`snd_stages.artifacts.ground_truth`).
    """
    if cfg.nyuv2_mat is None:
        raise ConfigError("eval.dataset = 'nyuv2' needs eval.nyuv2_mat: the path of nyu_depth_v2_labeled.mat")
    data = NYUv2Labeled(cfg.nyuv2_mat, cfg.nyuv2_splits, {40: cfg.nyuv2_mapping_40, 13: cfg.nyuv2_mapping_13})
    camera = data.camera()
    indices = [int(index) for index in data.split(split)[:: cfg.frame_stride]]
    with_normals, with_semantics = "normals" in probes, "segmentation" in probes

    def compute(i: int) -> FrameTruth:
        frame_depth = data.depth(indices[i])
        normals = semantics = None
        if with_normals:
            fitted = normals_from_depth_plane_fit(frame_depth, camera, device=device)
            normals = torch.from_numpy(fitted).permute(2, 0, 1).to(torch.float16)
        if with_semantics:
            semantics = torch.from_numpy(data.labels(indices[i], cfg.nyuv2_classes).astype(np.uint8))
        return FrameTruth(torch.from_numpy(frame_depth), normals, semantics, fitted=with_normals)

    # Depth is scored inside the Eigen crop, which only exists for the dataset's own 480x640 frames.
    region = None
    if (data.height, data.width) == (NYU_HEIGHT, NYU_WIDTH):
        region = eigen_crop_mask(data.height, data.width)
    mat = Path(cfg.nyuv2_mat)
    identity = {"nyuv2_mat": mat.name, "stamp": file_stamp(mat)}
    # The .mat (2.8 GB) is known by name, size and time; the small splits and class mapping files by content.
    source = {**identity, "splits": small_file_identity(cfg.nyuv2_splits),
              "camera": camera.intrinsics.tolist() if with_normals else None,
              "mappings": {"classes": cfg.nyuv2_classes, "40": small_file_identity(cfg.nyuv2_mapping_40),
                           "13": small_file_identity(cfg.nyuv2_mapping_13)} if with_semantics else None}
    names = [f"nyuv2/{index}" for index in indices]
    request = GroundTruthRequest(f"nyuv2 {split}", tuple(names), (data.height, data.width), cfg.frame_stride, source,
                                 normals=with_normals, classes=cfg.nyuv2_classes if with_semantics else None,
                                 fits_normals=with_normals)
    with phase("ground truth"):
        truth = load_ground_truth(request, compute, store, config_yaml, region, progress, torch.device(device).type)
    return ProbeFrames(names, lambda i: data.image(indices[i]), (data.height, data.width), identity, truth.depth,
                       truth.normals, truth.semantics, truth.region, fitted_normals=truth.fitted_normals)


def load_frames(root: Path, scene_ids: list[str], stride: int, probes: list[str], classes: int, device,
                progress: Progress | None = None, role: str = "frames", store: Store | None = None,
                config_yaml: str = "") -> ProbeFrames:
    """Every ``stride``-th good frame (not marked ``is_bad``) of each scene, with the ground truth ``probes`` need.

    Normals come from the scene's ``normals/`` folder, else they are fitted to its depth. Semantic classes outside
    ``[0, classes)`` become 255 (ignored). With a ``store`` the ground truth is cached there
    (:mod:`snd_stages.artifacts.ground_truth`).
    """
    with_normals, with_semantics = "normals" in probes, "segmentation" in probes
    entries, image_files, source = [], [], []
    size = None
    for scene_id in scene_ids:
        scene = read_scene(root, scene_id)
        if not scene.has("depth"):
            raise DataError(f"scene {scene.directory} has no depth/ folder, which the probes need as ground truth "
                            "(uint16 millimetre PNGs named <image>.png)")
        if size is not None and size != (scene.camera.height, scene.camera.width):
            raise DataError(f"scene {scene.directory} has {scene.camera.height}x{scene.camera.width} images, the "
                            f"scene before it {size[0]}x{size[1]}; the probes need one image size")
        size = (scene.camera.height, scene.camera.width)
        good = [position for position in range(len(scene)) if not scene.frames[position].is_bad]
        for position in good[::stride]:
            entries.append((scene, position))
            name = f"{scene_id}/{scene.frames[position].name}"
            image_files.append([name, file_stamp(scene.path("images", position))])
            source.append(_ground_truth_files(scene, position, name, with_normals, with_semantics))
    if not entries:
        raise DataError(f"the scenes {scene_ids} of {root} have no good frames")

    def compute(i: int) -> FrameTruth:
        scene, position = entries[i]
        frame_depth = scene.load_depth(position)
        normals = semantics = None
        fitted = False
        if with_normals:
            if scene.has("normals"):
                frame_normals = scene.load_normals(position)
            else:
                frame_normals = normals_from_depth_plane_fit(frame_depth, scene.camera[position], device=device)
                fitted = True
            normals = torch.from_numpy(frame_normals).permute(2, 0, 1).to(torch.float16)
        if with_semantics:
            labels = scene.load_semantics(position)
            labels = np.where((labels >= 0) & (labels < classes), labels, IGNORE_LABEL)
            semantics = torch.from_numpy(labels.astype(np.uint8))
        return FrameTruth(torch.from_numpy(frame_depth), normals, semantics, fitted)

    names = [name for name, _ in image_files]
    request = GroundTruthRequest(role, tuple(names), size, stride, source, normals=with_normals,
                                 classes=classes if with_semantics else None,
                                 fits_normals=with_normals and not all(scene.has("normals") for scene, _ in entries))
    with phase("ground truth"):
        truth = load_ground_truth(request, compute, store, config_yaml, progress=progress,
                                  compute_device=torch.device(device).type)
    loaders = [functools.partial(scene.load_image, position) for scene, position in entries]
    return ProbeFrames(names, lambda i: loaders[i](), size, image_files, truth.depth, truth.normals, truth.semantics,
                       fitted_normals=truth.fitted_normals)


def _ground_truth_files(scene: Scene, position: int, name: str, normals: bool, semantics: bool) -> list:
    """What one frame's ground truth is computed from: the name, size and modification time of each of its files
    (None: missing, which computing it reports), and the intrinsics its normals are fitted with where the scene
    has no normals."""
    record = [name, ["depth", file_stamp(scene.path("depth", position))]]
    if normals:
        if scene.has("normals"):
            record.append(["normals", file_stamp(scene.path("normals", position))])
        else:
            record.append(["fitted normals", scene.camera[position].intrinsics.tolist()])
    if semantics:
        record.append(["semantics", file_stamp(scene.path("semantic_segmentation", position))])
    return record


def class_count(root: Path) -> int:
    classes_file = Path(root) / "metadata" / "semantic_classes.txt"
    if not classes_file.is_file():
        raise DataError(f"{classes_file} is missing: the segmentation probe needs the list of semantic classes")
    count = len([line for line in classes_file.read_text().splitlines() if line.strip()])
    if not 1 <= count < IGNORE_LABEL:
        raise DataError(f"{classes_file} lists {count} classes; the segmentation probe takes 1 to {IGNORE_LABEL - 1} "
                        f"(label {IGNORE_LABEL} means ignore): list only the classes to score, e.g. a benchmark's top 100")
    return count


def missing_semantics(root: Path, scene_ids: list[str]) -> str | None:
    """Why the scenes cannot train and test a segmentation probe, or None when they can."""
    lacking = [scene_id for scene_id in scene_ids
               if not (Path(root) / "scenes" / scene_id / "semantic_segmentation").is_dir()]
    if lacking:
        return (f"{len(lacking)} of the {len(scene_ids)} probe scenes have no semantic_segmentation/ folder "
                f"(first: {lacking[0]})")
    if not (Path(root) / "metadata" / "semantic_classes.txt").is_file():
        return f"{Path(root) / 'metadata' / 'semantic_classes.txt'} is missing"
    return None


def _scene_images_identity(root: Path, scene_ids: list[str]) -> list:
    files = []
    for scene_id in scene_ids:
        scene = read_scene(root, scene_id)
        files += [[f"{scene_id}/{frame.name}", file_stamp(scene.path("images", position))]
                  for position, frame in enumerate(scene.frames)]
    return files


# ---------------------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalReport:
    """What ``snd eval`` wrote, and how each model's features were obtained (``feature_uses``); ``up_to_date`` when
    the report folder already held this report and nothing was done."""

    report_dir: Path
    results: dict
    figures: list[Path]
    feature_uses: list[CacheUse] = field(default_factory=list)
    up_to_date: bool = False


def scenes_root(data: DataCfg, cfg: EvalCfg) -> Path:
    """Where the held-out scenes are read: ``eval.scannetpp_root`` for ScanNet++ when set, else ``data.root``."""
    if cfg.dataset == "scannetpp" and cfg.scannetpp_root is not None:
        return Path(cfg.scannetpp_root)
    return Path(data.root)


def evaluate(data: DataCfg, train: TrainCfg, cfg: EvalCfg, runs: list[Path], progress: Progress | None = None,
             store: Store | None = None, force: bool = False) -> EvalReport:
    """Probe the baseline (``train.backbone`` with ``eval.baseline_weights``) and each run; write the report.

    With a ``store``, features and ground truth are cached there (:mod:`snd_stages.artifacts.features`,
    :mod:`snd_stages.artifacts.ground_truth`); without one they are computed and kept in memory, as the same values
    (features as float16), so the scores are the same either way.

    A report folder that already holds the report of the same models, data and settings
    (:mod:`snd_stages.artifacts.reports`) is returned as it is, ``up_to_date``; ``force`` writes it again.
    """
    for name in cfg.probes:  # what pipeline.yaml checks, for callers that build EvalCfg themselves
        require_choice("eval.probes", name, PROBES)
    device = resolve_device(cfg.device, "eval.device")
    reference_position = reference_index(cfg.reference, runs)
    # a damaged or unfinished run stops the eval before any work (a checkpoint is checked when it is read)
    manifests = [None if Path(run).suffix == ".pt" else finished_run_manifest(Path(run)) for run in runs]
    spec = report_spec(data, train, cfg, runs, manifests, reference_position, scenes_root(data, cfg))
    found = None if force else finished_report(cfg.report_dir, spec)
    if found is not None:
        results, figures = found
        return EvalReport(Path(cfg.report_dir), results, figures, up_to_date=True)
    pairs: list[CorrespondencePair] = []
    pairs_identity = None
    notes: list[str] = []
    probes = list(cfg.probes)
    config_yaml = dump_sections(data=data, train=train, eval=cfg)
    if cfg.dataset == "nyuv2":
        train_ids, test_ids = ["nyuv2 train split"], ["nyuv2 test split"]
        probes = [probe for probe in probes if probe != "correspondence"]  # single views: no pairs
        train_frames = load_nyuv2_frames(cfg, "train", probes, device, progress, store, config_yaml)
        test_frames = load_nyuv2_frames(cfg, "test", probes, device, progress, store, config_yaml)
        classes = cfg.nyuv2_classes
    else:
        root = scenes_root(data, cfg)
        scene_ids = list_scene_ids(root, "val")
        if len(scene_ids) <= cfg.probe_train_scenes:
            raise ConfigError(
                f"eval.probe_train_scenes = {cfg.probe_train_scenes} leaves no test scene among the {len(scene_ids)} "
                f"held-out scenes of {root} (metadata/nvs_sem_val.txt); lower it or add held-out scenes"
                + (" (demo.eval_scenes)" if cfg.dataset == "demo" else "")
            )
        train_ids, test_ids = scene_ids[: cfg.probe_train_scenes], scene_ids[cfg.probe_train_scenes :]
        classes = 0
        if "segmentation" in probes:
            reason = missing_semantics(root, train_ids + test_ids)
            if reason is None:
                classes = class_count(root)
            else:
                probes.remove("segmentation")
                why = (" Real ScanNet++ DSLR scenes carry no 2D semantic labels; FiT3D renders them from the annotated "
                       "meshes." if cfg.dataset == "scannetpp" else "")
                notes.append(f"segmentation skipped: {reason}.{why}")
        train_frames = load_frames(root, train_ids, cfg.frame_stride, probes, classes, device, progress, "train",
                                   store, config_yaml)
        test_frames = load_frames(root, test_ids, cfg.frame_stride, probes, classes, device, progress, "test",
                                  store, config_yaml)
        if "correspondence" in probes:
            pairs = held_out_pairs(root, test_ids, cfg.correspondence_pairs, cfg.correspondence_gap, cfg.seed)
            pairs_identity = {"scenes": _scene_images_identity(root, test_ids)}

    if "correspondence" in cfg.probes and (cfg.scannet1500_pairs is not None or cfg.scannet1500_root is not None):
        if cfg.scannet1500_pairs is None or cfg.scannet1500_root is None:
            raise ConfigError("ScanNet-1500 needs both eval.scannet1500_pairs and eval.scannet1500_root")
        pairs = read_scannet1500(cfg.scannet1500_pairs, cfg.scannet1500_root)[: cfg.correspondence_pairs]
        pairs_identity = scannet1500_identity(cfg.scannet1500_pairs, cfg.scannet1500_root)
        probes = list(dict.fromkeys([*probes, "correspondence"]))
    fitted = train_frames.fitted_normals + test_frames.fitted_normals
    if "normals" in probes and fitted:
        notes.append(f"normals: {fitted} of the {len(train_frames) + len(test_frames)} frames have no ground-truth "
                     "normals; theirs were fitted to the depth by local least-squares planes "
                     "(snd_stages/scenes/normals.py).")

    torch.manual_seed(cfg.seed)  # a random-weights baseline (smoke runs) is then the same model every time
    family = backbone_spec(train.backbone).family
    models = [ProbeBackbone(train.backbone, cfg.baseline_weights, f"{family} {train.backbone} ({cfg.baseline_weights})",
                            device, allow_random=cfg.baseline_weights == "random")]
    models += [run_backbone(run, device=device) for run in runs]
    for backbone, settings in zip(models[1:], distinguishing_settings(runs)):
        if settings:  # e.g. an ablation row: say what sets it apart from the runs beside it
            backbone.label = f"{backbone.label} · {', '.join(settings)}"
    reference = models[reference_position].label
    results: dict = {"protocol": {"dataset": cfg.dataset, "probes": probes,
                                  **_protocol(cfg, train_ids, test_ids, train_frames, test_frames, len(pairs),
                                              class_token=backbone_spec(train.backbone).class_tokens > 0)},
                     "metrics": metric_table(), "headline": {name: probe.headline for name, probe in PROBES.items()},
                     "models": {}, "reference": reference, "notes": notes}
    # Every model's features are held at once (their probes are fitted together): the memory is shared among them.
    memory_bytes = cfg.feature_memory_gb * 2**30 / len(models)
    frame_specs = [PROBE_FEATURES[probe] for probe in probes if probe in PROBE_FEATURES]
    outputs, uses, measurements = {}, [], {}

    def features_of(backbone, frame_set, specs):
        with phase("features"):
            sets, used = probe_features(backbone, frame_set, specs, store, config_yaml, memory_bytes, progress)
        uses.extend(used)
        return sets

    labels = [backbone.label for backbone in models]
    train_sets, test_sets, pair_sets = [], [], []
    pair_specs = list(dict.fromkeys(PROBES[name].features for name in probes if PROBES[name].reads_pairs))
    for backbone in track(models, "features of each model", progress, unit="model"):
        train_sets.append(features_of(backbone, train_frames.frame_set("train"), frame_specs) if frame_specs else {})
        tests = features_of(backbone, test_frames.frame_set("test"), frame_specs) if frame_specs else {}
        pair_sets.append(features_of(backbone, pairs_frame_set(pairs, pairs_identity), pair_specs) if pair_specs else {})
        # PCA picture of the first test frame's final-normed last block (a one-frame set unless segmentation has it).
        pca = tests if SEGMENTATION_FEATURES in tests else features_of(
            backbone, test_frames.frame_set("first test frame", 1), [SEGMENTATION_FEATURES])
        outputs[backbone.label] = {"pca": pca[SEGMENTATION_FEATURES].view(0)}
        test_sets.append(tests)
    scores: list[dict] = [{} for _ in models]
    for name in probes:
        probe = PROBES[name]
        if probe.reads_pairs:
            inputs = ProbeInputs(cfg, device, name, progress, labels, pairs=pairs,
                                 pair_features=[sets[probe.features] for sets in pair_sets])
        else:
            inputs = ProbeInputs(cfg, device, f"{name} probe", progress, labels,
                                 train=([sets[probe.features] for sets in train_sets], train_frames),
                                 test=([sets[probe.features] for sets in test_sets], test_frames), classes=classes)
        with phase("probes"):
            for model, (model_scores, shown) in enumerate(probe.run(inputs)):
                scores[model][name] = model_scores
                if shown is not None:
                    outputs[labels[model]][name] = shown
    for backbone, seen, model_scores in zip(models, [0] + [samples_seen(m) for m in manifests], scores):
        measurements[backbone.label] = model_scores
        results["models"][backbone.label] = {"backbone": backbone.name, "weights": backbone.weights,
                                             "samples_seen": seen}
    with phase("report"):
        summarise(results, measurements, cfg)
        notes += short_run_notes(results)
        report_dir = Path(cfg.report_dir)
        forget_report(report_dir)
        figures = save_figures(report_dir, test_frames, outputs)
        write_report(report_dir, spec, {"report.json": json.dumps(results, indent=1),
                                        "report.md": markdown_report(results), "config.yaml": config_yaml}, figures)
    return EvalReport(report_dir, results, figures, uses)


def reference_index(reference: Path | None, runs: Sequence[Path]) -> int:
    """Position of ``eval.reference`` among the probed models (0 = the baseline, then ``runs`` in order)."""
    if reference is None:
        return 0
    for index, run in enumerate(runs, start=1):
        if Path(run).resolve() == Path(reference).resolve():
            return index
    raise ConfigError(f"eval.reference = {reference} is not one of the probed runs ({', '.join(map(str, runs))}); "
                      "name one of eval.runs, or leave it null for deltas against the baseline")


# The sections of a run's config.yaml that decide what it learned (data.root is left out: the same scenes may lie in
# another folder on another machine).
RUN_SECTIONS = ("sampling", "gaussians", "masks", "train")


def distinguishing_settings(runs: Sequence[Path]) -> list[list[str]]:
    """For each run (a run directory or one of its checkpoints), the settings ``section.key=value`` in which it
    differs from what most of the compared runs use (ties go to the earlier run), e.g. ``train.blending=1.0`` for an
    ablation row beside the default run. Settings that only observe a run (``TRAIN_OBSERVATION_ONLY``) never count.
    A run without a readable config.yaml gets nothing and does not count in what most runs use."""
    flat: list[dict | None] = []
    for run in runs:
        try:
            config = yaml.safe_load((run_of(run) / "config.yaml").read_text())
        except (OSError, yaml.YAMLError):
            config = None
        flat.append(None if not isinstance(config, dict) else {
            key: json.dumps(value, sort_keys=True)
            for section in RUN_SECTIONS for key, value in _dotted(config.get(section) or {}, f"{section}.").items()
            if not (section == "train" and key.removeprefix("train.") in TRAIN_OBSERVATION_ONLY)})
    readable = [settings for settings in flat if settings is not None]
    keys = sorted(set().union(*readable)) if readable else []
    common = {key: collections.Counter(s.get(key) for s in readable).most_common(1)[0][0] for key in keys}
    return [[] if settings is None else
            [f"{key}={_setting_text(settings.get(key))}" for key in keys if settings.get(key) != common[key]]
            for settings in flat]


def _dotted(section: dict, prefix: str) -> dict:
    """``{"depth": {"opacity": 1.0}}`` -> ``{"<prefix>depth.opacity": 1.0}``: a component's sub-section key by key."""
    flat = {}
    for key, value in section.items():
        if isinstance(value, dict):
            flat.update(_dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _setting_text(encoded: str | None) -> str:
    value = None if encoded is None else json.loads(encoded)
    return value if isinstance(value, str) else json.dumps(value)


def _protocol(cfg: EvalCfg, train_ids, test_ids, train_frames: ProbeFrames, test_frames: ProbeFrames, pairs: int,
              class_token: bool = True) -> dict:
    height, width = train_frames.image_size
    return {
        "probe_train_scenes": train_ids, "test_scenes": test_ids,
        "probe_train_frames": len(train_frames.names), "test_frames": len(test_frames.names),
        "image_size": [height, width], "probe_steps": cfg.probe_steps, "probe_batch_size": cfg.probe_batch_size,
        "probe_learning_rate": cfg.probe_learning_rate,
        "probe_warmup_fraction": cfg.probe_warmup_fraction, "seeds": list(cfg.seeds), "seed": cfg.seed,
        "features": {name: probe.features.describe(class_token) for name, probe in PROBES.items()},
        "correspondence": {"pairs": pairs, "scale": cfg.correspondence_scale, "top_k": cfg.correspondence_top_k,
                           "gap": list(cfg.correspondence_gap),
                           "source": "ScanNet-1500" if cfg.scannet1500_pairs is not None else "held-out scenes"},
    }


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def metric_table() -> dict[str, list[dict]]:
    """Each probe's metrics with their better direction and format (:data:`~snd_stages.probes.registry.PROBES`),
    recorded in the results so that the report's tables read from them alone."""
    return {name: [{"name": metric.name, "higher_is_better": metric.higher_is_better, "format": metric.format}
                   for metric in probe.metrics] for name, probe in PROBES.items()}


def save_figures(report_dir: Path, frames: ProbeFrames, outputs: dict) -> list[Path]:
    """Each probe's figure (:data:`~snd_stages.probes.registry.PROBES`) where every model has its predictions, then
    the PCA pictures of the first test frame's features."""
    labels = list(outputs)
    figures = [probe.figure(report_dir, frames, {label: outputs[label][name] for label in labels})
               for name, probe in PROBES.items()
               if probe.figure is not None and all(name in outputs[label] for label in labels)]
    return figures + [pca_figure(report_dir, frames, {label: outputs[label]["pca"] for label in labels})]
