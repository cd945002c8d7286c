"""The ``depthsplat`` reconstructor: DepthSplat's encoder (Xu et al., CVPR 2025) in plain torch, loading the
authors' checkpoints strictly.

Modules, in the order the data flows:

- :mod:`.monocular`: DINOv2 (timm's architecture, DINOv2's position-embedding resize) and its four token maps;
- :mod:`.depth_predictor`: UniMatch's CNN, the multi-view transformer and the cost volume (MVSplat's modules),
  the pre-norm U-Net, the depth head and the DPT depth residual;
- :mod:`.dpt`: the two DPT heads;
- :mod:`.gaussian_adapter`: depth, image and raw channels -> Gaussians (DepthSplat's conventions);
- :mod:`.encoder`: the whole encoder and the released configurations (:data:`MODELS`);
- :mod:`.checkpoint`: reading the authors' ``.pth`` (or a safetensors copy), inferring the configuration, strict
  loading;
- the boundary, our cameras in and our :class:`~snd_stages.gaussians.Gaussians` out, is MVSplat's
  (:func:`reconstruct_pair`, :func:`encoder_inputs`): the same inputs, and the same camera-frame xyzw rotations
  to turn into world-frame wxyz quaternions.

It reproduces the official code (cvg/depthsplat) to float32 noise for the small model; the parity test
(``tests/test_depthsplat.py``) checks every stage against outputs of the official code.

Usage::

    encoder = load_depthsplat_encoder(Path("checkpoints/depthsplat-gs-small-re10k-256x256-view2-cfeab6b1.pth"))
    result = reconstruct_pair(encoder, images, camera, near=0.5, far=100.0)  # images [2, H, W, 3] uint8
    result.gaussians, result.depth
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# The package's names, imported on first use: the encoder needs timm (DINOv2), which its settings, imported by every
# stage through the reconstructors' registry, do not; `snd precompute-gaussians` starts a second sooner without it.
_EXPORTS = {
    "MODELS": ".encoder",
    "DepthSplatEncoder": ".encoder",
    "DepthSplatOutput": ".encoder",
    "encoder_inputs": "..mvsplat.reconstructor",
    "infer_model": ".checkpoint",
    "load_depthsplat_encoder": ".checkpoint",
    "load_state_dict_strict": ".checkpoint",
    "read_depthsplat_checkpoint": ".checkpoint",
    "reconstruct_pair": "..mvsplat.reconstructor",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from ..mvsplat.reconstructor import encoder_inputs, reconstruct_pair
    from .checkpoint import infer_model, load_depthsplat_encoder, load_state_dict_strict, read_depthsplat_checkpoint
    from .encoder import MODELS, DepthSplatEncoder, DepthSplatOutput


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
