"""MVSplat's feature backbone: a stride-4 CNN (UniMatch's encoder) and a multi-view Swin transformer (GMFlow's).

Both views go through the same CNN; the transformer then alternates, six times, window self-attention within
a view with window cross-attention to the other view. Attribute names follow the official module tree
(``backbone.backbone.*`` for the CNN, ``backbone.transformer.layers.*``), so checkpoint keys map one to one.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

# The CNN was pretrained (GMFlow/UniMatch) on ImageNet-normalised images; MVSplat keeps that input contract.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Swin's masking value: large enough to zero a softmax weight, small enough to stay finite in float16.
SHIFTED_WINDOW_MASK_VALUE = -100.0


def imagenet_normalise(images: Float[Tensor, "*batch 3 H W"]) -> Float[Tensor, "*batch 3 H W"]:
    """RGB in [0, 1] -> ImageNet-normalised, the input both UniMatch's CNN and DINOv2 were trained on."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).reshape(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).reshape(3, 1, 1)
    return (images - mean) / std


# ---------------------------------------------------------------------------------------------------------------
# CNN


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions (no bias) with instance norm and ReLU; a strided 1x1 projection where shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        # Instance norms carry no parameters: they never appear in a state dict.
        self.norm1 = nn.InstanceNorm2d(out_channels)
        self.norm2 = nn.InstanceNorm2d(out_channels)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride), nn.InstanceNorm2d(out_channels)
            )

    def forward(self, x: Float[Tensor, "N C H W"]) -> Float[Tensor, "N C2 H2 W2"]:
        y = F.relu(self.norm1(self.conv1(x)))
        y = F.relu(self.norm2(self.conv2(y)))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + y)


