"""Cameras and the one set of geometric conventions used everywhere in snd.

.. note:: Conventions (asserted at every artifact boundary, recorded in every artifact's attributes)

   - Camera frame: OpenCV — x right, y down, z forward (into the scene).
   - Extrinsics are stored **world-to-camera** 4x4 matrices (gsplat's ``viewmats``).
   - Intrinsics ``K`` are in pixels of the stored image size. Image coordinates put the top-left *corner*
     of the top-left pixel at (0, 0), so pixel (row i, column j) has its centre at (j + 0.5, i + 0.5).
     This is COLMAP's, nerfstudio's and gsplat's convention; with it, resizing an image by (sx, sy)
     scales K exactly by diag(sx, sy, 1). The principal point is honoured, never assumed centred.
   - Quaternions are (w, x, y, z), unit norm (gsplat's order).
   - Depth is metric z-depth (metres) along the optical axis; 0 marks an invalid pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, UInt8
from torch import Tensor

CONVENTIONS = {
    "camera_frame": "opencv (x right, y down, z forward)",
    "extrinsics": "world_to_camera 4x4",
    "intrinsics": "pixels of the stored image; pixel (i, j) centre at (j + 0.5, i + 0.5)",
    "quaternion_order": "wxyz",
    "depth": "metric z-depth in metres, 0 = invalid",
    "image": "uint8 RGB on disk, float [0, 1] in memory",
}

# Flips the y and z camera axes: OpenGL/nerfstudio (x right, y up, z backward) <-> OpenCV. Its own inverse.
OPENGL_TO_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])


@dataclass(frozen=True)
class Camera:
    """One or more pinhole cameras sharing an image size.

    Attributes:
        intrinsics: ``[*batch, 3, 3]`` K in pixels of an image of ``height`` x ``width``.
        world_to_camera: ``[*batch, 4, 4]`` rigid transforms from world to OpenCV camera coordinates.
        height: image rows.
        width: image columns.
    """

    intrinsics: Float[Tensor, "*batch 3 3"]
    world_to_camera: Float[Tensor, "*batch 4 4"]
    height: int
    width: int

    def __post_init__(self) -> None:
        if self.intrinsics.shape[-2:] != (3, 3):
            raise ValueError(f"intrinsics must be [..., 3, 3], got {tuple(self.intrinsics.shape)}")
        if self.world_to_camera.shape[-2:] != (4, 4):
            raise ValueError(f"world_to_camera must be [..., 4, 4], got {tuple(self.world_to_camera.shape)}")
        if self.intrinsics.shape[:-2] != self.world_to_camera.shape[:-2]:
            raise ValueError(
                f"intrinsics batch {tuple(self.intrinsics.shape[:-2])} != "
                f"world_to_camera batch {tuple(self.world_to_camera.shape[:-2])}"
            )

    @property
    def batch_shape(self) -> torch.Size:
        return self.intrinsics.shape[:-2]

    @property
    def camera_to_world(self) -> Float[Tensor, "*batch 4 4"]:
        return invert_rigid(self.world_to_camera)

    @property
    def center(self) -> Float[Tensor, "*batch 3"]:
        """Camera centres in world coordinates."""
        return self.camera_to_world[..., :3, 3]

    def __getitem__(self, index) -> "Camera":
        return Camera(self.intrinsics[index], self.world_to_camera[index], self.height, self.width)

    @staticmethod
    def cat(cameras: "list[Camera]") -> "Camera":
        """Cameras of one image size, batches ``[n_i]`` -> one batch ``[sum n_i]`` in order."""
        sizes = {(camera.height, camera.width) for camera in cameras}
        if len(sizes) != 1:
            raise ValueError(f"cameras of one image size can be concatenated, got sizes {sorted(sizes)}")
        return Camera(torch.cat([camera.intrinsics for camera in cameras]),
                      torch.cat([camera.world_to_camera for camera in cameras]), cameras[0].height, cameras[0].width)

    def to(self, device=None, dtype=None) -> "Camera":
        return Camera(
            self.intrinsics.to(device=device, dtype=dtype),
            self.world_to_camera.to(device=device, dtype=dtype),
            self.height,
            self.width,
        )

    def resized(self, height: int, width: int) -> "Camera":
        """The same cameras for the image resized (not cropped) to ``height`` x ``width``."""
        scale = torch.tensor(
            [width / self.width, height / self.height, 1.0], dtype=self.intrinsics.dtype, device=self.intrinsics.device
        )
        return Camera(self.intrinsics * scale[:, None], self.world_to_camera, height, width)

    def cropped(self, top: int, left: int, height: int, width: int) -> "Camera":
        """The same cameras for the window ``[top:top+height, left:left+width]`` of the image."""
        K = self.intrinsics.clone()
        K[..., 0, 2] -= left
        K[..., 1, 2] -= top
        return Camera(K, self.world_to_camera, height, width)


def image_to_channels(image) -> UInt8[Tensor, "3 H W"]:
    """``[H, W, 3]`` uint8 RGB (as stored) -> contiguous ``[3, H, W]`` uint8: a quarter of the float image's bytes,
    the form in which training moves images to the GPU before :func:`unit_range` there."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()


