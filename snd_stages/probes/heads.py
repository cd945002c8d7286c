"""Trainable probe heads on frozen features, and their losses (``reference/method.md`` §2).

All heads read frozen dense features ``[B, C, h, w]`` (patch-token grids); concatenating a broadcast CLS token is
the caller's job (:mod:`snd_stages.probes.backbone` does it).

- :class:`DepthBinHead`: FiT3D's "linear" depth head (DINOv2's ``BNHead`` without BN): bilinear ×4, 1×1 conv to
  256 bin logits, AdaBins "linear" normalisation, expected depth over uniform bins. Trained with
  :func:`sig_loss` + 0.5 · :func:`gradient_loss`.
- :class:`DenseDepthProbe`: Probe3D's multi-block DPT-like probe (:class:`DenseProbe`) with the same bin output.
- :class:`NormalHead`: SnD's linear normal probe (bilinear ×4, 1×1 conv to xyz + κ), trained with
  :func:`uncertainty_angular_loss` (Bae et al., ICCV 2021, as in Probe3D).
- :class:`SegmentationHead`: FiT3D's segmentation ``BNHead`` (dropout 0 and a 1×1 conv at token resolution),
  trained with :func:`segmentation_loss`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .resize import resize, upsample

SIG_MEAN_WEIGHT = 0.15
DEPTH_EPS = 1e-3
PROBABILITY_FLOOR = 0.1


def bin_centres(bins: int, min_depth: float, max_depth: float) -> Tensor:
    """Depth values of the bins: ``linspace(min_depth, max_depth, bins)``, used directly as the centres.

    This is DINOv2/FiT3D's and Probe3D's "UD" strategy (both ends included), not AdaBins' midpoints.

    Returns:
        ``[bins]`` float32.
    """
    return torch.linspace(min_depth, max_depth, bins)


def bins_to_depth(logits: Tensor, centres: Tensor) -> Tensor:
    """Expected depth under AdaBins' "linear" normalisation of bin logits.

    ``p_k = (ReLU(z_k) + 0.1) / Σ_j (ReLU(z_j) + 0.1)``, ``depth = Σ_k p_k · centre_k``.

    Args:
        logits: ``[B, K, H, W]`` bin logits.
        centres: ``[K]`` bin depths.

    Returns:
        ``[B, 1, H, W]`` depth.
    """
    weights = F.relu(logits) + PROBABILITY_FLOOR
    probability = weights / weights.sum(dim=1, keepdim=True)
    return torch.einsum("bkhw,k->bhw", probability, centres.to(logits.dtype)).unsqueeze(1)


class DepthBinHead(nn.Module):
    """FiT3D's linear depth probe: bilinear ×``upsample`` (align_corners False), 1×1 conv to bins, expected depth.

    Args:
        in_channels: feature channels (2C when the CLS token is concatenated).
        bins: number of depth bins (256 in the protocol).
        min_depth: depth of the first bin (1e-3).
        max_depth: depth of the last bin (data set's max depth: 10 m NYU/ScanNet, 20 m ScanNet++, 80 m KITTI).
        upsample: feature upsampling before the conv (4).
    """

    def __init__(
        self, in_channels: int, bins: int = 256, min_depth: float = 1e-3, max_depth: float = 10.0, upsample: int = 4
    ):
        super().__init__()
        self.upsample = upsample
        self.conv = nn.Conv2d(in_channels, bins, kernel_size=1)
        self.register_buffer("centres", bin_centres(bins, min_depth, max_depth), persistent=False)

    def logits(self, features: Tensor) -> Tensor:
        """``[B, C, h, w]`` → ``[B, bins, h·upsample, w·upsample]`` bin logits.

        The 1×1 conv runs before the bilinear upsampling, not after: both are linear and bilinear weights sum to 1,
        so the order changes nothing but rounding, and the conv then costs ``upsample²`` times less.
        """
        return upsample(self.conv(features), self.upsample)

    def forward(self, features: Tensor) -> Tensor:
        """``[B, C, h, w]`` features → ``[B, 1, h·upsample, w·upsample]`` metric depth.

        Resize the result bilinearly to the label size before the loss and metrics (as the protocol does).
        """
        return bins_to_depth(self.logits(features), self.centres)


def sig_loss(
    pred: Tensor,
    target: Tensor,
    valid: Tensor,
    warmup: bool = False,
    mean_weight: float = SIG_MEAN_WEIGHT,
    eps: float = DEPTH_EPS,
) -> Tensor:
    """FiT3D's (DINOv2 depth toolbox) SigLoss over all valid pixels of the batch, pooled.

    ``g = ln(pred + eps) − ln(target + eps)`` at the valid pixels; the loss is
    ``sqrt(Var(g) + 0.15 · mean(g)²)`` with the unbiased variance (``torch.var``). During the warm-up (the first
    100 iterations in the protocol; pass ``warmup=iteration < 100``) only the mean term is used:
    ``sqrt(0.15 · mean(g)²)``. The mean term makes the loss scale-aware: a constant factor ``s`` (with eps = 0)
    gives ``sqrt(0.15) · |ln s|``. Probe3D's variant (``sqrt(mean g² − 0.85 mean(g)²)``, ×10) is not this one.

    Args:
        pred: ``[...]`` predicted depth (any shape, e.g. ``[B, 1, H, W]``).
        target: ``[...]`` ground truth, same shape.
        valid: ``[...]`` bool, same shape.
        warmup: use only the mean term.
        mean_weight: weight of ``mean(g)²`` (0.15).
        eps: added inside the logs (1e-3).

    Returns:
        scalar loss (0 with a zero gradient when no pixel is valid).
    """
    # Masked sums rather than a gather of the valid pixels: no data-dependent shapes or branches, so the probes can
    # fit several seeds at once under torch.func.vmap. Invalid pixels are replaced before the logs, so that a 0 or
    # negative value there cannot leak NaNs into the gradient.
    valid = valid.bool()
    count = valid.sum()
    g = torch.where(valid, torch.log(torch.where(valid, pred, 1.0) + eps) - torch.log(torch.where(valid, target, 1.0)
                                                                                        + eps), 0.0)
    mean = g.sum() / count.clamp(min=1)
    squared = mean_weight * mean.pow(2)
    if not warmup:
        variance = torch.where(valid, g - mean, 0.0).pow(2).sum() / (count - 1).clamp(min=1)  # unbiased, as torch.var
        squared = torch.where(count >= 2, squared + variance, squared)
    # 0 with a zero gradient when no pixel is valid (sqrt's gradient at 0 would be infinite)
    return torch.where(count > 0, torch.sqrt(torch.where(count > 0, squared, 1.0)), 0.0)


def gradient_loss(pred: Tensor, target: Tensor, valid: Tensor, eps: float = DEPTH_EPS) -> Tensor:
    """FiT3D's (DINOv2 depth toolbox, after MegaDepth) multi-scale gradient loss on log depth.

    At 4 scales, subsampling the image with strides 1, 2, 4, 6, with ``d = (ln(pred + eps) − ln(target + eps))``
    zeroed at invalid pixels, it adds ``(Σ |d[i, j] − d[i + 2, j]| + Σ |d[i, j] − d[i, j + 2]|) / N`` over pairs of
    valid pixels two apart, ``N`` = valid pixels at that scale. Sums run over the last two (image) dimensions and
    over any leading batch dimensions together. (The original toolbox code slices ``[B, 1, H, W]`` tensors on their
    first two dimensions, i.e. batch and channel; here the image dimensions are sliced, as intended and as Probe3D
    does.)

    Args:
        pred: ``[..., H, W]`` predicted depth.
        target: ``[..., H, W]`` ground truth.
        valid: ``[..., H, W]`` bool.
        eps: added inside the logs.

    Returns:
        scalar loss.
    """
    total = pred.new_zeros(())
    for stride in (1, 2, 4, 6):
        keep = valid[..., ::stride, ::stride].bool()
        # invalid pixels are replaced before the log, so that a 0 or negative value there cannot leak NaNs
        p = torch.where(keep, pred[..., ::stride, ::stride], 1.0)
        t = torch.where(keep, target[..., ::stride, ::stride], 1.0)
        mask = keep.to(pred.dtype)
        count = mask.sum().clamp(min=1.0)
        diff = (torch.log(p + eps) - torch.log(t + eps)) * mask
        vertical = (diff[..., :-2, :] - diff[..., 2:, :]).abs() * mask[..., :-2, :] * mask[..., 2:, :]
        horizontal = (diff[..., :, :-2] - diff[..., :, 2:]).abs() * mask[..., :, :-2] * mask[..., :, 2:]
        total = total + (vertical.sum() + horizontal.sum()) / count
    return total


def depth_loss(pred: Tensor, target: Tensor, valid: Tensor, warmup: bool = False) -> Tensor:
    """The linear depth probe's objective: ``sig_loss + 0.5 · gradient_loss`` (shapes as :func:`gradient_loss`)."""
    return sig_loss(pred, target, valid, warmup=warmup) + 0.5 * gradient_loss(pred, target, valid)


class ResidualConvUnit(nn.Module):
    """``x + ReLU(conv(ReLU(conv(x))))`` with ``kernel_size`` convs keeping the channels (Probe3D's order)."""

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2),
            nn.ReLU(),
            nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2),
            nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class FusionBlock(nn.Module):
    """DPT fusion: ``refine(residual(x) + coarser)``, or ``refine(x)`` for the deepest block."""

    def __init__(self, channels: int, kernel_size: int = 3, with_skip: bool = True):
        super().__init__()
        self.residual = ResidualConvUnit(channels, kernel_size) if with_skip else None
        self.refine = ResidualConvUnit(channels, kernel_size)

    def forward(self, x: Tensor, coarser: Tensor | None = None) -> Tensor:
        if coarser is not None:
            if self.residual is None:
                raise ValueError("this fusion block takes no coarser input")
            x = self.residual(x) + coarser
        return self.refine(x)


