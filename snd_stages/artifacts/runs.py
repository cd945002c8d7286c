"""A training run: its key rule, its layout, its checkpoints, and the manifest that marks it finished.

``snd train`` writes the run of a configuration to ``<train.runs_root>/<key>/``; the key covers the training
settings (never the device or what only observes training: :data:`~snd_stages.config.TRAIN_OBSERVATION_ONLY`) and
its input artifacts' keys (samples, Gaussians, masks; a checkpoint's contents, not its path). The directory holds::

    config.yaml                      the resolved config
    checkpoints/step-NNNNNN.pt       LoRA matrices, heads, optimiser, schedule and RNG states (the newest kept)
    metrics.csv, validation.csv      training and validation curves (also as TensorBoard events and curves.png)
    pictures/step-NNNNNN.png         the teacher's and the student's features on a training target
    student.safetensors              the exports: LoRA merged, timm-loadable
    teacher.safetensors
    manifest.json                    written last: the key's ingredients, and each export's size and CRC32C

A run is finished when its manifest is there and its exports match it (:func:`read_run_manifest`).
"""

from __future__ import annotations

import errno
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import torch
import yaml

from ..config import TRAIN_OBSERVATION_ONLY, build, DataCfg, SamplingCfg, TrainCfg, to_dict

from ..reconstruct import GaussiansCfg

from ..masks import MasksCfg
from ..errors import ArtifactError, ConfigError
from ..models.checkpoints import build_model, is_checkpoint_state, restore_model_state
from ..models.lora import merged_backbone
from ..models.distill import StudentTeacher
from ..models.weights import EMBEDDED
from ..probes.backbone import ProbeBackbone
from ..store import (Artifact, ArtifactSpec, Store, checkpoint_by_content, file_lock, file_record, verify_files,
                     write_text_atomic)
from .gaussians import load_gaussians
from .masks import load_masks
from .operators import load_operators
from .samples import SampleSet, load_samples

STAGE = "run"
SCHEMA_VERSION = 1
CHECKPOINT_PATTERN = "step-*.pt"
STUDENT_EXPORT = "student.safetensors"
TEACHER_EXPORT = "teacher.safetensors"


@dataclass(frozen=True)
class RunInputs:
    """The artifacts a run reads: the frozen samples, their Gaussians and their masks."""

    samples_artifact: Artifact
    samples: SampleSet
    gaussians: Artifact
    masks: Artifact


def run_inputs(data: DataCfg, sampling: SamplingCfg, gaussians: GaussiansCfg, masks: MasksCfg, store: Store) -> RunInputs:
    samples_artifact, samples = load_samples(store, data, sampling)
    return RunInputs(samples_artifact, samples, load_gaussians(store, gaussians, samples_artifact.key),
                     load_masks(store, masks, samples_artifact.key))


def teacher_operators(train: TrainCfg, inputs: RunInputs, store: Store) -> Artifact:
    """The run's precomputed teacher operators, with the two ways forward when they are missing."""
    try:
        return load_operators(store, train, inputs.samples_artifact.key, inputs.gaussians.key, inputs.masks.key)
    except ArtifactError as error:
        raise ArtifactError(f"{error} (train.teacher_splatting is 'operator'; or set it to 'render' to splat "
                            "every step without them)") from None


def run_spec(train: TrainCfg, inputs: RunInputs) -> ArtifactSpec:
    """The run's identity: its training settings and input artifacts, never the device it trains on (so ``snd eval``
    on another machine finds the run that ``snd train`` made)."""
    params = {name: value for name, value in to_dict(train).items() if name not in TRAIN_OBSERVATION_ONLY}
    keys = {"samples": inputs.samples_artifact.key, "gaussians": inputs.gaussians.key, "masks": inputs.masks.key}
    if train.weights not in (EMBEDDED, "random"):  # a checkpoint
        params, weights = checkpoint_by_content(params, "weights", "weights_sha256", "train.weights")
        keys.update(weights)
    return ArtifactSpec(STAGE, SCHEMA_VERSION, params=params, inputs=keys)


def run_directory(data: DataCfg, sampling: SamplingCfg, gaussians: GaussiansCfg, masks: MasksCfg, train: TrainCfg,
                  store: Store) -> Path:
    """Where ``snd train`` puts (or has put) the run of this configuration."""
    return Path(train.runs_root) / run_spec(train, run_inputs(data, sampling, gaussians, masks, store)).key


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:06d}.pt"


def run_of(path: Path) -> Path:
    """The run directory of ``path``: a run directory itself, or one of its checkpoints (:func:`checkpoint_path`)."""
    path = Path(path)
    return path.parent.parent if path.suffix == ".pt" else path


RUN_MANIFEST = "manifest.json"


def publish_run(run_dir: Path, spec: ArtifactSpec, steps: int, final_loss: float | None, backbone: str,
                exported: list[str]) -> None:
    """Write the manifest that marks run ``run_dir`` finished, with each exported file's size and CRC32C."""
    manifest = {**spec.ingredients(), "key": spec.key, "complete": True, "steps": steps, "final_loss": final_loss,
                "backbone": backbone, "exported": exported, "files": run_manifest_files(run_dir, exported)}
    write_text_atomic(run_dir / RUN_MANIFEST, json.dumps(manifest, indent=1))