class CNNEncoder(nn.Module):
    """UniMatch's CNN: a 7x7/2 stem, three stages of two residual blocks (64, 96, 128 channels), a 1x1 projection.

    Args:
        output_channels: width of the 1x1 projection.
        stage_strides: strides of the second and third stages. MVSplat strides the second, (2, 1), for features at
            1/4; DepthSplat strides the third, (1, 2), keeping 1/2 after the second stage, or both, (2, 2), for
            features at 1/8. The weights have the same shapes in every case.
    """

    def __init__(self, output_channels: int = 128, stage_strides: tuple[int, int] = (2, 1)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.norm1 = nn.InstanceNorm2d(64)
        self.layer1 = nn.Sequential(ResidualBlock(64, 64), ResidualBlock(64, 64))
        self.layer2 = nn.Sequential(ResidualBlock(64, 96, stride=stage_strides[0]), ResidualBlock(96, 96))
        self.layer3 = nn.Sequential(ResidualBlock(96, 128, stride=stage_strides[1]), ResidualBlock(128, 128))
        self.conv2 = nn.Conv2d(128, output_channels, 1)

    def stages(self, images: Float[Tensor, "N 3 H W"]) -> tuple[Tensor, Tensor, Tensor]:
        """The outputs of the first and second stages and the projected output of the third."""
        first = self.layer1(F.relu(self.norm1(self.conv1(images))))
        second = self.layer2(first)
        return first, second, self.conv2(self.layer3(second))

    def forward(self, images: Float[Tensor, "N 3 H W"]) -> Float[Tensor, "N C h w"]:
        return self.stages(images)[2]


# ---------------------------------------------------------------------------------------------------------------
# Windows and position embedding


def split_windows(x: Float[Tensor, "N H W C"], splits: int) -> Float[Tensor, "NW h w C"]:
    """Cut channels-last maps into ``splits x splits`` windows, window index fastest: ``n * K * K + i * K + j``."""
    n, h, w, c = x.shape
    x = x.reshape(n, splits, h // splits, splits, w // splits, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n * splits * splits, h // splits, w // splits, c)


def merge_windows(x: Float[Tensor, "NW h w C"], splits: int) -> Float[Tensor, "N H W C"]:
    """The inverse of :func:`split_windows`."""
    nkk, h, w, c = x.shape
    n = nkk // (splits * splits)
    x = x.reshape(n, splits, splits, h, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, splits * h, splits * w, c)


def window_position_embedding(
    height: int, width: int, channels: int, device: torch.device | None = None
) -> Float[Tensor, "C height width"]:
    """DETR's normalised sine embedding of one window: rows in the first half of the channels, columns after.

    Pixel (i, j) has angles y = (i + 1) / (height + 1e-6) * 2 pi and x = (j + 1) / (width + 1e-6) * 2 pi; channel
    pairs (sin, cos) of y / t_m, then of x / t_m, with t_m = 10000^(2m / (channels / 2)).
    """
    features = channels // 2
    scale = 2 * math.pi
    # The cumulative sums and the float32 eps (which vanishes next to the window size) mirror the reference.
    ones = torch.ones(1, height, width, device=device)
    y_embed = ones.cumsum(1, dtype=torch.float32)
    x_embed = ones.cumsum(2, dtype=torch.float32)
    y_embed = y_embed / (y_embed[:, -1:, :] + 1e-6) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + 1e-6) * scale
    dim_t = torch.arange(features, dtype=torch.float32, device=device)
    dim_t = 10000 ** (2 * (dim_t // 2) / features)
    pos_x = x_embed[:, :, :, None] / dim_t
    pos_y = y_embed[:, :, :, None] / dim_t
    pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)[0]


def shifted_window_mask(
    height: int, width: int, splits: int, device: torch.device | None = None
) -> Float[Tensor, "KK T T"]:
    """Swin's attention mask for windows rolled by half a window: -100 between pixels of different regions.

    After rolling by (-h/2K, -w/2K), each window may hold pixels that were not adjacent in the image. The regions
    are the 3 x 3 products of the row slices [0, h - wh), [h - wh, h - wh/2), [h - wh/2, h) and the same columns.
    """
    window_h, window_w = height // splits, width // splits
    shift_h, shift_w = window_h // 2, window_w // 2
    regions = torch.zeros(1, height, width, 1, device=device)
    label = 0
    for rows in (slice(0, -window_h), slice(-window_h, -shift_h), slice(-shift_h, None)):
        for cols in (slice(0, -window_w), slice(-window_w, -shift_w), slice(-shift_w, None)):
            regions[:, rows, cols, :] = label
            label += 1
    windows = split_windows(regions, splits).reshape(-1, window_h * window_w)
    difference = windows.unsqueeze(1) - windows.unsqueeze(2)
    return difference.masked_fill(difference != 0, SHIFTED_WINDOW_MASK_VALUE).masked_fill(difference == 0, 0.0)


def window_attention(
    q: Float[Tensor, "N H W C"],
    k: Float[Tensor, "N H W C"],
    v: Float[Tensor, "N H W C"],
    splits: int,
    shift_mask: Float[Tensor, "KK T T"] | None,
) -> Float[Tensor, "N H W C"]:
    """Single-head attention within ``splits x splits`` windows, shifted by half a window when a mask is given.

    The scale is 1/sqrt(C) of the full width (one head).
    """
    n, h, w, c = q.shape
    if shift_mask is not None:
        shift = (-(h // splits // 2), -(w // splits // 2))
        q, k, v = (torch.roll(t, shifts=shift, dims=(1, 2)) for t in (q, k, v))
    windows = n * splits * splits
    q_w = split_windows(q, splits).reshape(windows, -1, c)
    k_w = split_windows(k, splits).reshape(windows, -1, c)
    v_w = split_windows(v, splits).reshape(windows, -1, c)
    scores = torch.matmul(q_w, k_w.transpose(1, 2)) / (c**0.5)  # [N*K*K, T, T]
    if shift_mask is not None:
        scores = scores + shift_mask.repeat(n, 1, 1)
    out = torch.matmul(torch.softmax(scores, dim=-1), v_w)
    out = merge_windows(out.reshape(windows, h // splits, w // splits, c), splits)
    if shift_mask is not None:
        out = torch.roll(out, shifts=(h // splits // 2, w // splits // 2), dims=(1, 2))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Transformer


class TransformerLayer(nn.Module):
    """Window attention from ``source`` to ``target``, post-norm message, optional FFN on [source; message]."""

    def __init__(self, channels: int = 128, ffn: bool = True, ffn_expansion: int = 4) -> None:
        super().__init__()
        self.q_proj = nn.Linear(channels, channels, bias=False)
        self.k_proj = nn.Linear(channels, channels, bias=False)
        self.v_proj = nn.Linear(channels, channels, bias=False)
        self.merge = nn.Linear(channels, channels, bias=False)
        self.norm1 = nn.LayerNorm(channels)
        self.mlp: nn.Sequential | None = None
        if ffn:
            hidden = 2 * channels * ffn_expansion
            self.mlp = nn.Sequential(
                nn.Linear(2 * channels, hidden, bias=False), nn.GELU(), nn.Linear(hidden, channels, bias=False)
            )
            self.norm2 = nn.LayerNorm(channels)

    def forward(
        self,
        source: Float[Tensor, "N H W C"],
        target: Float[Tensor, "N H W C"],
        splits: int,
        shift_mask: Float[Tensor, "KK T T"] | None,
    ) -> Float[Tensor, "N H W C"]:
        message = window_attention(self.q_proj(source), self.k_proj(target), self.v_proj(target), splits, shift_mask)
        message = self.norm1(self.merge(message))
        if self.mlp is not None:
            message = self.norm2(self.mlp(torch.cat([source, message], dim=-1)))
        return source + message


class TransformerBlock(nn.Module):
    """Self-attention (no FFN), then cross-attention to the other view with an FFN."""

    def __init__(self, channels: int = 128, ffn_expansion: int = 4, shifted: bool = False) -> None:
        super().__init__()
        self.shifted = shifted
        self.self_attn = TransformerLayer(channels, ffn=False, ffn_expansion=ffn_expansion)
        self.cross_attn_ffn = TransformerLayer(channels, ffn=True, ffn_expansion=ffn_expansion)

    def forward(
        self, source: Float[Tensor, "N H W C"], target: Float[Tensor, "N H W C"], splits: int, shift_mask: Tensor
    ) -> Float[Tensor, "N H W C"]:
        mask = shift_mask if self.shifted else None
        source = self.self_attn(source, source, splits, mask)
        return self.cross_attn_ffn(source, target, splits, mask)


class MultiViewTransformer(nn.Module):
    """Six blocks over two views; odd blocks use shifted windows (Swin)."""

    def __init__(self, layers: int = 6, channels: int = 128, ffn_expansion: int = 4) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [TransformerBlock(channels, ffn_expansion, shifted=index % 2 == 1) for index in range(layers)]
        )

    def forward(self, features: Float[Tensor, "B 2 C h w"], splits: int) -> Float[Tensor, "B 2 C h w"]:
        b, views, c, h, w = features.shape
        assert views == 2, f"the multi-view transformer is built for 2 views, got {views}"
        mask = shifted_window_mask(h, w, splits, device=features.device)
        x = features.permute(0, 1, 3, 4, 2)  # [B, 2, h, w, C]
        for layer in self.layers:
            # Cross-attention reads the other view as it entered this block, before its self-attention.
            other = x.flip(1)
            x = layer(x.reshape(b * views, h, w, c), other.reshape(b * views, h, w, c), splits, mask)
            x = x.reshape(b, views, h, w, c)
        return x.permute(0, 1, 4, 2, 3).contiguous()


class BackboneMultiview(nn.Module):
    """Images in [0, 1] -> (transformer features, CNN features), both ``[B, V, C, H/4, W/4]``."""

    def __init__(self, feature_channels: int = 128, transformer_layers: int = 6, ffn_expansion: int = 4) -> None:
        super().__init__()
        self.feature_channels = feature_channels
        self.backbone = CNNEncoder(feature_channels)
        self.transformer = MultiViewTransformer(transformer_layers, feature_channels, ffn_expansion)

    def forward(
        self, images: Float[Tensor, "B V 3 H W"], splits: int = 2, intermediates: dict[str, Tensor] | None = None
    ) -> tuple[Float[Tensor, "B V C h w"], Float[Tensor, "B V C h w"]]:
        """Args:
            images: raw RGB in [0, 1]; ImageNet normalisation happens here.
            splits: attention windows per side (2 -> 2 x 2 windows of (H/8) x (W/8) feature pixels).
            intermediates: filled with ``cnn_features``, ``position_embedding`` and ``trans_features`` if given.
        """
        b, v = images.shape[:2]
        cnn_features = self.backbone(imagenet_normalise(images).flatten(0, 1))
        cnn_features = cnn_features.reshape(b, v, *cnn_features.shape[1:])
        trans_features = attend_across_views(self.transformer, cnn_features, splits, intermediates)
        if intermediates is not None:
            intermediates.update(cnn_features=cnn_features)
        return trans_features, cnn_features


def attend_across_views(
    transformer: MultiViewTransformer,
    cnn_features: Float[Tensor, "B V C h w"],
    splits: int,
    intermediates: dict[str, Tensor] | None = None,
) -> Float[Tensor, "B V C h w"]:
    """The window position embedding added to the CNN features, then the multi-view transformer.

    ``intermediates``, if given, gets ``position_embedding`` (one window, ``[C, h/splits, w/splits]``) and
    ``trans_features``.
    """
    c, h, w = cnn_features.shape[-3:]
    # The same embedding is added to every window of every view: positions are window-relative.
    position = window_position_embedding(h // splits, w // splits, c, cnn_features.device)
    trans_features = transformer(cnn_features + position.repeat(1, splits, splits), splits)
    if intermediates is not None:
        intermediates.update(position_embedding=position, trans_features=trans_features)
    return trans_features
