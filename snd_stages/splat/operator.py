"""The teacher's whole 3D path as one precomputed sparse operator per sample: context tokens -> target tokens.

Given a sample's fixed Gaussians, masks and target camera, mask-aware upsampling, lifting, splatting, semantic
blending and downsampling (``splat/features.py``, ``splat/render.py``) are together linear in the teacher's
context tokens ``x`` (``[S, C]``, ``S = 2 h w``, view-major, row-major tokens):

    targets = D (b R + (1 - b) E N^-1 E^T R) x,        R = W L U

with U the upsampling ``[2HW, S]`` (four entries a row), L the lifting ``[G, 2HW]`` (one a row), W the
compositing weights ``[H'W', G]`` (from the renderer itself: gsplat's kernels on CUDA, the twin on CPU), E the
target's segment indicator ``[H'W', K]``, N the segment sizes, D the bilinear token downsampling ``[T, H'W']``
(four a row) and b the blending coefficient. It is stored factored,

    local = D R  [T, S],      segment_means = N^-1 E^T R  [K, S],      segment_spread = D E  [T, K],

so the blending coefficient stays a training setting and no dense ``[T, S]`` matrix is ever formed. Applying it
is three sparse-dense products of a few hundred thousand non-zeros: a fraction of a millisecond on a GPU,
instead of upsampling, lifting and rasterising a million Gaussians with hundreds of channels.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..errors import ArtifactError
from ..gaussians import Gaussians
from ..geometry import Camera
from .features import (
    blend_with_segments,
    downsample_operator,
    downsample_to_tokens,
    lift_features,
    mask_aware_upsample,
    token_coverage,
    upsample_taps,
)
from .render import Backend, render_features, render_weights

_MATRICES = ("local", "segment_means", "segment_spread")
# The CSR products used here are exact and tested; torch's "beta" notice on every CSR construction is noise.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)


@dataclass
class SplatOperator:
    """One sample's context-tokens -> target-tokens map (see the module docstring).

    Attributes:
        local: sparse CSR ``[T, S]`` float32, the rendered features downsampled.
        segment_means: sparse CSR ``[K, S]``, the mean of the rendered features over each target segment.
        segment_spread: sparse CSR ``[T, K]``, how much of each segment's mean each token's bilinear taps read.
        coverage: ``[th, tw]`` bool, tokens whose nearest render pixel received any Gaussian.
        context_grid: ``(h, w)`` token grid of each context view.
    """

    local: Tensor
    segment_means: Tensor
    segment_spread: Tensor
    coverage: Bool[Tensor, "th tw"]
    context_grid: tuple[int, int]

    @property
    def target_grid(self) -> tuple[int, int]:
        return tuple(self.coverage.shape)

    def apply(self, context_tokens: Float[Tensor, "2 C h w"], blending: float) -> Float[Tensor, "C th tw"]:
        """The splatted, blended, downsampled teacher features at the target, as the plain path computes them."""
        views, channels, height, width = context_tokens.shape
        if (views, height, width) != (2, *self.context_grid):
            raise ValueError(
                f"context tokens {tuple(context_tokens.shape)} do not match the operator's context grid "
                f"2 x C x {self.context_grid[0]} x {self.context_grid[1]}"
            )
        tokens = context_tokens.permute(0, 2, 3, 1).reshape(-1, channels).float()
        result = torch.sparse.mm(self.local, tokens)
        if blending != 1.0:
            means = torch.sparse.mm(self.segment_spread, torch.sparse.mm(self.segment_means, tokens))
            result = blending * result + (1.0 - blending) * means
        return result.T.reshape(channels, *self.target_grid)

    def to(self, device) -> "SplatOperator":
        return SplatOperator(self.local.to(device), self.segment_means.to(device), self.segment_spread.to(device),
                             self.coverage.to(device), self.context_grid)

    def nonzeros(self) -> int:
        return sum(int(getattr(self, name).values().numel()) for name in _MATRICES)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Five compact numpy arrays for storage (each stored array costs milliseconds of fixed overhead, so the three
        CSR matrices share theirs):

        - ``row_pointers`` int32: the matrices' CSR row pointers, one after the other;
        - ``columns``: their column indices, in uint16 where every matrix has at most 65,536 columns, else int32;
        - ``values`` float32: their values;
        - ``layout`` int64 ``[rows, columns, nonzeros] x 3`` then the context grid ``(h, w)``;
        - ``coverage`` bool ``[th, tw]``.
        """
        matrices = [getattr(self, name).cpu() for name in _MATRICES]
        widest = max(matrix.shape[1] for matrix in matrices)
        index_type = np.uint16 if widest <= np.iinfo(np.uint16).max + 1 else np.int32
        layout = [value for matrix in matrices for value in (*matrix.shape, matrix.values().numel())]
        return {
            "row_pointers": np.concatenate([m.crow_indices().numpy() for m in matrices]).astype(np.int32),
            "columns": np.concatenate([m.col_indices().numpy() for m in matrices]).astype(index_type),
            "values": np.concatenate([m.values().numpy() for m in matrices]).astype(np.float32),
            "layout": np.asarray([*layout, *self.context_grid], dtype=np.int64),
            "coverage": self.coverage.cpu().numpy(),
        }

    @classmethod
    def from_arrays(cls, arrays) -> "SplatOperator":
        """The inverse of :meth:`to_arrays` (``arrays`` maps names to array-likes, e.g. a Zarr group)."""
        layout = [int(value) for value in np.asarray(arrays["layout"][...])]
        row_pointers = np.asarray(arrays["row_pointers"][...]).astype(np.int64)
        columns = np.asarray(arrays["columns"][...]).astype(np.int64)
        values = np.asarray(arrays["values"][...])
        matrices, rows_at, entries_at = {}, 0, 0
        for index, name in enumerate(_MATRICES):
            rows, width, nonzeros = layout[3 * index : 3 * index + 3]
            try:
                if rows_at + rows + 1 > len(row_pointers) or entries_at + nonzeros > len(values):
                    raise RuntimeError(f"layout asks for {rows + 1} row pointers and {nonzeros} values beyond "
                                       "the stored arrays")
                # Checked once per load (operators are then cached): damaged indices stop here, with a message,
                # instead of reading out of bounds in a sparse product.
                matrices[name] = torch.sparse_csr_tensor(
                    torch.from_numpy(row_pointers[rows_at : rows_at + rows + 1]),
                    torch.from_numpy(columns[entries_at : entries_at + nonzeros]),
                    torch.from_numpy(values[entries_at : entries_at + nonzeros]),
                    size=(rows, width),
                    check_invariants=True,
                )
            except RuntimeError as error:
                raise ArtifactError(
                    f"stored operator matrix {name!r} is damaged ({str(error).splitlines()[0]}); "
                    "rerun snd precompute-operators --force"
                ) from None
            rows_at, entries_at = rows_at + rows + 1, entries_at + nonzeros
        grid = (layout[9], layout[10])
        return cls(**matrices, coverage=torch.from_numpy(np.asarray(arrays["coverage"][...])), context_grid=grid)


