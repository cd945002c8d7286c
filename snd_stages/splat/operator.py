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


@dataclass
class OperatorInputs:
    """One sample's inputs to :func:`build_splat_operators` (every tensor on one device).

    Attributes:
        gaussians: the context pair's Gaussians, as the renderer gets them (after any reference quirks).
        target_camera: ``[1]`` target camera, as the renderer gets it.
        context_masks: segment labels of the two context views at the Gaussians' image size.
        target_mask: segment labels of the target at the render size.
    """

    gaussians: Gaussians
    target_camera: Camera
    context_masks: Int[Tensor, "2 H W"]
    target_mask: Int[Tensor, "Ht Wt"]


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
    """One sample's operator, on its tensors' device (see :func:`build_splat_operators`)."""
    return build_splat_operators([OperatorInputs(gaussians, target_camera, context_masks, target_mask)],
                                 context_grid, target_grid, mask_aware_upsampling, backend)[0]


@torch.no_grad()
def build_splat_operators(
    samples: list[OperatorInputs],
    context_grid: tuple[int, int],
    target_grid: tuple[int, int],
    mask_aware_upsampling: bool = True,
    backend: Backend = "auto",
    output_device: torch.device | str | None = None,
) -> list[SplatOperator]:
    """Compose several samples' operators from their renderer weights, at once.

    Each factor of all the samples is one block-diagonal sparse matrix, so the sorting, products and conversions
    run once per call instead of once per sample: on a GPU, what a small sample costs is those launches and
    synchronisations, not arithmetic. Every sample's entries sit in their own diagonal block, in the order and
    summed in the order they would be alone (the sorts are stable), so each operator is the one composed alone, bit
    for bit. Samples must share their image sizes.

    Args:
        samples: each sample's Gaussians, target camera and masks (all on one device).
        context_grid: the teacher's token grid of each context view.
        target_grid: the student's token grid of the target.
        mask_aware_upsampling: False: plain bilinear (align-corners) upsampling, as the method's ablation.
        backend: the renderer whose compositing weights are used (``auto``: gsplat on CUDA, else the torch twin).
        output_device: where the operators are returned (default: the samples' device); the CPU gets each
            matrix in one copy for all samples.
    """
    first = samples[0]
    height, width = first.context_masks.shape[-2:]
    target_height, target_width = first.target_camera.height, first.target_camera.width
    for sample in samples:
        if tuple(sample.context_masks.shape) != (2, height, width):
            raise ValueError(f"context_masks must hold the 2 context views of one size, got "
                             f"{tuple(sample.context_masks.shape)} beside {(2, height, width)}")
        camera = sample.target_camera
        if tuple(sample.target_mask.shape) != (camera.height, camera.width):
            raise ValueError(f"target mask {tuple(sample.target_mask.shape)} must match the render size "
                             f"{camera.height}x{camera.width}")
        if (camera.height, camera.width) != (target_height, target_width):
            raise ValueError(f"samples composed together must share their render size: {camera.height}x"
                             f"{camera.width} beside {target_height}x{target_width}")
    device = first.gaussians.means.device
    count = len(samples)
    low_h, low_w = context_grid
    context_tokens = 2 * low_h * low_w
    target_pixels = target_height * target_width
    target_tokens = target_grid[0] * target_grid[1]

    rows, columns, values, segments, sizes, coverage, segment_counts = [], [], [], [], [], [], []
    for index, sample in enumerate(samples):
        # U L: each Gaussian reads four context tokens of its source view (sample `index`'s own columns).
        taps = [upsample_taps(mask if mask_aware_upsampling else torch.zeros_like(mask), low_h, low_w)
                for mask in sample.context_masks]
        nodes = torch.cat([taps[view][0] + view * low_h * low_w for view in range(2)], dim=1) + index * context_tokens
        tap_weights = torch.cat([taps[view][1] for view in range(2)], dim=1).double()  # [4, 2HW]
        gaussians = sample.gaussians
        source = gaussians.source_view.to(device) * (height * width) + gaussians.source_pixel.to(device)  # [G]
        # W (L U): the renderer's weights of each (pixel, Gaussian), spread over the Gaussian's four taps.
        weights = render_weights(gaussians, sample.target_camera, backend=backend)
        source_of_entry = source[weights.gaussian]
        rows.append(weights.pixel.repeat(4) + index * target_pixels)
        columns.append(nodes[:, source_of_entry].reshape(-1))
        values.append((tap_weights[:, source_of_entry] * weights.weight[None]).reshape(-1))
        labels, segment = torch.unique(sample.target_mask.reshape(-1).to(device), return_inverse=True)
        segments.append(segment + sum(segment_counts))
        sizes.append(torch.bincount(segment, minlength=len(labels)).double())
        segment_counts.append(len(labels))
        coverage.append(token_coverage(weights.alpha()[None].float(), target_grid)[0])
    segment_total = sum(segment_counts)

    # R = W (L U), as one coalesced sparse matrix [count H'W', count S].
    rendered = _coalesced(torch.cat(rows), torch.cat(columns), torch.cat(values),
                          (count * target_pixels, count * context_tokens))
    downsample = _block_diagonal(
        downsample_operator(target_height, target_width, target_grid).to(device).double(), count)
    local = torch.sparse.mm(downsample, rendered)

    segment = torch.cat(segments)
    sizes = torch.cat(sizes)
    entries = rendered.indices()
    segment_of_entry = segment[entries[0]]
    segment_means = _coalesced(segment_of_entry, entries[1], rendered.values() / sizes[segment_of_entry],
                               (segment_total, count * context_tokens))
    indicator = _coalesced(torch.arange(count * target_pixels, device=device), segment,
                           torch.ones(count * target_pixels, dtype=torch.float64, device=device),
                           (count * target_pixels, segment_total))
    segment_spread = torch.sparse.mm(downsample, indicator)

    output_device = device if output_device is None else torch.device(output_device)
    segment_starts = np.cumsum([0, *segment_counts]).tolist()
    token_blocks = [(index * target_tokens, (index + 1) * target_tokens) for index in range(count)]
    segment_blocks = list(zip(segment_starts[:-1], segment_starts[1:]))
    context_starts = [index * context_tokens for index in range(count)]
    local_parts = _split_csr(_csr32(local).to(output_device), token_blocks, context_starts, context_tokens)
    means_parts = _split_csr(_csr32(segment_means).to(output_device), segment_blocks, context_starts, context_tokens)
    spread_parts = _split_csr(_csr32(segment_spread).to(output_device), token_blocks, segment_starts[:-1],
                              segment_counts)
    coverage = torch.stack(coverage).to(output_device)
    return [SplatOperator(local=local_parts[index], segment_means=means_parts[index],
                          segment_spread=spread_parts[index], coverage=coverage[index], context_grid=(low_h, low_w))
            for index in range(count)]


