"""Strict loading of MVSplat's official weights (``re10k.ckpt``) into :class:`MVSplatEncoder`.

The authors release Lightning checkpoints: ``ckpt["state_dict"]`` holds the ``ModelWrapper``'s weights, which
are exactly the encoder's state dict under the prefix ``encoder.`` (the decoder and the losses store no
tensors). Accepted files:

- a Lightning checkpoint (``.ckpt`` / ``.pth`` / ``.pt``) with ``state_dict``;
- a bare state dict saved with ``torch.save``, keys with or without the ``encoder.`` prefix;
- a ``.safetensors`` file, keys with or without the prefix.

Every key and shape must match: missing keys, unexpected keys and shape mismatches are reported together in
one :class:`DataError` naming the file; nothing is ever loaded partially.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Mapping

import safetensors
import safetensors.torch
import torch
from torch import Tensor

from ...errors import DataError
from ...models.state_dicts import check_state_dict, short_list
from .encoder import MVSplatEncoder

CHECKPOINT_PREFIX = "encoder."


def read_mvsplat_checkpoint(path: Path) -> dict[str, Tensor]:
    """:func:`read_state_dict_file` for MVSplat's checkpoint."""
    return read_state_dict_file(path, "MVSplat checkpoint", "set gaussians.mvsplat.checkpoint to re10k.ckpt")


def read_state_dict_file(path: Path, label: str, setting_hint: str) -> dict[str, Tensor]:
    """The name -> tensor dict stored in ``path`` (names as in the file), unwrapping Lightning's ``state_dict``.

    Pickles are read with ``weights_only=True``, so no code from the file runs. Lightning checkpoints also hold
    bookkeeping objects (hyper-parameters, callback states) whose classes the weights-only unpickler refuses;
    for those files each such class is replaced by an inert stand-in (:func:`_load_with_inert_globals`) and
    only ``state_dict`` is kept.

    Args:
        label: what the file is, for messages ("MVSplat checkpoint").
        setting_hint: how to point at the right file, for the message when it does not exist.

    Raises:
        DataError: the file is missing, unreadable, or holds no name -> tensor mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{label} {path} does not exist ({setting_hint})")
    if path.suffix.lower() == ".safetensors":
        try:
            return safetensors.torch.load_file(path, device="cpu")
        except (safetensors.SafetensorError, OSError) as error:
            raise DataError(f"cannot read {path} as safetensors: {error}") from error
    try:
        try:
            content = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            content = _load_with_inert_globals(path)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as error:
        raise DataError(
            f"cannot read {path} with torch.load (not a torch checkpoint, truncated, or holding objects that "
            f"cannot be read safely; re-save its state_dict with torch.save or safetensors): {error}"
        ) from error
    if isinstance(content, Mapping) and isinstance(content.get("state_dict"), Mapping):
        content = content["state_dict"]
    if not isinstance(content, Mapping):
        raise DataError(f"{path} holds a {type(content).__name__}, not a state dict or a Lightning checkpoint")
    not_tensors = [str(key) for key, value in content.items() if not isinstance(value, Tensor)]
    if not_tensors:
        raise DataError(
            f"{path} is not a state dict: entries {short_list(not_tensors)} are not tensors; expected the weights "
            "at the top level or under 'state_dict' (a Lightning checkpoint)"
        )
    return dict(content)


class _Inert:
    """Stands in for any class or function a checkpoint names: accepts every construction and state, does nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Inert":
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _empty_dict(*args: Any) -> dict:
    # ``defaultdict(factory)`` is rebuilt as a plain dict so that its items can still be filled in.
    return {}


def _load_with_inert_globals(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with every non-allowlisted global of the file mapped to :class:`_Inert`.

    The weights-only unpickler only ever calls allowlisted objects; allowlisting the inert stand-in under the
    foreign names keeps that guarantee (nothing from the file is imported or run) while letting the load get
    past the bookkeeping to the tensors.
    """
    names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    stand_ins = [(_empty_dict if name == "collections.defaultdict" else _Inert, name) for name in names]
    with torch.serialization.safe_globals(stand_ins):
        return torch.load(path, map_location="cpu", weights_only=True)


def convert_mvsplat_state_dict(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str], str]:
    """Checkpoint names -> :class:`MVSplatEncoder` names.

    The encoder's attribute paths are the official ones, so the only conversion is dropping the Lightning
    wrapper's ``encoder.`` prefix. Files whose keys carry no prefix anywhere (a bare encoder state dict) are
    taken as they are.

    Returns:
        (converted state dict, names of the file's keys outside ``encoder.`` when it uses the prefix, the prefix
        the file uses: ``"encoder."`` or ``""``).
    """
    if not any(key.startswith(CHECKPOINT_PREFIX) for key in state_dict):
        return dict(state_dict), [], ""
    converted = {key[len(CHECKPOINT_PREFIX):]: value for key, value in state_dict.items() if key.startswith(CHECKPOINT_PREFIX)}
    foreign = [key for key in state_dict if not key.startswith(CHECKPOINT_PREFIX)]
    return converted, foreign, CHECKPOINT_PREFIX


def load_encoder_strict(encoder: torch.nn.Module, state_dict: Mapping[str, Tensor], source: str, what: str,
                        fix: str) -> None:
    """Load a checkpoint-named state dict (with or without the Lightning ``encoder.`` prefix) into ``encoder`` if,
    and only if, every key and shape matches; half-precision tensors are copied into the float32 parameters.

    Raises:
        DataError: one line naming ``source`` and ``what``, with the counts and the first few of the missing keys,
            unexpected keys and shape mismatches (names as the file spells them), and ``fix``.
    """
    converted, _, prefix = convert_mvsplat_state_dict(state_dict)
    # Compared under the file's names, so that the message spells keys as the user will find them in it.
    expected = {prefix + key: value for key, value in encoder.state_dict().items()}
    check_state_dict(expected, state_dict, source, f"{what} ({len(expected)} tensors)", fix)
    encoder.load_state_dict(converted, strict=True)


def load_state_dict_strict(encoder: MVSplatEncoder, state_dict: Mapping[str, Tensor], source: str) -> None:
    """:func:`load_encoder_strict` for MVSplat's encoder."""
    load_encoder_strict(
        encoder, state_dict, source, "the MVSplat encoder",
        "use the authors' RE10K checkpoint (re10k.ckpt, the costvolume encoder with 128 depth candidates and 2 "
        "context views) or a state dict converted from it",
    )


def load_mvsplat_encoder(path: Path, device: torch.device | str = "cpu") -> MVSplatEncoder:
    """Build the encoder, load ``path`` strictly (see the module docstring), return it in eval mode on ``device``."""
    state_dict = read_mvsplat_checkpoint(Path(path))
    encoder = MVSplatEncoder()
    load_state_dict_strict(encoder, state_dict, f"MVSplat checkpoint {path}")
    return encoder.to(device).eval()