def unit_range(channels: UInt8[Tensor, "*batch"]) -> Float[Tensor, "*batch"]:
    """uint8 levels -> float32 in [0, 1], on the tensor's device.

    A multiplication by the float32 ``1 / 255`` rather than a division: CUDA's division by a scalar multiplies
    by its reciprocal where the CPU's divides, which differ in the last bit for half of the 256 levels. One
    correctly rounded product is the same on both, so images converted on the GPU equal those converted here.
    """
    return channels.float() * (1.0 / 255.0)


def image_to_tensor(image) -> Float[Tensor, "3 H W"]:
    """``[H, W, 3]`` uint8 RGB (as stored) -> ``[3, H, W]`` float in [0, 1] (as used in memory)."""
    return unit_range(image_to_channels(image))


def invert_rigid(transform: Float[Tensor, "*batch 4 4"]) -> Float[Tensor, "*batch 4 4"]:
    """Inverse of rigid 4x4 transforms, exact (transpose of the rotation) rather than a general inverse."""
    rotation = transform[..., :3, :3]
    translation = transform[..., :3, 3:]
    inverse = torch.zeros_like(transform)
    inverse[..., :3, :3] = rotation.transpose(-1, -2)
    inverse[..., :3, 3:] = -rotation.transpose(-1, -2) @ translation
    inverse[..., 3, 3] = 1
    return inverse