def _block_diagonal(matrix: Tensor, count: int) -> Tensor:
    """``count`` copies of a coalesced sparse COO matrix along the diagonal (coalesced: blocks in row order)."""
    rows, columns = matrix.shape
    offsets = torch.arange(count, device=matrix.device)[:, None]
    indices = matrix.indices()
    stacked = torch.stack([indices[0] + offsets * rows, indices[1] + offsets * columns])  # [2, count, nonzeros]
    return torch.sparse_coo_tensor(stacked.reshape(2, -1), matrix.values().repeat(count), (count * rows, count * columns),
                                   check_invariants=False, is_coalesced=True)


def _split_csr(matrix: Tensor, row_blocks: list[tuple[int, int]], column_starts: list[int],
               widths: int | list[int]) -> list[Tensor]:
    """The diagonal blocks of a block-diagonal CSR matrix: rows ``[start, stop)`` of each block, its columns
    shifted down by its ``column_starts`` entry, as CSR matrices of width ``widths`` (one or one per block)."""
    row_pointers, column_indices, values = matrix.crow_indices(), matrix.col_indices(), matrix.values()
    bounds = row_pointers.cpu().tolist()  # one copy for every block's entry range
    parts = []
    for index, (start, stop) in enumerate(row_blocks):
        first, last = bounds[start], bounds[stop]
        width = widths if isinstance(widths, int) else widths[index]
        parts.append(torch.sparse_csr_tensor(row_pointers[start : stop + 1] - first,
                                             column_indices[first:last] - column_starts[index], values[first:last],
                                             size=(stop - start, width), check_invariants=False))
    return parts


def _coalesced(rows: Tensor, columns: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    return torch.sparse_coo_tensor(torch.stack([rows, columns]), values, shape, check_invariants=False).coalesce()


def _csr32(matrix: Tensor) -> Tensor:
    matrix = matrix.coalesce()
    keep = matrix.values() != 0  # exact zeros (e.g. a mask-rejected tap) carry no information
    # Dropping entries of a coalesced matrix leaves it sorted and without duplicates: no second sort.
    pruned = torch.sparse_coo_tensor(matrix.indices()[:, keep], matrix.values()[keep].float(), matrix.shape,
                                     check_invariants=False, is_coalesced=True)
    return pruned.to_sparse_csr()
