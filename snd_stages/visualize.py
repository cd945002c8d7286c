"""Pictures of feature maps: a 3-component PCA shown as RGB."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class PcaBasis:
    """Mean ``[C]``, components ``[C, 3]`` and the per-component range used to scale projections into [0, 1]."""

    mean: Tensor
    components: Tensor
    low: Tensor
    high: Tensor


def pca_basis(features: Tensor) -> PcaBasis:
    """Fit on ``[C, h, w]`` features. With fewer than three components (tiny maps) the rest stay 0 (black)."""
    rows = features.flatten(1).T.float()
    mean = rows.mean(0)
    _, _, vectors = torch.linalg.svd(rows - mean, full_matrices=False)
    components = torch.zeros(rows.shape[1], 3)
    components[:, : min(3, len(vectors))] = vectors[:3].T
    projected = (rows - mean) @ components
    return PcaBasis(mean, components, projected.min(0).values, projected.max(0).values)


def pca_rgb(features: Tensor, basis: PcaBasis | None = None) -> np.ndarray:
    """``[C, h, w]`` features -> ``[h, w, 3]`` uint8 through ``basis`` (fitted on these features if None), so
    several maps drawn with one basis get comparable colours."""
    basis = basis if basis is not None else pca_basis(features)
    projected = (features.flatten(1).T.float() - basis.mean) @ basis.components
    scaled = ((projected - basis.low) / (basis.high - basis.low).clamp(min=1e-6)).clamp(0, 1)
    return (scaled.reshape(*features.shape[1:], 3) * 255).round().byte().numpy()