def check_rigid(transform: np.ndarray, name: str, atol: float = 1e-3) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``transform`` is a finite rigid 4x4 (rotation, det +1)."""
    transform = np.asarray(transform, dtype=np.float64)
    if transform.shape != (4, 4):
        raise ValueError(f"{name}: expected a 4x4 pose matrix, got shape {transform.shape}")
    if not np.isfinite(transform).all():
        raise ValueError(f"{name}: pose contains NaN or inf values")
    rotation = transform[:3, :3]
    orthogonality = np.abs(rotation.T @ rotation - np.eye(3)).max()
    if orthogonality > atol or abs(np.linalg.det(rotation) - 1.0) > atol:
        raise ValueError(
            f"{name}: pose is not rigid (|R^T R - I| = {orthogonality:.2e}, det R = {np.linalg.det(rotation):.4f}); "
            "expected a rotation with determinant +1 and no scale or shear"
        )
    if np.abs(transform[3] - np.array([0, 0, 0, 1])).max() > atol:
        raise ValueError(f"{name}: last row of the pose must be [0, 0, 0, 1], got {transform[3].tolist()}")


def opengl_camera_to_world_to_opencv_world_to_camera(camera_to_world_gl: np.ndarray) -> np.ndarray:
    """nerfstudio / OpenGL camera-to-world (y up, z back) -> OpenCV world-to-camera. The world frame is kept."""
    camera_to_world_cv = np.asarray(camera_to_world_gl, dtype=np.float64) @ OPENGL_TO_OPENCV
    return np.linalg.inv(camera_to_world_cv)


def opencv_world_to_camera_to_opengl_camera_to_world(world_to_camera_cv: np.ndarray) -> np.ndarray:
    """Inverse of :func:`opengl_camera_to_world_to_opencv_world_to_camera`."""
    return np.linalg.inv(np.asarray(world_to_camera_cv, dtype=np.float64)) @ OPENGL_TO_OPENCV


def pixel_centers(height: int, width: int, dtype=torch.float32, device=None) -> Float[Tensor, "height width 2"]:
    """(u, v) image coordinates of every pixel centre, ``[..., 0]`` = column + 0.5, ``[..., 1]`` = row + 0.5."""
    rows = torch.arange(height, dtype=dtype, device=device) + 0.5
    cols = torch.arange(width, dtype=dtype, device=device) + 0.5
    v, u = torch.meshgrid(rows, cols, indexing="ij")
    return torch.stack([u, v], dim=-1)


def unproject_depth(depth: Float[Tensor, "*batch H W"], camera: Camera) -> Float[Tensor, "*batch H W 3"]:
    """World points of every pixel centre at its z-depth. Invalid (0) depth lands on the camera centre.

    Args:
        depth: ``[*batch, H, W]`` metric z-depth; ``camera`` has the same batch shape and image size.
    """
    height, width = depth.shape[-2:]
    if (height, width) != (camera.height, camera.width):
        raise ValueError(f"depth is {height}x{width} but the camera is {camera.height}x{camera.width}")
    uv = pixel_centers(height, width, dtype=depth.dtype, device=depth.device)
    homogeneous = torch.cat([uv, torch.ones_like(uv[..., :1])], dim=-1)  # [H, W, 3]
    K_inv = torch.linalg.inv(camera.intrinsics.to(depth.dtype))  # [*batch, 3, 3]
    rays = torch.einsum("...ij,hwj->...hwi", K_inv, homogeneous)  # z = 1 rays in camera frame
    points_camera = rays * depth[..., None]
    camera_to_world = camera.camera_to_world.to(depth.dtype)
    rotation = camera_to_world[..., None, None, :3, :3]
    translation = camera_to_world[..., None, None, :3, 3]
    return (rotation @ points_camera[..., None])[..., 0] + translation


def transform_points(transform: Float[Tensor, "*batch 4 4"], points: Float[Tensor, "*batch N 3"]) -> Tensor:
    """Apply 4x4 transforms to points: ``R p + t``."""
    return points @ transform[..., :3, :3].transpose(-1, -2) + transform[..., None, :3, 3]


def project_points(
    points_world: Float[Tensor, "*batch N 3"], camera: Camera
) -> tuple[Float[Tensor, "*batch N 2"], Float[Tensor, "*batch N"]]:
    """Image coordinates (u, v) and z-depth of world points seen by ``camera`` (no visibility test)."""
    points_camera = transform_points(camera.world_to_camera.to(points_world.dtype), points_world)
    depth = points_camera[..., 2]
    projected = points_camera @ camera.intrinsics.to(points_world.dtype).transpose(-1, -2)
    uv = projected[..., :2] / projected[..., 2:3]
    return uv, depth


def quaternion_to_rotation_matrix(quaternions: Float[Tensor, "*batch 4"]) -> Float[Tensor, "*batch 3 3"]:
    """Rotation matrices of (w, x, y, z) quaternions; the quaternions are normalised first."""
    w, x, y, z = torch.nn.functional.normalize(quaternions, dim=-1).unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(*quaternions.shape[:-1], 3, 3)


def rotation_matrix_to_quaternion(rotation: Float[Tensor, "*batch 3 3"]) -> Float[Tensor, "*batch 4"]:
    """(w, x, y, z) unit quaternions with w >= 0 of rotation matrices (det +1).

    Uses the largest-diagonal branch per element, which is stable for every rotation, including 180 degrees.
    """
    m = rotation
    m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    trace = m00 + m11 + m22
    candidates = torch.stack(
        [
            torch.stack([1 + trace, m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1),
            torch.stack([m[..., 2, 1] - m[..., 1, 2], 1 + m00 - m11 - m22, m[..., 0, 1] + m[..., 1, 0], m[..., 0, 2] + m[..., 2, 0]], -1),
            torch.stack([m[..., 0, 2] - m[..., 2, 0], m[..., 0, 1] + m[..., 1, 0], 1 - m00 + m11 - m22, m[..., 1, 2] + m[..., 2, 1]], -1),
            torch.stack([m[..., 1, 0] - m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0], m[..., 1, 2] + m[..., 2, 1], 1 - m00 - m11 + m22], -1),
        ],
        dim=-2,
    )  # [*batch, 4 branches, 4]; branch k is 4 q_k q, so its norm is largest where |q_k| is largest
    best = torch.stack([trace, m00, m11, m22], dim=-1).argmax(dim=-1)
    chosen = torch.gather(candidates, -2, best[..., None, None].expand(*best.shape, 1, 4))[..., 0, :]
    return canonical_quaternion(chosen)


def canonical_quaternion(quaternions: Float[Tensor, "*batch 4"]) -> Float[Tensor, "*batch 4"]:
    """Unit (w, x, y, z) quaternions with w >= 0: one of the two quaternions of each rotation."""
    quaternion = torch.nn.functional.normalize(quaternions, dim=-1)
    return torch.where(quaternion[..., :1] < 0, -quaternion, quaternion)


def quaternion_multiply(a: Float[Tensor, "*batch 4"], b: Float[Tensor, "*batch 4"]) -> Float[Tensor, "*batch 4"]:
    """Hamilton product of (w, x, y, z) quaternions: the rotation ``R(a) R(b)``."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        dim=-1,
    )