def apply_operators(operators: list[SplatOperator], context_tokens: Float[Tensor, "2B C h w"], blending: float
                    ) -> tuple[Float[Tensor, "B C th tw"], Bool[Tensor, "B th tw"]]:
    """A batch of samples: context views ``2i, 2i + 1`` belong to operator ``i``. Returns targets and coverage."""
    targets = [operator.apply(context_tokens[2 * index : 2 * index + 2], blending)
               for index, operator in enumerate(operators)]
    return torch.stack(targets), torch.stack([operator.coverage for operator in operators])


def splat_tokens(
    context_tokens: Float[Tensor, "2 C h w"],
    gaussians: Gaussians,
    target_camera: Camera,
    context_masks: Int[Tensor, "2 H W"],
    target_mask: Int[Tensor, "Ht Wt"],
    target_grid: tuple[int, int],
    blending: float,
    mask_aware_upsampling: bool = True,
    backend: Backend = "auto",
) -> tuple[Float[Tensor, "C th tw"], Bool[Tensor, "th tw"]]:
    """The plain path, step by step: upsample, lift, render, blend, downsample. Returns target and coverage."""
    if mask_aware_upsampling:
        upsampled = mask_aware_upsample(context_tokens, context_masks)
    else:
        upsampled = F.interpolate(context_tokens, size=context_masks.shape[-2:], mode="bilinear", align_corners=True)
    rendered = render_features(gaussians, lift_features(upsampled, gaussians), target_camera, backend=backend)
    features = rendered.features.permute(0, 3, 1, 2)  # [1, C, H, W]
    blended = blend_with_segments(features, target_mask[None], blending)
    return downsample_to_tokens(blended, target_grid)[0], token_coverage(rendered.alpha, target_grid)[0]