class DenseProbe(nn.Module):
    """Probe3D's multi-block DPT-like dense probe, compactly.

    Every block's tokens get a 1×1 projection to ``hidden`` channels and a ×2 bilinear upsampling (all blocks of a
    ViT share one grid); fusion runs from the deepest block to the shallowest, each step adding a residual-conv
    refinement of the shallower block to the running map; the fused map is upsampled ×4, passed through
    conv3×3-ReLU-conv3×3 to ``out_channels`` and upsampled ×2, i.e. ×16 the token grid overall. Resize the output to
    the label size. Upsampling is bilinear (align_corners False), as Probe3D after its PR #20 (before it was
    nearest-neighbour).

    Args:
        in_channels: channels of each block's features, shallow to deep (Probe3D: 4 blocks).
        out_channels: output channels (bins for depth, 4 for normals).
        hidden: projection width (512 in Probe3D).
        kernel_size: residual conv kernel (3).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int, hidden: int = 512, kernel_size: int = 3):
        super().__init__()
        if len(in_channels) < 1:
            raise ValueError("need at least one block")
        self.projections = nn.ModuleList(nn.Conv2d(channels, hidden, kernel_size=1) for channels in in_channels)
        self.fusions = nn.ModuleList(
            FusionBlock(hidden, kernel_size, with_skip=index < len(in_channels) - 1)
            for index in range(len(in_channels))
        )
        self.output = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, out_channels, 3, padding=1)
        )

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """``len(in_channels)`` maps ``[B, C_i, h, w]`` (shallow to deep) → ``[B, out_channels, 16h, 16w]``."""
        if len(features) != len(self.projections):
            raise ValueError(f"expected {len(self.projections)} feature maps, got {len(features)}")
        maps = [upsample(projection(x), 2) for projection, x in zip(self.projections, features)]
        fused = None
        for index in reversed(range(len(maps))):
            fused = self.fusions[index](maps[index], fused)
        return upsample(self.output(upsample(fused, 4)), 2)


class DenseDepthProbe(nn.Module):
    """Probe3D's depth probe: :class:`DenseProbe` to bin logits, then :func:`bins_to_depth` (its "bindepth").

    Probe3D trains it with ``10 · SigLoss(σ = 0.85) + 0.5 · gradient loss``; :func:`sig_loss` here is FiT3D's form.

    Args:
        in_channels: channels of each block's features, shallow to deep.
        bins: number of uniform bins (256).
        min_depth: first bin (1e-3).
        max_depth: last bin (10 m for NYU; 1 for NAVI's normalised depth).
        hidden: decoder width (512).
        kernel_size: residual conv kernel (3).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        bins: int = 256,
        min_depth: float = 1e-3,
        max_depth: float = 10.0,
        hidden: int = 512,
        kernel_size: int = 3,
    ):
        super().__init__()
        self.decoder = DenseProbe(in_channels, bins, hidden=hidden, kernel_size=kernel_size)
        self.register_buffer("centres", bin_centres(bins, min_depth, max_depth), persistent=False)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """Maps ``[B, C_i, h, w]`` → ``[B, 1, 16h, 16w]`` metric depth."""
        return bins_to_depth(self.decoder(features), self.centres)


