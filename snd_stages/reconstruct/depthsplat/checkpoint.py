"""Strict loading of DepthSplat's official weights into :class:`DepthSplatEncoder`.

The authors' ``.pth`` files are the Lightning ``ModelWrapper``'s state dict (bare, or under ``state_dict``): the
encoder's tensors under the prefix ``encoder.`` and nothing else (the decoder and the losses store none). The
DINOv2 weights are among them (``encoder.depth_predictor.pretrained.*``), so nothing is downloaded. Accepted
files, read without running anything pickled (:func:`~..mvsplat.checkpoint.read_state_dict_file`):

- a Lightning checkpoint or a bare state dict (``.pth`` / ``.ckpt`` / ``.pt``), keys with or without ``encoder.``;
- a ``.safetensors`` file, keys with or without the prefix; float16 copies are cast to float32 on load.

Every key and shape must match one configuration of :data:`~.encoder.MODELS` (``model: auto`` finds it): missing
keys, unexpected keys and shape mismatches are reported together in one :class:`DataError` naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from ..mvsplat.checkpoint import convert_mvsplat_state_dict, load_encoder_strict, read_state_dict_file
from .encoder import MODELS, DepthSplatEncoder

RELEASED = (
    "use one of the authors' checkpoints (depthsplat-gs-{small,base,large}-re10k-256x256-view2-*.pth for models "
    "small, base, large; depthsplat-gs-{small,base}-re10kdl3dv-448x768-*.pth for small_448x768, base_448x768) or a "
    "state dict converted from one"
)
# The DINOv2 width tells the model size apart, to report a checkpoint that matches no configuration against the
# nearest one.
MODEL_BY_VIT_WIDTH = {384: "small", 768: "base", 1024: "large"}
DINOV2_POSITION_KEY = "depth_predictor.pretrained.pos_embed"


def read_depthsplat_checkpoint(path: Path) -> dict[str, Tensor]:
    """The name -> tensor dict stored in ``path`` (names as in the file)."""
    return read_state_dict_file(path, "DepthSplat checkpoint", "set gaussians.depthsplat.checkpoint to the "
                                "authors' .pth file or a .safetensors copy")


def expected_state_dict(model: str) -> dict[str, Tensor]:
    """The encoder's state dict for ``model`` (names and shapes only: built on the meta device, no memory)."""
    with torch.device("meta"):
        return DepthSplatEncoder(MODELS[model]).state_dict()


def infer_model(state_dict: Mapping[str, Tensor]) -> str | None:
    """The configuration of :data:`MODELS` whose keys and shapes ``state_dict`` (encoder names) matches exactly, or
    None."""
    for name in MODELS:
        expected = expected_state_dict(name)
        if expected.keys() == state_dict.keys() and all(
            state_dict[key].shape == value.shape for key, value in expected.items()
        ):
            return name
    return None


def nearest_model(state_dict: Mapping[str, Tensor]) -> str:
    """The RE10K model of the same DINOv2 size (``small`` if that cannot be told): the one whose differences a
    failed strict load lists."""
    position = state_dict.get(DINOV2_POSITION_KEY)
    return MODEL_BY_VIT_WIDTH.get(position.shape[-1], "small") if position is not None else "small"


def load_state_dict_strict(encoder: DepthSplatEncoder, state_dict: Mapping[str, Tensor], source: str) -> None:
    """:func:`~snd_stages.reconstruct.mvsplat.checkpoint.load_encoder_strict` for DepthSplat's encoder (a float16
    checkpoint loads as float32)."""
    load_encoder_strict(encoder, state_dict, source, "the DepthSplat encoder", RELEASED)


def load_depthsplat_encoder(
    path: Path, device: torch.device | str = "cpu", model: str = "auto"
) -> DepthSplatEncoder:
    """Build the encoder for ``model`` (``auto``: the configuration the file's shapes match, else the nearest one,
    whose differences the error lists), load ``path`` strictly, and return it in eval mode on ``device``."""
    state_dict = read_depthsplat_checkpoint(Path(path))
    source = f"DepthSplat checkpoint {path}"
    if model == "auto":
        converted = convert_mvsplat_state_dict(state_dict)[0]
        model = infer_model(converted) or nearest_model(converted)
    encoder = DepthSplatEncoder(MODELS[model])
    load_state_dict_strict(encoder, state_dict, source)
    return encoder.to(device).eval()
