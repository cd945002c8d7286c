"""Checking weights against the model they are meant for, with one-line errors.

Kept apart from :mod:`snd_stages.models.weights` (which needs timm) so that the reconstructors' checkpoint loading,
and the precompute stages that import it, start without importing timm.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from ..errors import DataError

_LISTED_KEYS = 6  # how many offending keys of each kind an error message spells out


def check_state_dict(
    expected: Mapping[str, Tensor], state_dict: Mapping[str, Tensor], source: str, target: str, fix: str
) -> None:
    """Raise a one-line DataError for weights that cannot be ``target``'s: missing keys, unexpected keys and shape
    mismatches (listed together), else tensors that are not floating point or not finite (meta tensors, which hold
    no values, pass that last check).

    Args:
        expected: the model's state dict (names and shapes).
        state_dict: what the file holds, under the same naming.
        source: the file (and format), for the message.
        target: the model, for the message.
        fix: how to get a matching file, appended to the message.
    """
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in expected
        if key in state_dict and state_dict[key].shape != expected[key].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {short_list(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {short_list(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches: {short_list(mismatched)}")
        parts.append(f"fix: {fix}")
        raise DataError(f"cannot load {source} into {target} strictly: " + "; ".join(parts))
    not_float = [f"{key} ({value.dtype})" for key, value in state_dict.items()
                 if key in expected and expected[key].is_floating_point() and not value.is_floating_point()]
    if not_float:
        raise DataError(f"cannot load {source} into {target}: {len(not_float)} tensors are not floating point "
                        f"({short_list(not_float)}): the weights were cast or damaged; use the original checkpoint")
    not_finite = [key for key, value in state_dict.items()
                  if key in expected and value.is_floating_point() and not value.is_meta
                  and not bool(torch.isfinite(value).all())]
    if not_finite:
        raise DataError(f"cannot load {source} into {target}: {len(not_finite)} tensors hold NaN or infinite values "
                        f"({short_list(not_finite)}): the checkpoint is damaged or from a diverged run; use an "
                        "intact one")


def short_list(items: list[str]) -> str:
    """The first few items, and how many more: offending keys in an error message."""
    shown = ", ".join(items[:_LISTED_KEYS])
    return shown + (f", ... ({len(items) - _LISTED_KEYS} more)" if len(items) > _LISTED_KEYS else "")