@torch.no_grad()
def build_splat_operator(
    gaussians: Gaussians,
    target_camera: Camera,
    context_masks: Int[Tensor, "2 H W"],
    target_mask: Int[Tensor, "Ht Wt"],
    context_grid: tuple[int, int],
    target_grid: tuple[int, int],
    mask_aware_upsampling: bool = True,
    backend: Backend = "auto",
) -> SplatOperator:
    """Compose a sample's operator from its renderer weights (every tensor on one device).

    Args:
        gaussians: the context pair's Gaussians, as the renderer gets them (after any reference quirks).
        target_camera: ``[1]`` target camera, as the renderer gets it.
        context_masks: segment labels of the two context views at the Gaussians' image size.
        target_mask: segment labels of the target at the render size.
        context_grid: the teacher's token grid of each context view.
        target_grid: the student's token grid of the target.
        mask_aware_upsampling: False: plain bilinear (align-corners) upsampling, as the method's ablation.
    """
    views, height, width = context_masks.shape
    if views != 2:
        raise ValueError(f"context_masks must hold the 2 context views, got {tuple(context_masks.shape)}")
    if tuple(target_mask.shape) != (target_camera.height, target_camera.width):
        raise ValueError(
            f"target mask {tuple(target_mask.shape)} must match the render size "
            f"{target_camera.height}x{target_camera.width}"
        )
    device = gaussians.means.device
    low_h, low_w = context_grid
    context_tokens = 2 * low_h * low_w
    target_pixels = target_camera.height * target_camera.width

    # U L: each Gaussian reads four context tokens of its source view.
    taps = [upsample_taps(mask if mask_aware_upsampling else torch.zeros_like(mask), low_h, low_w)
            for mask in context_masks]
    nodes = torch.cat([taps[view][0] + view * low_h * low_w for view in range(2)], dim=1)  # [4, 2HW]
    tap_weights = torch.cat([taps[view][1] for view in range(2)], dim=1).double()  # [4, 2HW]
    source = gaussians.source_view.to(device) * (height * width) + gaussians.source_pixel.to(device)  # [G]

    # R = W (L U), as one coalesced sparse matrix [H'W', S].
    weights = render_weights(gaussians, target_camera, backend=backend)
    source_of_entry = source[weights.gaussian]
    rows = weights.pixel.repeat(4)
    columns = nodes[:, source_of_entry].reshape(-1)
    values = (tap_weights[:, source_of_entry] * weights.weight[None]).reshape(-1)
    rendered = _coalesced(rows, columns, values, (target_pixels, context_tokens))

    downsample = downsample_operator(target_camera.height, target_camera.width, target_grid).to(device).double()
    local = torch.sparse.mm(downsample, rendered)

    labels, segment = torch.unique(target_mask.reshape(-1).to(device), return_inverse=True)
    sizes = torch.bincount(segment, minlength=len(labels)).double()
    entries = rendered.indices()
    segment_of_entry = segment[entries[0]]
    segment_means = _coalesced(segment_of_entry, entries[1], rendered.values() / sizes[segment_of_entry],
                               (len(labels), context_tokens))
    indicator = _coalesced(torch.arange(target_pixels, device=device), segment,
                           torch.ones(target_pixels, dtype=torch.float64, device=device), (target_pixels, len(labels)))
    segment_spread = torch.sparse.mm(downsample, indicator)

    coverage = token_coverage(weights.alpha()[None].float(), target_grid)[0]
    return SplatOperator(
        local=_csr32(local),
        segment_means=_csr32(segment_means),
        segment_spread=_csr32(segment_spread),
        coverage=coverage,
        context_grid=(low_h, low_w),
    )


def _coalesced(rows: Tensor, columns: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    return torch.sparse_coo_tensor(torch.stack([rows, columns]), values, shape, check_invariants=False).coalesce()


def _csr32(matrix: Tensor) -> Tensor:
    matrix = matrix.coalesce()
    keep = matrix.values() != 0  # exact zeros (e.g. a mask-rejected tap) carry no information
    pruned = torch.sparse_coo_tensor(matrix.indices()[:, keep], matrix.values()[keep].float(), matrix.shape,
                                     check_invariants=False).coalesce()
    return pruned.to_sparse_csr()