class NormalHead(nn.Module):
    """SnD's linear surface-normal probe: bilinear ×``upsample``, 1×1 conv to 4 channels (xyz and κ's logit).

    Args:
        in_channels: feature channels.
        upsample: feature upsampling before the conv (4).
    """

    def __init__(self, in_channels: int, upsample: int = 4):
        super().__init__()
        self.upsample = upsample
        self.conv = nn.Conv2d(in_channels, 4, kernel_size=1)

    def raw(self, features: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """The conv's ``[B, 4, H, W]`` output; with ``size``, bicubically resized (align_corners True) to it.

        The conv runs before the bilinear upsampling (the same map up to rounding, see :meth:`DepthBinHead.logits`).
        """
        output = upsample(self.conv(features), self.upsample)
        if size is not None:
            output = resize(output, size, mode="bicubic", align_corners=True)
        return output

    def forward(self, features: Tensor, size: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
        """``[B, C, h, w]`` → unit normals ``[B, 3, H, W]`` and concentration κ = ELU(z₄) + 1.01 ``[B, 1, H, W]``.

        ``H, W`` = ``size`` if given (the protocol resizes the raw output bicubically to the label size), else
        ``upsample`` × the token grid.
        """
        output = self.raw(features, size)
        normals = F.normalize(output[:, :3], dim=1)
        kappa = F.elu(output[:, 3:4]) + 1.01
        return normals, kappa


def uncertainty_angular_loss(
    pred_normals: Tensor, kappa: Tensor, target: Tensor, valid: Tensor, eps: float = 1e-4
) -> Tensor:
    """Bae et al.'s uncertainty-aware angular loss (Probe3D's ``angular_loss(uncertainty_aware=True)``).

    Per pixel ``L = ln(1 + e^{−κπ}) − ln(1 + κ²) + κ · θ`` with ``θ = acos(clamp(cos(n̂, n), −1 + eps, 1 − eps))``
    (the clamp keeps acos's gradient finite at 0° and 180°); averaged over the valid pixels of the batch.

    Args:
        pred_normals: ``[B, 3, H, W]`` predicted normals (any length).
        kappa: ``[B, 1, H, W]`` or ``[B, H, W]`` concentration (> 0).
        target: ``[B, 3, H, W]`` ground-truth normals.
        valid: ``[B, H, W]`` or ``[B, 1, H, W]`` bool.
        eps: cosine clamp margin.

    Returns:
        scalar loss.
    """
    cosine = torch.cosine_similarity(pred_normals, target, dim=1).clamp(-1.0 + eps, 1.0 - eps)
    angle = torch.acos(cosine)
    kappa = kappa.squeeze(1) if kappa.ndim == 4 else kappa
    regulariser = torch.log1p(torch.exp(-kappa * math.pi)) - torch.log1p(kappa.pow(2))
    loss = regulariser + kappa * angle
    valid = (valid.squeeze(1) if valid.ndim == 4 else valid).bool()
    # a masked mean (0 with a zero gradient when no pixel is valid): no data-dependent shapes, see sig_loss
    return torch.where(valid, loss, 0.0).sum() / valid.sum().clamp(min=1)


class SegmentationHead(nn.Module):
    """FiT3D's segmentation probe: dropout (p = 0) and a 1×1 conv to class logits at token resolution.

    Args:
        in_channels: feature channels (block 11 with the final norm, no CLS, in the protocol).
        classes: number of classes.
        dropout: dropout before the conv (0 in the protocol).
    """

    def __init__(self, in_channels: int, classes: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout2d(dropout)
        self.conv = nn.Conv2d(in_channels, classes, kernel_size=1)

    def forward(self, features: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """``[B, C, h, w]`` → ``[B, classes, h, w]`` logits, or bilinearly resized (align_corners False) to ``size``."""
        logits = self.conv(self.dropout(features))
        return logits if size is None else resize(logits, size)


def segmentation_loss(logits: Tensor, labels: Tensor, ignore_index: int = 255) -> Tensor:
    """Pixel-mean cross-entropy, skipping ``ignore_index`` labels.

    Args:
        logits: ``[B, classes, H, W]`` at the label size.
        labels: ``[B, H, W]`` integer labels.
    """
    return F.cross_entropy(logits, labels.long(), ignore_index=ignore_index)