def rotation_angle_degrees(rotation) -> float:
    """Geodesic angle of a 3x3 rotation matrix in degrees, in [0, 180], precise at every angle.

    ``acos((trace R − 1) / 2)`` loses half its digits near 0° and 180°, where the cosine's slope vanishes: a
    30° turn composed with a 70° one came back 1.2e-6° off. The angle is instead
    ``atan2(‖vee(R − Rᵀ)‖, trace R − 1)``, since ``R − Rᵀ = 2 sin θ [k]×`` and ``trace R − 1 = 2 cos θ``; atan2 of
    sine and cosine together keeps full precision everywhere.

    Args:
        rotation: ``[3, 3]`` rotation (numpy array or torch tensor), computed in float64.
    """
    r = np.asarray(rotation.detach().cpu() if isinstance(rotation, torch.Tensor) else rotation, dtype=np.float64)
    sine_axis = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]])  # 2 sin θ · axis
    return float(np.degrees(np.arctan2(np.linalg.norm(sine_axis), np.trace(r) - 1.0)))


def angle_between_degrees(a: Float[Tensor, "*batch 3"], b: Float[Tensor, "*batch 3"]) -> Float[Tensor, "*batch"]:
    """Angle between 3-vectors of any length in degrees, in [0, 180]: ``atan2(‖a × b‖, a · b)`` in float64.

    ``acos`` of the cosine similarity is imprecise near 0° and 180° (see :func:`rotation_angle_degrees`).
    A zero vector gives 0°.
    """
    a, b = a.double(), b.double()
    return torch.rad2deg(torch.atan2(torch.linalg.cross(a, b, dim=-1).norm(dim=-1), (a * b).sum(-1)))
