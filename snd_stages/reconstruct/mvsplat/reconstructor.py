"""snd's boundary around the MVSplat encoder (and DepthSplat's, which shares it): our cameras in, our
:class:`Gaussians` out.

In: images ``[V, H, W, 3]`` uint8 and a :class:`Camera` (K in pixels, OpenCV world-to-camera) become MVSplat's
inputs: RGB in [0, 1], intrinsics normalised by the image size (row 0 / W, row 1 / H, which keeps the
pixel-centre convention: pixel (i, j) sits at ((j + 0.5) / W, (i + 0.5) / H)), camera-to-world extrinsics.

Out: the encoder's Gaussians become snd's: world means as predicted; quaternions rotated from the camera frame
(where MVSplat leaves them) into the world by the camera's rotation and reordered xyzw -> wxyz; the scales
(standard deviations; MVSplat's covariance is R diag(s)^2 R^T); the opacities; and each Gaussian's source view
and pixel (``row * W + col``), in (view, row, column) order.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from ...errors import DataError
from ...gaussians import Gaussians
from ...geometry import Camera, canonical_quaternion, image_to_tensor, quaternion_multiply, rotation_matrix_to_quaternion
from .encoder import SIZE_MULTIPLE, MVSplatEncoder, MVSplatOutput


class PairEncoder(Protocol):
    """What :func:`reconstruct_pair` needs of an encoder besides MVSplat's: its name, its size rule, and MVSplat's
    call signature and output fields (``depths``, ``means``, ``scales``, camera-frame xyzw ``rotations``,
    ``opacities``)."""

    name: str
    size_multiple: int

    def parameters(self) -> Iterator[torch.nn.Parameter]: ...

    def __call__(self, *, images: Tensor, intrinsics: Tensor, camera_to_world: Tensor, near: Tensor, far: Tensor,
                 with_harmonics: bool) -> MVSplatOutput: ...


@dataclass(frozen=True)
class MVSplatReconstruction:
    """One context pair reconstructed by MVSplat (or DepthSplat).

    Attributes:
        gaussians: ``2 H W`` Gaussians in snd's conventions, on the CPU.
        depth: ``[V, H, W]`` the encoder's per-pixel depth (metres, on the CPU). MVSplat's cost volume estimates it
            as a z-depth; its Gaussians sit at this distance along the unit ray through their pixel. DepthSplat's
            Gaussians sit at this z-depth.
    """

    gaussians: Gaussians
    depth: Float[Tensor, "V H W"]


def check_context_size(
    height: int, width: int, names: tuple[str, ...] = (), multiple: int = SIZE_MULTIPLE, reconstructor: str = "mvsplat"
) -> None:
    """Raise :class:`DataError` unless ``height`` and ``width`` are multiples of ``multiple`` (16 for MVSplat,
    whose U-Nets halve the image four times; DepthSplat's models say their own)."""
    if height % multiple or width % multiple:
        frames = f" ({', '.join(names)})" if names else ""
        example = next(size for size in ("576x880", "448x768", "512x1024")
                       if all(int(side) % multiple == 0 for side in size.split("x")))
        raise DataError(
            f"context frames{frames} are {height}x{width}, but the {reconstructor} reconstructor needs height and "
            f"width that are multiples of {multiple}; resize the dataset frames, e.g. to {example} (for the demo "
            f"dataset: set demo.height and demo.width to multiples of {multiple})"
        )


def encoder_inputs(
    images: np.ndarray, camera: Camera, near: float, far: float, device: torch.device | str = "cpu"
) -> dict[str, Tensor]:
    """MVSplat's inputs for one pair, batch of one, float32 on ``device``.

    Args:
        images: ``[V, H, W, 3]`` uint8 RGB.
        camera: ``[V]`` cameras of those images.

    Returns:
        ``images`` ``[1, V, 3, H, W]`` in [0, 1], ``intrinsics`` ``[1, V, 3, 3]`` normalised, ``camera_to_world``
        ``[1, V, 4, 4]``, ``near`` and ``far`` ``[1, V]``: the keyword arguments of :meth:`MVSplatEncoder.forward`.
    """
    views, height, width = images.shape[:3]
    if (height, width) != (camera.height, camera.width):
        raise DataError(f"context images are {height}x{width} but their cameras are {camera.height}x{camera.width}")
    pixels = torch.stack([image_to_tensor(image) for image in images])
    intrinsics = camera.intrinsics.to(torch.float64).clone()
    intrinsics[..., 0, :] /= width
    intrinsics[..., 1, :] /= height
    camera_to_world = camera.camera_to_world.to(torch.float64)
    bounds = torch.ones(1, views, dtype=torch.float32)
    inputs = {
        "images": pixels[None],
        "intrinsics": intrinsics[None].float(),
        "camera_to_world": camera_to_world[None].float(),
        "near": bounds * near,
        "far": bounds * far,
    }
    return {name: value.to(device) for name, value in inputs.items()}


def to_gaussians(output: MVSplatOutput, camera_to_world: Float[Tensor, "V 4 4"], sample: int = 0) -> Gaussians:
    """The encoder's Gaussians of batch element ``sample`` in snd's conventions (see the module docstring)."""
    views, height, width = output.depths.shape[1:]
    device = output.means.device
    camera_rotation = rotation_matrix_to_quaternion(camera_to_world[:, :3, :3].to(device, torch.float64))  # wxyz
    local = output.rotations[sample].to(torch.float64)[..., [3, 0, 1, 2]]  # xyzw -> wxyz, camera frame
    world = canonical_quaternion(quaternion_multiply(camera_rotation[:, None, None, :], local))
    count = views * height * width
    source_view = torch.arange(views, device=device).repeat_interleave(height * width)
    source_pixel = torch.arange(height * width, device=device).repeat(views)
    return Gaussians(
        means=output.means[sample].reshape(count, 3).float(),
        quats=world.reshape(count, 4).float(),
        scales=output.scales[sample].reshape(count, 3).float(),
        opacities=output.opacities[sample].reshape(count).float(),
        source_view=source_view,
        source_pixel=source_pixel,
    )


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """Disable TF32 in cuBLAS matmuls and cuDNN convolutions for the duration (restored afterwards).

    TF32 keeps 10 mantissa bits: enough to move MVSplat's depths by far more than float32 noise (a disparity
    wobble of 1e-5 is already 0.03 m at 100 m), so the encoder runs in true float32.
    """
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


def reconstruct_pair(
    encoder: MVSplatEncoder | PairEncoder,
    images: np.ndarray,
    camera: Camera,
    near: float,
    far: float,
    names: tuple[str, ...] = (),
) -> MVSplatReconstruction:
    """Run ``encoder`` (on its own device, float32, TF32 off) on one context pair.

    Args:
        encoder: MVSplat's, or another encoder with its boundary (DepthSplat's).
        images: ``[2, H, W, 3]`` uint8 RGB, H and W multiples of the encoder's ``size_multiple``.
        camera: ``[2]`` cameras of the images (K in pixels, world-to-camera).
        near, far: depth range in metres (MVSplat's authors use 1 and 100).
        names: frame names for error messages.
    """
    if images.shape[0] != 2:
        raise DataError(f"the {encoder.name} reconstructor takes exactly 2 context views, got {images.shape[0]}")
    check_context_size(images.shape[1], images.shape[2], names, encoder.size_multiple, encoder.name)
    device = next(encoder.parameters()).device
    inputs = encoder_inputs(images, camera, near, far, device)
    with torch.no_grad(), full_float32():
        output = encoder(**inputs, with_harmonics=False)
    gaussians = to_gaussians(output, camera.camera_to_world.to(torch.float64))
    return MVSplatReconstruction(gaussians=gaussians.to("cpu"), depth=output.depths[0].float().cpu())
