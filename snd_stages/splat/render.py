"""Splatting per-Gaussian features to cameras: gsplat's CUDA rasteriser, and a pure-torch twin of its math.

.. note:: What is rendered (method §1.6)

   For every pixel centre ``u`` of every target camera, with the Gaussians sorted front to back by camera depth,

       F(u) = sum_i f_i a_i(u) prod_{j<i} (1 - a_j(u)),      alpha(u) = 1 - prod_i (1 - a_i(u)),

   where ``a_i(u) = min(0.999, o_i exp(-1/2 d^T Sigma2d_i^-1 d))``, ``d = mu2d_i - u`` and ``Sigma2d_i`` is the EWA
   projection of the true covariance R diag(scales)^2 R^T plus a 0.3 px^2 blur. The background is black and
   ``F`` is **not** divided by ``alpha``, so weakly covered pixels fade towards 0.

   Both backends follow gsplat 1.5.3 (``rasterize_mode="classic"``) to the rule: Gaussians outside [near, far],
   with a degenerate 2D covariance, with opacity < 1/255 or whose bounding box misses the image are culled;
   per pixel, terms with a < 1/255 are skipped and compositing stops *before* the first term that would bring
   the transmittance to <= 1e-4. The perspective Jacobian clamps x/z and y/z to the image's field of view
   widened by 30 % on each side, as gsplat does, so that Gaussians far outside the view do not blow up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..gaussians import Gaussians
from ..geometry import Camera, quaternion_to_rotation_matrix

# gsplat 1.5.3 constants (cuda/include/Common.h, cuda/include/Utils.cuh, the 3DGS projection and
# rasterisation kernels). The twin must use exactly these for parity.
EPS2D = 0.3  # px^2 added to the diagonal of every 2D covariance ("classic" mode: no opacity compensation)
ALPHA_THRESHOLD = 1.0 / 255.0  # smaller per-pixel alphas are skipped; smaller opacities are culled
MAX_ALPHA = 0.999  # per-pixel alpha clamp; keeps 1 - a > 0 so transmittance stays invertible
TRANSMITTANCE_STOP = 1e-4  # a pixel stops before the first term that would bring T to <= this
MAX_SIGMAS = 3.33  # bounding-box half-width in standard deviations, before the opacity-aware tightening
FOV_MARGIN = 0.3  # the Jacobian's x/z, y/z clamp reaches this fraction of tan(fov/2) beyond the image edge

Backend = Literal["auto", "gsplat", "torch"]


@dataclass
class Rendered:
    """Features splatted to ``V`` cameras.

    Attributes:
        features: ``[V, H, W, C]`` composited features, black (0) background, not normalised by ``alpha``.
        alpha: ``[V, H, W]`` accumulated opacity (coverage), ``1 - `` the final transmittance.
    """

    features: Float[Tensor, "V H W C"]
    alpha: Float[Tensor, "V H W"]


def render_features(
    gaussians: Gaussians,
    features: Float[Tensor, "N C"],
    camera: Camera,
    backend: Backend = "auto",
    near: float = 0.01,
    far: float = 1e10,
) -> Rendered:
    """Splat ``C``-dimensional per-Gaussian features to every camera of ``camera``.

    Differentiable with respect to ``features`` and to the Gaussians' ``means``, ``quats``, ``scales`` and
    ``opacities`` on both backends. ``C`` is unrestricted (gsplat's rasteriser is called once for all
    channels; it walks them in chunks of 32 internally).

    Args:
        gaussians: ``N`` Gaussians in the world frame (true covariances from ``quats`` and ``scales``).
        features: ``[N, C]`` feature of each Gaussian.
        camera: cameras with batch shape ``[V]``; the principal point of ``intrinsics`` is honoured.
        backend: ``"gsplat"`` (CUDA tensors only), ``"torch"`` (the pure-torch twin, any device) or ``"auto"``:
            gsplat when the tensors are on CUDA, the twin otherwise.
        near: Gaussians whose centre has camera depth below this are culled.
        far: Gaussians whose centre has camera depth above this are culled.

    Returns:
        ``Rendered`` with ``features [V, H, W, C]`` and ``alpha [V, H, W]``, in the dtype of ``features``.

    Raises:
        ValueError: on inconsistent shapes, devices or arguments (the message shows the actual values).
        RuntimeError: for ``backend="gsplat"`` with tensors that are not on a CUDA device.
    """
    _check_inputs(gaussians, features, camera, near, far)
    if backend == "auto":
        backend = "gsplat" if features.device.type == "cuda" else "torch"
    if backend == "gsplat":
        return _render_features_gsplat(gaussians, features, camera, near=near, far=far)
    if backend == "torch":
        return _render_features_torch(gaussians, features, camera, near=near, far=far)
    raise ValueError(f"backend must be 'auto', 'gsplat' or 'torch', got {backend!r}")


def gsplat_cuda_available() -> bool:
    """Whether gsplat's CUDA rasteriser can run here (a CUDA device and a loadable or buildable extension).

    Never touches gsplat's extension loader without a CUDA device: on a CPU-only machine with ``nvcc`` that
    loader would start (and fail) a JIT build.
    """
    if not torch.cuda.is_available():
        return False
    try:
        from gsplat.cuda._backend import _C
    except Exception:  # any failure to build or load the extension means "not available"
        return False
    return _C is not None


def _check_inputs(gaussians: Gaussians, features: Tensor, camera: Camera, near: float, far: float) -> None:
    count = len(gaussians)
    if features.ndim != 2 or features.shape[0] != count or features.shape[1] == 0:
        raise ValueError(
            f"features must be [N, C] with N = {count} Gaussians and C >= 1, got {tuple(features.shape)}"
        )
    if len(camera.batch_shape) != 1 or camera.batch_shape[0] == 0:
        raise ValueError(
            f"camera must have batch shape [V] with V >= 1, got intrinsics {tuple(camera.intrinsics.shape)} and "
            f"world_to_camera {tuple(camera.world_to_camera.shape)} (index a single camera as camera[None])"
        )
    if camera.height <= 0 or camera.width <= 0:
        raise ValueError(f"camera image size must be positive, got {camera.height}x{camera.width}")
    if not 0 < near < far:
        raise ValueError(f"need 0 < near < far, got near={near}, far={far}")
    named = {
        "features": features,
        "means": gaussians.means,
        "quats": gaussians.quats,
        "scales": gaussians.scales,
        "opacities": gaussians.opacities,
        "intrinsics": camera.intrinsics,
        "world_to_camera": camera.world_to_camera,
    }
    devices = {name: tensor.device for name, tensor in named.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")
    not_float = {name: tensor.dtype for name, tensor in named.items() if not tensor.is_floating_point()}
    if not_float:
        raise ValueError(f"these tensors must be floating point: {not_float}")


# ----------------------------------------------------------------------------------------------------------------
# gsplat (CUDA)
# ----------------------------------------------------------------------------------------------------------------


def _render_features_gsplat(
    gaussians: Gaussians, features: Float[Tensor, "N C"], camera: Camera, near: float = 0.01, far: float = 1e10
) -> Rendered:
    """:func:`render_features` with gsplat 1.5.3's CUDA rasteriser: one ``rasterization`` call for all views
    and all channels. gsplat computes in float32 only, so inputs are cast to float32 and the outputs back to
    the dtype of ``features``."""
    if features.device.type != "cuda":
        raise RuntimeError(
            f"backend='gsplat' needs CUDA tensors (gsplat 1.5.3 has no CPU rasteriser), got tensors on "
            f"{features.device}; use backend='torch' or 'auto' there"
        )
    from gsplat import rasterization  # imported here: CPU-only callers never need it

    rendered_features, rendered_alpha, _ = rasterization(
        means=gaussians.means.float(),  # [N, 3]
        quats=gaussians.quats.float(),  # [N, 4], normalised inside gsplat
        scales=gaussians.scales.float(),  # [N, 3]
        opacities=gaussians.opacities.float(),  # [N]
        colors=features.float(),  # [N, C]: with sh_degree=None these are used as-is (no activation, no clamp)
        viewmats=camera.world_to_camera.float(),  # [V, 4, 4]
        Ks=camera.intrinsics.float(),  # [V, 3, 3]
        width=camera.width,
        height=camera.height,
        near_plane=near,
        far_plane=far,
        eps2d=EPS2D,
        sh_degree=None,
        packed=True,  # only the (view, Gaussian) pairs that survive culling are kept: less memory for large N
        backgrounds=None,  # black
        render_mode="RGB",
        rasterize_mode="classic",
    )
    return Rendered(rendered_features.to(features.dtype), rendered_alpha[..., 0].to(features.dtype))


# ----------------------------------------------------------------------------------------------------------------
# The pure-torch twin
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Projected:
    """Gaussians projected to ``V`` cameras (gsplat's ``fully_fused_projection`` outputs, unpacked)."""

    means2d: Float[Tensor, "V N 2"]  # pixel coordinates of the projected centres
    conics: Float[Tensor, "V N 3"]  # (a, b, c) of the inverse blurred 2D covariance [[a, b], [b, c]]
    depths: Float[Tensor, "V N"]  # camera z of the centres
    radii: Float[Tensor, "V N 2"]  # integer-valued bounding-box half-sizes in px (no gradient)
    visible: Bool[Tensor, "V N"]  # survives gsplat's culling


def _project_gaussians(
    gaussians: Gaussians, camera: Camera, near: float, far: float, dtype: torch.dtype
) -> _Projected:
    """EWA projection and culling, as gsplat 1.5.3's ``projection_ewa_3dgs`` kernels and ``persp_proj`` do it.

    Culled entries hold finite placeholder values so that no NaN or inf reaches autograd through them.
    """
    means = gaussians.means.to(dtype)  # [N, 3]
    opacities = gaussians.opacities.to(dtype)  # [N]
    world_to_camera = camera.world_to_camera.to(dtype)  # [V, 4, 4]
    K = camera.intrinsics.to(dtype)  # [V, 3, 3]
    height, width = camera.height, camera.width

    rotation_wc = world_to_camera[:, :3, :3]  # [V, 3, 3]
    means_c = torch.einsum("vij,nj->vni", rotation_wc, means) + world_to_camera[:, None, :3, 3]  # [V, N, 3]
    rotation = quaternion_to_rotation_matrix(gaussians.quats.to(dtype))  # [N, 3, 3], quats normalised
    half_covar = rotation * gaussians.scales.to(dtype)[:, None, :]  # R S, [N, 3, 3]
    covars = half_covar @ half_covar.transpose(-1, -2)  # R S^2 R^T
    covars_c = torch.einsum("vij,njk,vlk->vnil", rotation_wc, covars, rotation_wc)  # [V, N, 3, 3]

    x, y, z = means_c.unbind(-1)  # [V, N]
    in_depth_range = (z >= near) & (z <= far)
    # Culled Gaussians may sit at z <= 0; divide by 1 there instead, so their (unused) values stay finite.
    z = torch.where(in_depth_range, z, torch.ones_like(z))
    fx, fy = K[:, 0, 0, None], K[:, 1, 1, None]  # [V, 1]
    cx, cy = K[:, 0, 2, None], K[:, 1, 2, None]
    # gsplat clamps the Jacobian's x/z and y/z to the field of view plus 30 % of tan(fov/2) on each side,
    # measured from the principal point; the projected centre itself is not clamped.
    tan_fov_x, tan_fov_y = 0.5 * width / fx, 0.5 * height / fy
    lim_x_pos = (width - cx) / fx + FOV_MARGIN * tan_fov_x
    lim_x_neg = cx / fx + FOV_MARGIN * tan_fov_x
    lim_y_pos = (height - cy) / fy + FOV_MARGIN * tan_fov_y
    lim_y_neg = cy / fy + FOV_MARGIN * tan_fov_y
    tx = z * torch.clamp(x / z, min=-lim_x_neg, max=lim_x_pos)
    ty = z * torch.clamp(y / z, min=-lim_y_neg, max=lim_y_pos)
    zeros = torch.zeros_like(z)
    jacobian = torch.stack(
        [fx / z, zeros, -fx * tx / z**2, zeros, fy / z, -fy * ty / z**2], dim=-1
    ).reshape(*z.shape, 2, 3)  # [V, N, 2, 3]
    covars2d = jacobian @ covars_c @ jacobian.transpose(-1, -2)  # [V, N, 2, 2]
    means2d = torch.stack([fx * x / z + cx, fy * y / z + cy], dim=-1)  # [V, N, 2]

    a = covars2d[..., 0, 0] + EPS2D
    b = 0.5 * (covars2d[..., 0, 1] + covars2d[..., 1, 0])
    c = covars2d[..., 1, 1] + EPS2D
    det = a * c - b * b
    positive_det = det > 0
    det = torch.where(positive_det, det, torch.ones_like(det))
    conics = torch.stack([c / det, -b / det, a / det], dim=-1)  # [V, N, 3]

    with torch.no_grad():
        # Opacity-aware box (gsplat's "tight" bound): beyond `extend` sigmas along an axis the alpha is already
        # below 1/255 for every pixel, so the box holds every pixel the Gaussian can contribute to.
        opacity = opacities.detach()[None]  # [1, N]
        extend = torch.sqrt(2.0 * torch.log(opacity.clamp(min=ALPHA_THRESHOLD) / ALPHA_THRESHOLD))
        extend = extend.clamp(max=MAX_SIGMAS)
        radius_x = torch.ceil(extend * a.detach().clamp(min=0).sqrt())
        radius_y = torch.ceil(extend * c.detach().clamp(min=0).sqrt())
        u, v = means2d.detach().unbind(-1)
        on_image = (u + radius_x > 0) & (u - radius_x < width) & (v + radius_y > 0) & (v - radius_y < height)
        visible = (
            in_depth_range
            & positive_det
            & (opacity >= ALPHA_THRESHOLD)
            & ((radius_x > 0) | (radius_y > 0))
            & on_image
        )
        radii = torch.stack([radius_x, radius_y], dim=-1)
    return _Projected(means2d=means2d, conics=conics, depths=means_c[..., 2], radii=radii, visible=visible)


def _render_features_torch(
    gaussians: Gaussians,
    features: Float[Tensor, "N C"],
    camera: Camera,
    near: float = 0.01,
    far: float = 1e10,
    tile_size: int = 16,
    max_pairs: int = 1 << 20,
) -> Rendered:
    """:func:`render_features` in pure torch, mirroring gsplat 1.5.3's math rule for rule; runs on any device.

    The image is processed in ``tile_size`` x ``tile_size`` pixel tiles. Each tile composites only the Gaussians
    whose bounding box overlaps it (the others have alpha < 1/255 there, so they would be skipped anyway), in
    depth order, in chunks of at most ``max_pairs`` pixel-Gaussian pairs that carry the transmittance from one
    chunk to the next. Memory is therefore bounded per chunk; autograd keeps O(number of pixel-Gaussian pairs
    actually overlapping) for the backward pass.

    Computes in the promoted dtype of the means and features (at least float32), returns the features' dtype.

    Args:
        tile_size: pixel tile side.
        max_pairs: the most pixel-Gaussian pairs composited at once.
    """
    height, width = camera.height, camera.width
    dtype = torch.promote_types(torch.promote_types(gaussians.means.dtype, features.dtype), torch.float32)
    values = features.to(dtype)
    channels = values.shape[1]
    views, pixels, tile_features, tile_transmittances = [], [], [], []
    for view, pixel_ids, tile in _tiles(gaussians, camera, near, far, dtype, tile_size):
        features_here = values.new_zeros(len(pixel_ids), channels)
        transmittance = values.new_ones(len(pixel_ids))
        for gaussian_ids, weights, transmittance in _composite_weights(tile, max_pairs // (tile_size * tile_size)):
            features_here = features_here + weights @ values[gaussian_ids]
        views.append(torch.full_like(pixel_ids, view))
        pixels.append(pixel_ids)
        tile_features.append(features_here)
        tile_transmittances.append(transmittance)
    # Every pixel belongs to exactly one tile: one scatter assembles the images (and carries the gradient).
    where = (torch.cat(views), torch.cat(pixels))
    count = camera.batch_shape[0]
    composited = values.new_zeros(count, height * width, channels).index_put(where, torch.cat(tile_features))
    transmittance = values.new_ones(count, height * width).index_put(where, torch.cat(tile_transmittances))
    return Rendered(
        composited.reshape(count, height, width, channels).to(features.dtype),
        (1 - transmittance).reshape(count, height, width).to(features.dtype),
    )


@dataclass
class RenderWeights:
    """The compositing weights of one camera's render: ``F(u) = sum over entries with pixel u of weight * f``.

    Every pixel-Gaussian pair that contributes to a pixel (``a_i prod_{j<i} (1 - a_j)`` > 0) is listed once;
    ``alpha(u)`` is the sum of the pixel's weights.

    Attributes:
        pixel: ``[M]`` row-major pixel index.
        gaussian: ``[M]`` Gaussian index.
        weight: ``[M]`` float64 compositing weight.
    """

    pixel: Int[Tensor, " M"]
    gaussian: Int[Tensor, " M"]
    weight: Float[Tensor, " M"]
    height: int
    width: int

    def alpha(self) -> Float[Tensor, "H W"]:
        total = self.weight.new_zeros(self.height * self.width).index_add_(0, self.pixel, self.weight)
        return total.reshape(self.height, self.width)


@torch.no_grad()
def render_weights(
    gaussians: Gaussians, camera: Camera, backend: Backend = "auto", near: float = 0.01, far: float = 1e10
) -> RenderWeights:
    """The per-pixel compositing weights behind :func:`render_features` for one camera (``camera[None]``).

    Rendering is linear in the features: ``render_features(...).features[0]`` equals
    ``sum weight * features[gaussian]`` over each pixel's entries. The ``gsplat`` backend asks gsplat's CUDA
    kernels which pairs contribute (its projection, tile intersection and ``rasterize_to_indices_in_range``, so
    culling, thresholds and early stopping are gsplat's own) and recomputes their alphas; the ``torch`` backend
    takes them from the twin's tile loop.
    """
    if len(camera.batch_shape) != 1 or camera.batch_shape[0] != 1:
        raise ValueError(f"render_weights takes one camera (batch shape [1]), got {tuple(camera.batch_shape)}")
    _check_inputs(gaussians, gaussians.means[:, :1], camera, near, far)
    device = gaussians.means.device
    if backend == "auto":
        backend = "gsplat" if device.type == "cuda" else "torch"
    if backend == "gsplat":
        return _render_weights_gsplat(gaussians, camera, near, far)
    if backend != "torch":
        raise ValueError(f"backend must be 'auto', 'gsplat' or 'torch', got {backend!r}")
    pixels, ids, weights = [], [], []
    dtype = torch.promote_types(gaussians.means.dtype, torch.float32)
    for _, pixel_ids, tile in _tiles(gaussians, camera, near, far, dtype, tile_size=16):
        for gaussian_ids, tile_weights, _ in _composite_weights(tile, (1 << 20) // 256):
            rows, columns = tile_weights.nonzero(as_tuple=True)
            pixels.append(pixel_ids[rows])
            ids.append(gaussian_ids[columns])
            weights.append(tile_weights[rows, columns].double())
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    return RenderWeights(
        torch.cat(pixels) if pixels else empty,
        torch.cat(ids) if ids else empty,
        torch.cat(weights) if weights else empty.double(),
        camera.height,
        camera.width,
    )


def _render_weights_gsplat(gaussians: Gaussians, camera: Camera, near: float, far: float) -> RenderWeights:
    from gsplat import rasterization, rasterize_to_indices_in_range

    height, width = camera.height, camera.width
    # Unpacked projection: rasterize_to_indices_in_range indexes the [cameras, N] layout.
    _, _, meta = rasterization(
        means=gaussians.means.float(), quats=gaussians.quats.float(), scales=gaussians.scales.float(),
        opacities=gaussians.opacities.float(), colors=gaussians.means.new_zeros(len(gaussians), 1).float(),
        viewmats=camera.world_to_camera.float(), Ks=camera.intrinsics.float(), width=width, height=height,
        near_plane=near, far_plane=far, eps2d=EPS2D, sh_degree=None, packed=False, render_mode="RGB",
        rasterize_mode="classic",
    )
    means2d, conics, opacities = meta["means2d"], meta["conics"], meta["opacities"]
    ids, pixel_ids, _ = rasterize_to_indices_in_range(
        0, 1 << 30, torch.ones(1, height, width, device=means2d.device), means2d, conics, opacities,
        width, height, meta["tile_size"], meta["isect_offsets"], meta["flatten_ids"],
    )
    # Pairs arrive grouped by pixel, front to back within a pixel, already thresholded and early-stopped by
    # gsplat's own kernel; only their alphas and the transmittance in front of each are recomputed here.
    rows, columns = torch.div(pixel_ids, width, rounding_mode="floor"), pixel_ids % width
    delta = means2d[0, ids] - torch.stack([columns, rows], dim=-1).float() - 0.5
    conic = conics[0, ids]
    sigma = 0.5 * (conic[:, 0] * delta[:, 0] ** 2 + conic[:, 2] * delta[:, 1] ** 2) + conic[:, 1] * delta[:, 0] * delta[:, 1]
    alpha = torch.clamp(opacities[0, ids] * torch.exp(-sigma), max=MAX_ALPHA).double()
    log_keep = torch.log1p(-alpha)
    inclusive = torch.cumsum(log_keep, 0)
    starts = torch.ones_like(pixel_ids, dtype=torch.bool)
    starts[1:] = pixel_ids[1:] != pixel_ids[:-1]
    segment = torch.cumsum(starts.long(), 0) - 1
    offset = (inclusive - log_keep)[starts][segment]  # the prefix sum just before each pixel's first pair
    weight = alpha * torch.exp(inclusive - log_keep - offset)
    return RenderWeights(pixel_ids, ids, weight, height, width)


@dataclass
class _Tile:
    """One pixel tile of one view and the depth-sorted Gaussians whose boxes overlap it."""

    pixels: Float[Tensor, "P 2"]  # pixel centres (u, v)
    gaussian_ids: Int[Tensor, " M"]  # indices into the Gaussians, front to back
    means2d: Float[Tensor, "M 2"]
    conics: Float[Tensor, "M 3"]
    opacities: Float[Tensor, " M"]


def _tiles(gaussians: Gaussians, camera: Camera, near: float, far: float, dtype: torch.dtype, tile_size: int):
    """Yields ``(view, flat pixel ids, _Tile)`` for every tile of every view, as the twin composites them."""
    height, width = camera.height, camera.width
    device = gaussians.means.device
    projected = _project_gaussians(gaussians, camera, near, far, dtype)
    opacities = gaussians.opacities.to(dtype)
    for view in range(camera.batch_shape[0]):
        ids = projected.visible[view].nonzero()[:, 0]
        ids = ids[torch.argsort(projected.depths[view, ids].detach(), stable=True)]  # front to back
        means2d = projected.means2d[view, ids]  # [M, 2]
        conics = projected.conics[view, ids]  # [M, 3]
        box_min = means2d.detach() - projected.radii[view, ids]  # [M, 2]
        box_max = means2d.detach() + projected.radii[view, ids]
        for top in range(0, height, tile_size):
            bottom = min(top + tile_size, height)
            # Gaussians whose box overlaps this row of tiles; narrowed per tile below.
            in_row = ((box_max[:, 1] > top) & (box_min[:, 1] < bottom)).nonzero()[:, 0]
            for left in range(0, width, tile_size):
                right = min(left + tile_size, width)
                in_tile = in_row[(box_max[in_row, 0] > left) & (box_min[in_row, 0] < right)]  # still depth-sorted
                rows = torch.arange(top, bottom, device=device)
                cols = torch.arange(left, right, device=device)
                grid_v, grid_u = torch.meshgrid(rows, cols, indexing="ij")
                pixels = torch.stack([grid_u, grid_v], dim=-1).reshape(-1, 2).to(dtype) + 0.5
                yield view, (grid_v * width + grid_u).reshape(-1), _Tile(
                    pixels, ids[in_tile], means2d[in_tile], conics[in_tile], opacities[ids[in_tile]]
                )


def _composite_weights(tile: _Tile, gaussian_chunk: int):
    """Front-to-back compositing weights of a tile's depth-sorted Gaussians at its pixel centres, gsplat's
    per-pixel loop (``rasterize_to_pixels_3dgs_fwd_kernel``) vectorised over pixels and Gaussians.

    Yields, per chunk of at most ``gaussian_chunk`` Gaussians: their indices, the ``[P, K]`` weights
    ``a_i prod_{j<i} (1 - a_j)`` and the transmittance after the chunk (``[P]``).
    """
    pixels = tile.pixels
    transmittance = pixels.new_ones(pixels.shape[0])  # product of (1 - a) over the terms composited so far
    done = torch.zeros(pixels.shape[0], dtype=torch.bool, device=pixels.device)
    gaussian_chunk = max(1, gaussian_chunk)
    for start in range(0, len(tile.gaussian_ids), gaussian_chunk):
        if bool(done.all()):
            break
        chunk = slice(start, start + gaussian_chunk)
        delta = tile.means2d[None, chunk] - pixels[:, None]  # [P, K, 2], centre minus pixel as in gsplat
        dx, dy = delta.unbind(-1)
        conic_a, conic_b, conic_c = tile.conics[chunk].unbind(-1)  # [K]
        sigma = 0.5 * (conic_a * dx * dx + conic_c * dy * dy) + conic_b * dx * dy  # [P, K]
        alpha = torch.clamp(tile.opacities[chunk] * torch.exp(-sigma), max=MAX_ALPHA)
        alpha = torch.where((sigma >= 0) & (alpha >= ALPHA_THRESHOLD), alpha, torch.zeros_like(alpha))
        with torch.no_grad():
            # gsplat stops a pixel before the first term whose inclusion would bring T to <= 1e-4. The running
            # product over the non-skipped terms only decreases, so that is: keep a term iff T after it > 1e-4.
            running = transmittance.detach()[:, None] * torch.cumprod(1 - alpha.detach(), dim=1)
            keep = (running > TRANSMITTANCE_STOP) & ~done[:, None]
            done = done | (running[:, -1] <= TRANSMITTANCE_STOP)
        alpha = torch.where(keep, alpha, torch.zeros_like(alpha))
        after = torch.cumprod(1 - alpha, dim=1)  # transmittance after each term, relative to the chunk start
        before = torch.cat([torch.ones_like(after[:, :1]), after[:, :-1]], dim=1)
        weights = alpha * before * transmittance[:, None]  # a_i prod_{j<i} (1 - a_j)
        transmittance = transmittance * after[:, -1]
        yield tile.gaussian_ids[chunk], weights, transmittance
