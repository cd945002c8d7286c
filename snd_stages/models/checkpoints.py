"""A training run's model, and the part of it that its checkpoints hold.

``snd train`` builds the model from its ``train`` settings (:func:`build_model`) and saves, every
``train.checkpoint_every`` steps, ``checkpoints/step-NNNNNN.pt`` (:func:`checkpoint_path`): the LoRA matrices of
student and teacher and both heads (:func:`is_checkpoint_state`; the base weights are the pretrained ones), with
the optimiser, schedule and RNG states. Resuming and probing a checkpoint both rebuild the model the same way and
load those tensors into it (:func:`read_checkpoint`, :func:`restore_model_state`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import TrainCfg
from ..errors import ArtifactError, ConfigError
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
    return StudentTeacher(backbone, out_dim=train.prototypes, lora_rank=train.lora_rank, lora_alpha=train.lora_alpha,
                          lora_dropout=train.lora_dropout, reference_quirks=train.reference_quirks,
                          heads=train.loss == "dino")


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:06d}.pt"


def run_of(path: Path) -> Path:
    """The run directory of ``path``: a run directory itself, or one of its checkpoints (:func:`checkpoint_path`)."""
    path = Path(path)
    return path.parent.parent if path.suffix == ".pt" else path


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
