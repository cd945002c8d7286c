"""The ``mvsplat`` reconstructor: MVSplat's encoder (Chen et al., ECCV 2024) in plain torch, loading the
authors' RE10K checkpoint strictly.

Modules, in the order the data flows:

- :mod:`.backbone`: stride-4 CNN and the two-view Swin transformer;
- :mod:`.cost_volume`: plane-sweep correlation between the views;
- :mod:`.unet`: the post-norm U-Net with cross-view attention (cost-volume and depth refinement);
- :mod:`.depth_predictor`: coarse depth, refinement and the per-pixel Gaussian head;
- :mod:`.gaussian_adapter`: depth and raw channels -> Gaussians (MVSplat's conventions and quirks);
- :mod:`.encoder`: the whole encoder, with optional stage-by-stage intermediates;
- :mod:`.checkpoint`: reading ``re10k.ckpt`` (or a safetensors copy) and strict loading;
- :mod:`.reconstructor`: our cameras in, our :class:`~snd_stages.gaussians.Gaussians` out.

It reproduces the official code (donydchen/mvsplat, RE10K configuration) to float32 noise; the parity test
(``tests/test_mvsplat.py``) checks every stage against outputs of the official code.

Usage::

    encoder = load_mvsplat_encoder(Path("checkpoints/re10k.ckpt"), device="cuda")
    result = reconstruct_pair(encoder, images, camera, near=1.0, far=100.0)  # images [2, H, W, 3] uint8
    result.gaussians, result.depth
"""

from .checkpoint import load_mvsplat_encoder, load_state_dict_strict, read_mvsplat_checkpoint
from .encoder import SIZE_MULTIPLE, MVSplatEncoder, MVSplatOutput
from .reconstructor import MVSplatReconstruction, check_context_size, encoder_inputs, reconstruct_pair, to_gaussians

__all__ = [
    "SIZE_MULTIPLE",
    "MVSplatEncoder",
    "MVSplatOutput",
    "MVSplatReconstruction",
    "check_context_size",
    "encoder_inputs",
    "load_mvsplat_encoder",
    "load_state_dict_strict",
    "read_mvsplat_checkpoint",
    "reconstruct_pair",
    "to_gaussians",
]
