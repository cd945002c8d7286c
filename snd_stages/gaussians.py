"""The one ``Gaussians`` type of snd: pixel-aligned 3D Gaussians in the world frame.

.. note:: Conventions
   ``quats`` are unit (w, x, y, z); ``scales`` are standard deviations in metres along the Gaussian's local axes
   (the covariance is R diag(scales)^2 R^T, as in gsplat); ``means`` are world coordinates. Each Gaussian
   remembers the context view and the pixel it was born from, which is what lifting needs: the feature of
   pixel ``source_pixel`` (row-major index ``row * width + column``) of view ``source_view`` goes to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .geometry import quaternion_to_rotation_matrix


@dataclass
class Gaussians:
    """``N`` Gaussians.

    Attributes:
        means: ``[N, 3]`` world positions.
        quats: ``[N, 4]`` unit quaternions, wxyz.
        scales: ``[N, 3]`` standard deviations (metres).
        opacities: ``[N]`` in [0, 1].
        source_view: ``[N]`` index of the context view each Gaussian was born from.
        source_pixel: ``[N]`` row-major pixel index in that view.
    """

    means: Float[Tensor, "N 3"]
    quats: Float[Tensor, "N 4"]
    scales: Float[Tensor, "N 3"]
    opacities: Float[Tensor, " N"]
    source_view: Int[Tensor, " N"]
    source_pixel: Int[Tensor, " N"]

    def __post_init__(self) -> None:
        count = self.means.shape[0]
        expected = {
            "means": (count, 3),
            "quats": (count, 4),
            "scales": (count, 3),
            "opacities": (count,),
            "source_view": (count,),
            "source_pixel": (count,),
        }
        for name, shape in expected.items():
            actual = tuple(getattr(self, name).shape)
            if actual != shape:
                raise ValueError(f"Gaussians.{name} must have shape {shape}, got {actual}")

    def __len__(self) -> int:
        return self.means.shape[0]

    def to(self, device=None, dtype=None) -> "Gaussians":
        """Move to ``device``; ``dtype`` applies to the float fields only."""
        return Gaussians(
            means=self.means.to(device=device, dtype=dtype),
            quats=self.quats.to(device=device, dtype=dtype),
            scales=self.scales.to(device=device, dtype=dtype),
            opacities=self.opacities.to(device=device, dtype=dtype),
            source_view=self.source_view.to(device=device),
            source_pixel=self.source_pixel.to(device=device),
        )

    def split_by_view(self, views_per_set: int, sets: int) -> "list[Gaussians]":
        """Gaussians born from ``sets`` consecutive sets of ``views_per_set`` views, ordered by source view (as a
        pixel-aligned reconstruction of all the views at once gives them) -> each set's own, its source views
        numbered from 0 again."""
        counts = torch.bincount(self.source_view, minlength=views_per_set * sets).reshape(sets, views_per_set)
        ends = counts.sum(1).cumsum(0).tolist()
        parts = []
        for index, (start, end) in enumerate(zip([0, *ends], ends)):
            part = self[start:end]
            part.source_view = part.source_view - index * views_per_set
            parts.append(part)
        return parts

    def __getitem__(self, index) -> "Gaussians":
        return Gaussians(
            self.means[index],
            self.quats[index],
            self.scales[index],
            self.opacities[index],
            self.source_view[index],
            self.source_pixel[index],
        )

    def covariances(self) -> Float[Tensor, "N 3 3"]:
        """World-frame covariances R diag(scales^2) R^T."""
        rotation = quaternion_to_rotation_matrix(self.quats)
        return rotation @ torch.diag_embed(self.scales.square()) @ rotation.transpose(-1, -2)


def export_point_cloud_ply(gaussians: Gaussians, colors: Float[Tensor, "N 3"], path) -> None:
    """Write the Gaussians' centres as a coloured point cloud PLY (open3d), with each Gaussian's thinnest axis
    as its normal, for viewing in open3d, MeshLab or CloudCompare.

    Args:
        colors: ``[N, 3]`` RGB in [0, 1] (e.g. the colour of each Gaussian's source pixel).
    """
    import open3d as o3d  # heavy import, only needed here

    if colors.shape != (len(gaussians), 3):
        raise ValueError(f"colors must have shape {(len(gaussians), 3)}, got {tuple(colors.shape)}")
    rotation = quaternion_to_rotation_matrix(gaussians.quats.double())
    thinnest = gaussians.scales.argmin(dim=-1)
    normals = torch.gather(rotation, 2, thinnest[:, None, None].expand(-1, 3, 1))[..., 0]
    cloud = o3d.geometry.PointCloud()
    cloud.points = o3d.utility.Vector3dVector(gaussians.means.double().numpy())
    cloud.colors = o3d.utility.Vector3dVector(colors.double().clamp(0, 1).numpy())
    cloud.normals = o3d.utility.Vector3dVector(normals.numpy())
    if not o3d.io.write_point_cloud(str(path), cloud):
        raise OSError(f"open3d could not write {path}")