def run_manifest_files(run_dir: Path, names: list[str]) -> dict[str, list]:
    """``{name: [size, CRC32C]}`` of a finished run's exported files, recorded in its manifest."""
    return {name: file_record(run_dir / name) for name in names}


def read_run_manifest(run_dir: Path) -> dict[str, Any] | None:
    """A finished run's manifest, its exported weights verified against it; None where the run has none yet.

    Raises:
        ArtifactError: the manifest is unreadable, or an exported file is missing or altered (naming the file and
            what to do: the run's checkpoints are kept, ``snd train --force`` retrains).
    """
    run_dir = Path(run_dir)
    path = run_dir / RUN_MANIFEST
    if not path.is_file():
        return None
    fix = f"delete {run_dir} (or rerun snd train --force) to train it again"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or manifest.get("complete") is not True:
            raise ValueError("it does not describe a finished run")
        if "files" not in manifest:
            raise ValueError("it records no sizes and checksums of the exported weights: written by an older snd")
        files = manifest["files"]
        if not isinstance(files, dict) or not isinstance(manifest.get("backbone"), str):
            raise ValueError("its record of files or its backbone is not what snd writes")
    except (ValueError, TypeError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{path} is damaged ({error}); {fix}") from None
    verify_files(run_dir, files, [name for name in files if (run_dir / name).is_file()], fix)
    return manifest


def finished_run_manifest(run_dir: Path) -> dict[str, Any]:
    """:func:`read_run_manifest` of a run that must be finished (one that ``snd eval`` probes)."""
    manifest = read_run_manifest(run_dir)
    if manifest is None:
        raise ArtifactError(f"{run_dir} is not a finished training run (no {RUN_MANIFEST}); run snd train first")
    return manifest


def training_lock(run_dir: Path):
    """Hold run ``run_dir`` against a second ``snd train`` of the same run (both would write the same checkpoints
    and exports) until the block ends; refuse if another process holds it (a lock file beside the run)."""
    return file_lock(run_dir.parent / f".{run_dir.name}.lock", True,
                     f"another snd train is training run {run_dir}; wait for it to finish (a rerun then finds the "
                     "run), or stop it and rerun to resume from its last checkpoint")


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of a run, or None.

    Each checkpoint is written to ``.step-NNNNNN.pt.tmp-<pid>-<random>`` and renamed when whole, so a run killed
    while writing one leaves only that temporary: it is never picked, and it is deleted here. A step file that is unreadable
    all the same (a disk fault, a copy cut short) is still picked, and :func:`load_checkpoint` stops with an error
    naming it and the checkpoint before it: resuming silently from an older one would hide the fault.
    """
    directory = run_dir / "checkpoints"
    for leftover in directory.glob(".step-*.pt.tmp*"):
        leftover.unlink(missing_ok=True)
    found = sorted(directory.glob("step-*.pt"))
    return found[-1] if found else None


def save_checkpoint(run_dir: Path, step: int, model: StudentTeacher, optimizer, scheduler, key: str, keep: int) -> Path:
    trainable = {name: p for name, p in model.state_dict().items() if is_checkpoint_state(name)}
    state = {
        "step": step,
        "run_key": key,
        "model": trainable,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    path = checkpoint_path(run_dir, step)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        torch.save(state, temporary)
        temporary.replace(path)
    except (OSError, RuntimeError) as error:  # torch.save reports a failed write (e.g. a full disk) as RuntimeError
        temporary.unlink(missing_ok=True)
        previous = latest_checkpoint(run_dir)
        kept = f"the previous checkpoint {previous.name} is intact" if previous else "there is no earlier checkpoint"
        detail = str(error).strip().splitlines()[0][:200]
        full = getattr(error, "errno", None) == errno.ENOSPC or "space" in detail.lower()
        fix = f"free space in {path.parent}" if full else "fix the cause above"
        raise ArtifactError(f"cannot write checkpoint {path} ({detail}); {kept}: {fix} and rerun the same command "
                            "to resume") from None
    for old in sorted((run_dir / "checkpoints").glob("step-*.pt"))[:-keep]:
        old.unlink()
    return path


def load_checkpoint(path: Path, model: StudentTeacher, optimizer, scheduler, key: str) -> int:
    """Restore the state saved by :func:`save_checkpoint`; return the number of steps done.

    An unreadable file stops the run with an error naming the checkpoint to fall back to (see
    :func:`latest_checkpoint`).
    """
    if path.is_dir():
        raise ArtifactError(f"--resume {path} is a folder; pass --resume auto or a checkpoint file "
                            "(<run>/checkpoints/step-NNNNNN.pt)")
    if not path.is_file():
        raise ArtifactError(f"checkpoint {path} does not exist; pass --resume auto or a step-NNNNNN.pt file")
    try:
        state = read_checkpoint(path)
    except ArtifactError as error:
        if path.parent.name != "checkpoints" or not path.name.startswith("step-"):
            # not one of a run's own checkpoints: never advise deleting it
            raise ArtifactError(f"{error}; --resume takes a checkpoint that snd train wrote "
                                "(<run>/checkpoints/step-NNNNNN.pt), or auto") from None
        earlier = [other for other in sorted(path.parent.glob("step-*.pt")) if other.name < path.name]
        then = f"--resume auto then continues from {earlier[-1].name}" if earlier else "the run then starts over"
        raise ArtifactError(f"{error}; delete it and rerun: {then}") from None
    if state.get("run_key") != key:
        raise ConfigError(
            f"checkpoint {path} belongs to run {state.get('run_key')}, not to this configuration's run {key}; "
            "resume with the config that made it"
        )
    restore_model_state(model, state["model"], path)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] and torch.cuda.is_available():
        # One state per GPU of the machine that saved it; a machine with fewer GPUs restores those it has.
        torch.cuda.set_rng_state_all(state["rng_cuda"][: torch.cuda.device_count()])
    return int(state["step"])


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The training state :func:`save_checkpoint <snd_stages.stages.train.save_checkpoint>` wrote, on the CPU.

    Raises:
        ArtifactError: the file is unreadable or holds no training state (the message names it and the cause;
            the caller adds what to do).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not {"step", "run_key", "model", "optimizer", "scheduler"} <= state.keys():
            raise ValueError("it holds no training state")
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same advice
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0].split(". ")[0][:200]
        raise ArtifactError(f"checkpoint {path} is truncated or not a training checkpoint ({detail})") from None
    return state


# Reading a run back: the backbone it exported, or one of its checkpoints' students, for the probes.


def run_backbone(run_dir: Path, which: str = "student", device: torch.device | str = "cpu") -> ProbeBackbone:
    """The backbone a training run exported (LoRA merged); given one of the run's checkpoints
    (``checkpoints/step-NNNNNN.pt``), the student at that step (:func:`checkpoint_backbone`)."""
    if Path(run_dir).suffix == ".pt":
        return checkpoint_backbone(Path(run_dir), device)
    manifest = finished_run_manifest(Path(run_dir))
    weights = Path(run_dir) / f"{which}.safetensors"
    return ProbeBackbone(manifest["backbone"], weights, f"Splat-and-Distill {which} ({Path(run_dir).name})", device)

def checkpoint_backbone(path: Path, device: torch.device | str = "cpu") -> ProbeBackbone:
    """The student of a training checkpoint, LoRA merged, labelled with its step.

    The run's ``config.yaml`` rebuilds the model the checkpoint belongs to (random base weights drawn from
    ``train.seed``, as the run drew them); the checkpoint's LoRA and head tensors are loaded into it. At a
    run's last step this is the model the run exported as ``student.safetensors``.
    """
    path = Path(path)
    run_dir = run_of(path)
    if not path.is_file():
        raise _missing_checkpoints(run_dir, path.name, "eval.runs")
    try:
        state = read_checkpoint(path)
    except ArtifactError as error:
        raise ArtifactError(f"{error}; probe another of the run's checkpoints") from None
    if state["run_key"] != run_dir.name or not (run_dir / "config.yaml").is_file():
        raise ArtifactError(f"checkpoint {path} belongs to run {state['run_key']}; probe it where snd train wrote "
                            f"it, <train.runs_root>/{state['run_key']}/checkpoints/, beside the run's config.yaml")
    config_file = run_dir / "config.yaml"
    train = build(TrainCfg, yaml.safe_load(config_file.read_text()).get("train"), "train.", str(config_file))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(train.seed)
        model = build_model(train)
    restore_model_state(model, state["model"], path)
    step = int(state["step"])
    label = f"Splat-and-Distill student ({run_dir.name}, step {step})"
    return ProbeBackbone.of_model(merged_backbone(model.student).to(device), train.backbone, str(path), label)


def with_checkpoints(runs: Sequence[Path], steps: Sequence[int]) -> list[Path]:
    """Each run directory preceded by its checkpoints of ``steps`` (``eval.checkpoints``), in the order given; a
    checkpoint named in ``runs`` stays as it is.

    Raises:
        ConfigError: a step has no checkpoint; the message lists those the run kept.
    """
    probed = []
    for run in map(Path, runs):
        if run.suffix != ".pt":
            paths = [checkpoint_path(run, step) for step in steps]
            missing = [step for step, path in zip(steps, paths) if not path.is_file()]
            if missing:
                raise _missing_checkpoints(run, f"of step(s) {missing}", "eval.checkpoints")
            probed += paths
        probed.append(run)
    return probed


def _missing_checkpoints(run_dir: Path, wanted: str, key: str) -> ConfigError:
    kept = sorted(int(path.stem.removeprefix("step-")) for path in (run_dir / "checkpoints").glob(CHECKPOINT_PATTERN))
    return ConfigError(
        f"{key}: run {run_dir} has no checkpoint {wanted}; it kept steps {kept} (snd train saves one every "
        "train.checkpoint_every steps and keeps the newest train.keep_checkpoints; 0 keeps every one): choose among "
        "those, or train again with train.keep_checkpoints: 0"
    )
