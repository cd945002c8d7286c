"""A training run's model, and the part of it that its checkpoints hold.

``snd train`` builds the model from its ``train`` settings (:func:`build_model`); its checkpoints
(:mod:`snd_stages.artifacts.runs`) hold the LoRA matrices of student and teacher and both heads
(:func:`is_checkpoint_state`; the base weights are the pretrained ones). Resuming and probing a checkpoint both
rebuild the model the same way and load those tensors into it (:func:`restore_model_state`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import TrainCfg
from ..errors import ArtifactError, ConfigError
from .backbones import backbone_spec
from .distill import StudentTeacher
from .weights import create_backbone


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


def is_checkpoint_state(name: str) -> bool:
    """What a checkpoint stores: LoRA matrices (student and teacher) and both heads; base weights are pretrained."""
    return "lora_" in name or name.startswith(("student_head.", "teacher_head."))


def restore_model_state(model: StudentTeacher, tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Load a checkpoint's LoRA and head ``tensors`` into ``model``, refusing a checkpoint of another model."""
    expected = {name for name in model.state_dict() if is_checkpoint_state(name)}
    if set(tensors) != expected:
        raise ArtifactError(f"checkpoint {path} does not hold this model's LoRA and head tensors")
    model.load_state_dict(tensors, strict=False)
