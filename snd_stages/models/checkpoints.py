"""A training run's model, and the part of it that its checkpoints hold.

``snd train`` builds the model from its ``train`` settings (:func:`build_model`) and saves, every
``train.checkpoint_every`` steps, ``checkpoints/step-NNNNNN.pt`` (:func:`checkpoint_path`): the LoRA matrices of
student and teacher and both heads (:func:`is_checkpoint_state`; the base weights are the pretrained ones), with
the optimiser, schedule and RNG states. Resuming and probing a checkpoint both rebuild the model the same way and
load those tensors into it (:func:`read_checkpoint`, :func:`restore_model_state`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..config import TrainCfg
from ..errors import ArtifactError, ConfigError
from ..store import file_record, verify_files
from .backbones import backbone_spec
from .distill import StudentTeacher
from .weights import create_backbone

CHECKPOINT_PATTERN = "step-*.pt"


def build_model(train: TrainCfg) -> StudentTeacher:
    """Student and teacher of a run. Random base weights are drawn from torch's global generator, so a run
    seeds it (``train.seed``) first."""
    if train.weights == "random" and not train.allow_random_weights:
        raise ConfigError("train.weights = 'random' needs train.allow_random_weights: true (smoke tests only)")
    weights = None if train.weights == "random" else train.weights
    backbone = create_backbone(train.backbone, weights, allow_random=train.allow_random_weights)
    return StudentTeacher(backbone, backbone_spec(train.backbone), out_dim=train.prototypes, lora_rank=train.lora_rank,
                          lora_alpha=train.lora_alpha, lora_dropout=train.lora_dropout,
                          reference_quirks=train.reference_quirks, heads=train.loss == "dino")


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:06d}.pt"


def run_of(path: Path) -> Path:
    """The run directory of ``path``: a run directory itself, or one of its checkpoints (:func:`checkpoint_path`)."""
    path = Path(path)
    return path.parent.parent if path.suffix == ".pt" else path


RUN_MANIFEST = "manifest.json"


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


def is_checkpoint_state(name: str) -> bool:
    """What a checkpoint stores: LoRA matrices (student and teacher) and both heads; base weights are pretrained."""
    return "lora_" in name or name.startswith(("student_head.", "teacher_head."))


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


def restore_model_state(model: StudentTeacher, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Load a checkpoint's LoRA and head ``tensors`` into ``model``, refusing a checkpoint of another model."""
    expected = {name for name in model.state_dict() if is_checkpoint_state(name)}
    if set(tensors) != expected:
        raise ArtifactError(f"checkpoint {path} does not hold this model's LoRA and head tensors")
    model.load_state_dict(tensors, strict=False)
