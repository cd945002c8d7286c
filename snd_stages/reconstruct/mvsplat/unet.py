"""LDM's U-Net without time embedding, as MVSplat (twice, post-norm) and DepthSplat (pre-norm) use it.

Attention blocks attend jointly over both views' tokens. Attribute names and the index layout of
``input_blocks`` / ``middle_block`` / ``output_blocks`` / ``out`` follow the official module tree, so checkpoint
keys map one to one (``middle_block.1`` is an identity: the official tree keeps a slot for a cross-attention
block that this configuration does not use).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor


def group_norm(channels: int) -> nn.GroupNorm:
    """LDM's normalisation as MVSplat patched it: 8 groups, or 4 where the width is not a multiple of 8."""
    return nn.GroupNorm(8 if channels % 8 == 0 else 4, channels)


class ResBlock(nn.Module):
    """Residual block of two 3x3 convolutions with group norm and SiLU.

    Post-norm (MVSplat): ``skip(x) + SiLU(GN(conv(SiLU(GN(conv(x))))))``. Pre-norm (LDM's original, DepthSplat):
    ``skip(x) + conv(SiLU(GN(conv(SiLU(GN(x))))))``; its ``out_layers`` keep LDM's (parameter-free) dropout slot
    so that the convolution sits at index 3, as in the checkpoints.
    """

    def __init__(self, channels: int, out_channels: int | None = None, pre_norm: bool = False) -> None:
        super().__init__()
        out_channels = out_channels or channels
        if pre_norm:
            self.in_layers = nn.Sequential(
                group_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
            )
            self.out_layers = nn.Sequential(
                group_norm(out_channels), nn.SiLU(), nn.Dropout(0.0),
                nn.Conv2d(out_channels, out_channels, 3, padding=1),
            )
        else:
            self.in_layers = nn.Sequential(
                nn.Conv2d(channels, out_channels, 3, padding=1), group_norm(out_channels), nn.SiLU()
            )
            self.out_layers = nn.Sequential(
                nn.Conv2d(out_channels, out_channels, 3, padding=1), group_norm(out_channels), nn.SiLU()
            )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Float[Tensor, "N C H W"]) -> Float[Tensor, "N C2 H W"]:
        return self.skip_connection(x) + self.out_layers(self.in_layers(x))


class CrossViewAttentionBlock(nn.Module):
    """Self-attention over the tokens of all views of a sample.

    Post-norm (MVSplat): ``x + GN(proj(attention(qkv(x))))``; pre-norm (DepthSplat):
    ``x + proj(attention(qkv(GN(x))))``. Heads are ``head_channels`` wide. The channel layout is the legacy one
    (split heads, then q/k/v): head ``k`` reads its queries from channels ``[3 k d, 3 k d + d)``, keys from the
    next ``d`` and values from the next ``d`` of the ``qkv`` projection, with ``d = head_channels``. The softmax
    scale 1/sqrt(d) is applied as d^(-1/4) to both queries and keys, as in the reference.
    """

    def __init__(self, channels: int, views: int, head_channels: int = 32, pre_norm: bool = False) -> None:
        super().__init__()
        assert channels % head_channels == 0, (channels, head_channels)
        self.views = views
        self.pre_norm = pre_norm
        self.heads = channels // head_channels
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)
        self.norm = group_norm(channels)

    def forward(self, x: Float[Tensor, "BV C H W"]) -> Float[Tensor, "BV C H W"]:
        bv, c, *spatial = x.shape
        b, v = bv // self.views, self.views
        tokens = x.reshape(bv, c, -1)
        t = tokens.shape[-1]
        # Fold the views into the token axis: view 0's tokens, then view 1's, attend jointly.
        qkv = self.qkv(self.norm(tokens) if self.pre_norm else tokens)
        qkv = qkv.reshape(b, v, 3 * c, t).permute(0, 2, 1, 3).reshape(b, 3 * c, v * t)
        head_channels = c // self.heads
        q, k, values = qkv.reshape(b * self.heads, 3 * head_channels, v * t).split(head_channels, dim=1)
        scale = 1 / math.sqrt(math.sqrt(head_channels))
        weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
        attended = torch.einsum("bts,bcs->bct", weight, values).reshape(b, c, v, t)
        attended = self.proj_out(attended.permute(0, 2, 1, 3).reshape(bv, c, t))
        return (tokens + (attended if self.pre_norm else self.norm(attended))).reshape(bv, c, *spatial)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Float[Tensor, "N C H W"]) -> Float[Tensor, "N C H2 W2"]:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Float[Tensor, "N C H W"]) -> Float[Tensor, "N C H2 W2"]:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNet(nn.Module):
    """``levels`` levels of one ResBlock each, all ``channels`` wide; attention where the downsample rate is in
    ``attention_rates``. Inputs must be divisible by 2^(levels - 1).

    Args:
        channels: width of every level (all channel multipliers are 1 in MVSplat's configurations).
        levels: number of resolutions.
        attention_rates: downsample rates (1, 2, 4, ...) whose blocks get cross-view attention.
        views: views per sample, folded together in attention; inputs are ``[B * views, ...]``, views fastest.
        head_channels: attention head width.
        pre_norm: LDM's pre-norm blocks and output (DepthSplat) instead of MVSplat's post-norm ones.
    """

    def __init__(
        self,
        channels: int,
        levels: int,
        attention_rates: tuple[int, ...],
        views: int,
        head_channels: int = 32,
        pre_norm: bool = False,
    ) -> None:
        super().__init__()

        def block(in_channels: int, rate: int) -> list[nn.Module]:
            layers: list[nn.Module] = [ResBlock(in_channels, channels, pre_norm)]
            if rate in attention_rates:
                layers.append(CrossViewAttentionBlock(channels, views, head_channels, pre_norm))
            return layers

        self.input_blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1))])
        for level in range(levels):
            self.input_blocks.append(nn.Sequential(*block(channels, 2**level)))
            if level != levels - 1:
                self.input_blocks.append(nn.Sequential(Downsample(channels)))
        self.middle_block = nn.Sequential(
            ResBlock(channels, pre_norm=pre_norm), nn.Identity(), ResBlock(channels, pre_norm=pre_norm)
        )
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(levels)):
            for index in range(2):
                layers = block(2 * channels, 2**level)  # every skip is `channels` wide
                if level and index == 1:
                    layers.append(Upsample(channels))
                self.output_blocks.append(nn.Sequential(*layers))
        if pre_norm:
            self.out = nn.Sequential(group_norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))
        else:
            self.out = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), group_norm(channels), nn.SiLU())

    def forward(self, x: Float[Tensor, "N C H W"]) -> Float[Tensor, "N C H W"]:
        skips = []
        for module in self.input_blocks:
            x = module(x)
            skips.append(x)
        x = self.middle_block(x)
        for module in self.output_blocks:
            x = module(torch.cat([x, skips.pop()], dim=1))
        return self.out(x)
