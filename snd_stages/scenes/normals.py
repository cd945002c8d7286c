"""Surface normals derived from a depth map by local least-squares plane fitting.

NYUv2's labeled set has depth but no normals, so the normal targets used with it are computed here, by a
documented and deterministic method:

1. Back-project every pixel centre with its depth into the camera frame (OpenCV axes, see
   :mod:`snd_stages.geometry`): ``X = depth * K^-1 [j + 0.5, i + 0.5, 1]``.
2. For each pixel take the ``window`` x ``window`` neighbourhood around it. A neighbour counts if its depth is
   valid (> 0, finite) and it lies on the same surface as the centre: ``|z_n - z_c| <= max_relative_jump * z_c``.
   This gate keeps depth discontinuities (an object in front of a wall) from mixing two surfaces.
3. Fit the total-least-squares plane to the kept points: with ``S0 = count``, ``S1 = sum X``, ``S2 = sum X X^T``
   (``X`` relative to the centre pixel's point)
   the covariance is ``C = S2 / S0 - (S1 / S0)(S1 / S0)^T``; the normal is the eigenvector of ``C`` with the
   smallest eigenvalue (batched ``torch.linalg.eigh`` in float64).
4. Orient it towards the camera (``n . X_c < 0``: the camera sits at the origin) and normalise to unit length.

A normal is undefined, and returned as (0, 0, 0), where the centre depth is invalid, fewer than ``min_points``
neighbours are kept, or the kept points are (nearly) collinear so no plane is determined.

Along a convex or concave crease (two planes meeting with continuous depth) the fit blends the two planes over
half a window on each side; away from creases and edges a plane is recovered exactly.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..geometry import Camera, pixel_centers

DEFAULT_WINDOW = 7
DEFAULT_MAX_RELATIVE_JUMP = 0.05
DEFAULT_MIN_POINTS = 6
# Names the fitting method in the keys of stored ground truth (snd_stages.artifacts.ground_truth): change it whenever
# a change to normals_from_depth_plane_fit changes its output, so that normals fitted before are not reused.
PLANE_FIT_VERSION = "plane-fit-1"
# Rows processed together: bounds the unfolded neighbourhood tensor ([4 * window^2, rows * W] float64).
_ROW_CHUNK = 64


def normals_from_depth_plane_fit(
    depth: np.ndarray | torch.Tensor,
    camera: Camera,
    window: int = DEFAULT_WINDOW,
    max_relative_jump: float = DEFAULT_MAX_RELATIVE_JUMP,
    min_points: int = DEFAULT_MIN_POINTS,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Camera-frame unit normals of a depth map, facing the camera.

    Args:
        depth: ``[H, W]`` metric z-depth, 0 (or non-finite) where invalid.
        camera: a single (unbatched) camera of the same ``H`` x ``W``; only its intrinsics are used.
        window: odd side of the square neighbourhood fitted around each pixel.
        max_relative_jump: neighbours whose depth differs from the centre's by more than this fraction of the
            centre depth are treated as another surface and left out.
        min_points: fewest kept neighbours (centre included) for a normal to be defined; at least 3.
        device: where to compute (a 480x640 frame takes seconds on CPU, milliseconds on a GPU).

    Returns:
        ``[H, W, 3]`` float32 unit normals in the OpenCV camera frame, (0, 0, 0) where undefined.
    """
    if window < 3 or window % 2 == 0:
        raise ValueError(f"window must be an odd integer >= 3, got {window}")
    if min_points < 3:
        raise ValueError(f"min_points must be at least 3 (a plane needs 3 points), got {min_points}")
    if camera.batch_shape != torch.Size([]):
        raise ValueError(f"expected one camera, got a batch of shape {tuple(camera.batch_shape)}")
    depth_t = torch.as_tensor(np.asarray(depth) if not isinstance(depth, torch.Tensor) else depth)
    depth_t = depth_t.detach().to(device, torch.float64)
    if depth_t.ndim != 2 or tuple(depth_t.shape) != (camera.height, camera.width):
        raise ValueError(f"depth must be [H, W] = [{camera.height}, {camera.width}], got {tuple(depth_t.shape)}")
    height, width = depth_t.shape
    depth_t = torch.where(torch.isfinite(depth_t) & (depth_t > 0), depth_t, torch.zeros_like(depth_t))
    valid = depth_t > 0

    # Back-projection in the camera frame (the pose is irrelevant for camera-frame normals).
    uv = pixel_centers(height, width, dtype=torch.float64, device=device)
    homogeneous = torch.cat([uv, torch.ones_like(uv[..., :1])], dim=-1)
    rays = homogeneous @ torch.linalg.inv(camera.intrinsics.to(device, torch.float64)).T  # [H, W, 3], z = 1
    points = rays * depth_t[..., None]

    radius = window // 2
    # Channels: x, y, z, depth (z again, for the gate; kept separate to make the intent explicit).
    stacked = torch.cat([points.permute(2, 0, 1), depth_t[None]], dim=0)[None]  # [1, 4, H, W]
    padded = F.pad(stacked, (radius, radius, radius, radius))  # zero depth outside = invalid neighbour
    normals = torch.zeros(height, width, 3, dtype=torch.float64, device=device)
    for top in range(0, height, _ROW_CHUNK):
        rows = min(_ROW_CHUNK, height - top)
        block = padded[:, :, top : top + rows + 2 * radius, :]
        neighbours = F.unfold(block, kernel_size=window)  # [1, 4 * window^2, rows * W]
        neighbours = neighbours.view(4, window * window, rows * width)  # channel-first keeps every op contiguous
        z_neighbour = neighbours[3]  # [window^2, P]
        z_centre = depth_t[top : top + rows].reshape(1, -1)  # [1, P]
        keep = (z_neighbour > 0) & ((z_neighbour - z_centre).abs() <= max_relative_jump * z_centre)
        # Neighbourhood sums in float32: coordinates are relative to the centre point (centimetres, not metres),
        # so float32 loses nothing that matters; the 3x3 eigen-decomposition runs in float64.
        weight = keep.to(torch.float32)
        count = weight.sum(dim=0).clamp(min=1)  # [P]
        # Centre the points on the centre pixel first: the covariance is shift-invariant, and subtracting a
        # nearby point avoids cancellation in S2/S0 - mean mean^T at metre-scale coordinates.
        centre_point = points[top : top + rows].reshape(-1, 3).T  # [3, P]
        local = ((neighbours[:3] - centre_point[:, None, :]).to(torch.float32)) * weight  # [3, window^2, P]
        mean = (local.sum(dim=1) / count).to(torch.float64)  # [3, P]
        count = count.to(torch.float64)
        covariance = torch.empty(rows * width, 3, 3, dtype=torch.float64, device=device)
        for a in range(3):
            for b in range(a, 3):
                value = (local[a] * local[b]).sum(dim=0).to(torch.float64) / count - mean[a] * mean[b]
                covariance[:, a, b] = value
                covariance[:, b, a] = value
        count = weight.sum(dim=0)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
        normal = eigenvectors[:, :, 0]  # [P, 3]
        # Defined only with enough points spanning a plane (second eigenvalue clearly above zero).
        scale = eigenvalues[:, 2].clamp(min=0)
        spans_plane = eigenvalues[:, 1] > 1e-6 * scale + 1e-18
        defined = valid[top : top + rows].reshape(-1) & (count >= min_points) & spans_plane
        facing = torch.sign((normal * points[top : top + rows].reshape(-1, 3)).sum(-1, keepdim=True))
        normal = torch.where(facing > 0, -normal, normal)
        normal = torch.nn.functional.normalize(normal, dim=-1)
        normal[~defined] = 0.0
        normals[top : top + rows] = normal.view(rows, width, 3)
    return normals.to("cpu", torch.float32).numpy()
