"""Feature splatting: the torch twin against the compositing definition (CPU), gsplat against the twin (GPU)."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from snd_stages.gaussians import Gaussians
from snd_stages.geometry import Camera, unproject_depth
from snd_stages.splat.render import (
    ALPHA_THRESHOLD,
    EPS2D,
    MAX_ALPHA,
    TRANSMITTANCE_STOP,
    _render_features_torch,
    gsplat_cuda_available,
    render_features,
)

# ----------------------------------------------------------------------------------------------------------------
# Scene helpers
# ----------------------------------------------------------------------------------------------------------------


def make_gaussians(means, scales, opacities, quats=None, dtype=torch.float64) -> Gaussians:
    means = torch.as_tensor(means, dtype=dtype).reshape(-1, 3)
    count = means.shape[0]
    scales = torch.as_tensor(scales, dtype=dtype)
    scales = scales.reshape(count, 1).expand(count, 3).clone() if scales.numel() == count else scales.reshape(count, 3)
    quats = torch.tensor([[1.0, 0, 0, 0]], dtype=dtype).repeat(count, 1) if quats is None else quats.to(dtype)
    return Gaussians(
        means=means,
        quats=quats,
        scales=scales,
        opacities=torch.as_tensor(opacities, dtype=dtype).reshape(count),
        source_view=torch.zeros(count, dtype=torch.long),
        source_pixel=torch.arange(count),
    )


def pinhole(fx, fy, cx, cy, height, width, world_to_camera=None, dtype=torch.float64) -> Camera:
    K = torch.tensor([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dtype=dtype)[None]
    pose = torch.eye(4, dtype=dtype)[None] if world_to_camera is None else world_to_camera.to(dtype)[None]
    return Camera(K, pose, height, width)


def expected_covariance_2d(mean, sigma, fx, fy) -> np.ndarray:
    """EWA projection of an isotropic Gaussian seen by an identity-pose camera, plus the 0.3 px^2 blur."""
    x, y, z = mean
    jacobian = np.array([[fx / z, 0.0, -fx * x / z**2], [0.0, fy / z, -fy * y / z**2]])
    return sigma**2 * jacobian @ jacobian.T + EPS2D * np.eye(2)


def gaussian_alpha(opacity, centre_uv, pixel_uv, covariance_2d) -> float:
    d = np.asarray(centre_uv, dtype=np.float64) - np.asarray(pixel_uv, dtype=np.float64)
    return min(MAX_ALPHA, opacity * math.exp(-0.5 * d @ np.linalg.solve(covariance_2d, d)))


def random_scene(
    count, channels, seed, dtype=torch.float32, device="cpu", spread=1.0, size_range=(0.02, 0.3)
) -> tuple[Gaussians, torch.Tensor]:
    """``count`` random Gaussians in a box in front of an identity camera, plus a few that culling must drop
    (behind, at the camera centre, far outside the view) and one faint one below 1/255."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(low, high, *shape):
        return low + (high - low) * torch.rand(*shape, generator=generator, dtype=torch.float64)

    z = uniform(1.5, 6.0, count)
    means = torch.stack([uniform(-0.9, 0.9, count) * z * spread, uniform(-0.7, 0.7, count) * z * spread, z], -1)
    scales = torch.exp(uniform(math.log(size_range[0]), math.log(size_range[1]), count, 3))
    quats = torch.randn(count, 4, generator=generator, dtype=torch.float64)
    opacities = uniform(0.05, 0.98, count)
    extra_means = torch.tensor(
        [[0.1, 0.0, -2.0], [0.0, 0.0, 0.0], [30.0, 0.5, 1.0], [-0.3, 40.0, 2.0], [0.2, 0.1, 3.0]],
        dtype=torch.float64,
    )
    means = torch.cat([means, extra_means])
    scales = torch.cat([scales, torch.full((5, 3), 0.1, dtype=torch.float64)])
    quats = torch.cat([quats, torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64).repeat(5, 1)])
    opacities = torch.cat([opacities, torch.tensor([0.9, 0.9, 0.9, 0.9, 0.5 / 255], dtype=torch.float64)])
    total = count + 5
    gaussians = Gaussians(
        means, quats, scales, opacities, torch.zeros(total, dtype=torch.long), torch.arange(total)
    ).to(device=device, dtype=dtype)
    features = torch.randn(total, channels, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    return gaussians, features


def two_cameras(height, width, dtype=torch.float32, device="cpu") -> Camera:
    """Two cameras with principal points well away from the image centre, the second one moved and turned."""
    fx = fy = 0.9 * width
    K = torch.tensor(
        [
            [[fx, 0.0, 0.43 * width], [0.0, fy, 0.56 * height], [0.0, 0.0, 1.0]],
            [[1.1 * fx, 0.0, 0.58 * width], [0.0, 1.05 * fy, 0.41 * height], [0.0, 0.0, 1.0]],
        ],
        dtype=torch.float64,
    )
    angle = 0.12
    rotation = torch.tensor(
        [[math.cos(angle), 0.0, math.sin(angle)], [0.0, 1.0, 0.0], [-math.sin(angle), 0.0, math.cos(angle)]],
        dtype=torch.float64,
    )
    poses = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1)
    poses[1, :3, :3] = rotation
    poses[1, :3, 3] = torch.tensor([-0.25, 0.05, 0.1], dtype=torch.float64)
    return Camera(K, poses, height, width).to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# A per-pixel reference written from the definition (gsplat's rules), slow and obviously right
# ----------------------------------------------------------------------------------------------------------------


def render_by_definition(gaussians: Gaussians, features: torch.Tensor, camera: Camera, near=0.01, far=1e10):
    """One pixel and one Gaussian at a time in float64 numpy, following gsplat 1.5.3's kernels literally."""
    means = gaussians.means.double().numpy()
    covariances = gaussians.covariances().double().numpy()
    opacities = gaussians.opacities.double().numpy()
    values = features.double().numpy()
    views, height, width = camera.batch_shape[0], camera.height, camera.width
    output = np.zeros((views, height, width, values.shape[1]))
    alpha_out = np.zeros((views, height, width))
    stopped_pixels = 0
    for view in range(views):
        K = camera.intrinsics[view].double().numpy()
        pose = camera.world_to_camera[view].double().numpy()
        fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
        projected = []  # (depth, index, centre, inverse covariance)
        for index in range(len(means)):
            x, y, z = pose[:3, :3] @ means[index] + pose[:3, 3]
            if not near <= z <= far or opacities[index] < ALPHA_THRESHOLD:
                continue
            clamp_x = np.clip(x / z, -(cx / fx + 0.15 * width / fx), (width - cx) / fx + 0.15 * width / fx)
            clamp_y = np.clip(y / z, -(cy / fy + 0.15 * height / fy), (height - cy) / fy + 0.15 * height / fy)
            jacobian = np.array([[fx / z, 0, -fx * clamp_x / z], [0, fy / z, -fy * clamp_y / z]])
            covariance = jacobian @ pose[:3, :3] @ covariances[index] @ pose[:3, :3].T @ jacobian.T
            covariance = covariance + EPS2D * np.eye(2)
            if np.linalg.det(covariance) <= 0:
                continue
            projected.append((z, index, np.array([fx * x / z + cx, fy * y / z + cy]), np.linalg.inv(covariance)))
        projected.sort(key=lambda item: item[0])
        for row in range(height):
            for col in range(width):
                pixel = np.array([col + 0.5, row + 0.5])
                transmittance = 1.0
                for _, index, centre, inverse in projected:
                    d = centre - pixel
                    sigma = 0.5 * d @ inverse @ d
                    alpha = min(MAX_ALPHA, opacities[index] * math.exp(-sigma))
                    if sigma < 0 or alpha < ALPHA_THRESHOLD:
                        continue
                    if transmittance * (1 - alpha) <= TRANSMITTANCE_STOP:
                        stopped_pixels += 1
                        break
                    output[view, row, col] += values[index] * alpha * transmittance
                    transmittance *= 1 - alpha
                alpha_out[view, row, col] = 1 - transmittance
    return output, alpha_out, stopped_pixels


# ----------------------------------------------------------------------------------------------------------------
# CPU: the twin against the definition
# ----------------------------------------------------------------------------------------------------------------


def test_single_gaussian_peaks_at_its_projection_with_an_off_centre_principal_point():
    height, width, fx, fy, cx, cy = 16, 20, 20.0, 22.0, 6.0, 11.0  # the image centre would be (10, 8)
    row, col, z, sigma, opacity = 5, 13, 2.0, 0.08, 0.7
    mean = ((col + 0.5 - cx) * z / fx, (row + 0.5 - cy) * z / fy, z)  # projects onto the centre of (5, 13)
    feature = torch.tensor([[2.0, -1.0, 0.5]], dtype=torch.float64)
    rendered = render_features(make_gaussians(mean, sigma, opacity), feature, pinhole(fx, fy, cx, cy, height, width))
    image, alpha = rendered.features[0], rendered.alpha[0]

    assert divmod(int(alpha.argmax()), width) == (row, col)
    # At the projected centre exp(0) = 1: the value is opacity * feature, not normalised back to the feature.
    torch.testing.assert_close(image[row, col], opacity * feature[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(alpha[row, col], torch.tensor(opacity, dtype=torch.float64), rtol=0, atol=1e-12)
    # One pixel to the right and one down: Gaussian falloff with the EWA covariance of the definition.
    covariance = expected_covariance_2d(mean, sigma, fx, fy)
    for neighbour in [(row, col + 1), (row + 1, col), (row - 1, col - 1)]:
        expected = gaussian_alpha(opacity, (col + 0.5, row + 0.5), (neighbour[1] + 0.5, neighbour[0] + 0.5), covariance)
        assert 0.05 < expected < opacity
        torch.testing.assert_close(alpha[neighbour].item(), expected, rtol=1e-10, atol=0)
        torch.testing.assert_close(image[neighbour], expected * feature[0], rtol=1e-10, atol=0)
    # Far from the Gaussian: the black background, exactly.
    assert torch.equal(image[-1, 0], torch.zeros(3, dtype=torch.float64))
    assert alpha[-1, 0].item() == 0.0


def test_two_gaussians_compose_front_to_back_whatever_the_input_order():
    height, width, fx, fy, cx, cy = 16, 18, 18.0, 18.0, 11.5, 5.0
    row, col = 8, 9
    ray = np.array([(col + 0.5 - cx) / fx, (row + 0.5 - cy) / fy, 1.0])
    near_mean, far_mean = 2.0 * ray, 5.0 * ray  # both project onto the centre of pixel (8, 9)
    sigmas, opacities = (0.07, 0.25), (0.6, 0.8)
    features = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    camera = pinhole(fx, fy, cx, cy, height, width)

    def render(order):
        gaussians = make_gaussians(
            np.stack([near_mean, far_mean])[order], np.array(sigmas)[order], np.array(opacities)[order]
        )
        return render_features(gaussians, features[order], camera)

    forward, backward = render([0, 1]), render([1, 0])
    torch.testing.assert_close(forward.features, backward.features, rtol=0, atol=1e-14)
    torch.testing.assert_close(forward.alpha, backward.alpha, rtol=0, atol=1e-14)

    covariances = [expected_covariance_2d(m, s, fx, fy) for m, s in zip((near_mean, far_mean), sigmas)]
    centre = (col + 0.5, row + 0.5)
    for pixel_row, pixel_col in [(row, col), (row, col + 2), (row - 3, col + 1), (row + 4, col - 4)]:
        pixel = (pixel_col + 0.5, pixel_row + 0.5)
        a_near, a_far = (gaussian_alpha(o, centre, pixel, c) for o, c in zip(opacities, covariances))
        a_near, a_far = (a if a >= ALPHA_THRESHOLD else 0.0 for a in (a_near, a_far))
        expected = a_near * features[0] + (1 - a_near) * a_far * features[1]
        torch.testing.assert_close(forward.features[0, pixel_row, pixel_col], expected, rtol=1e-10, atol=1e-14)
        expected_alpha = 1 - (1 - a_near) * (1 - a_far)
        alpha = forward.alpha[0, pixel_row, pixel_col].item()
        torch.testing.assert_close(alpha, expected_alpha, rtol=1e-10, atol=1e-14)
    # At the shared centre: the nearer Gaussian's feature dominates, the far one shows through what it leaves.
    torch.testing.assert_close(
        forward.features[0, row, col], 0.6 * features[0] + 0.4 * 0.8 * features[1], rtol=1e-12, atol=0
    )


def test_empty_pixels_are_exactly_zero_and_partial_coverage_is_not_normalised():
    gaussians, features = random_scene(12, 4, seed=3, dtype=torch.float64, spread=0.3)
    rendered = render_features(gaussians, features, pinhole(24.0, 24.0, 13.0, 9.0, 40, 40))
    empty = rendered.alpha[0] == 0
    assert empty.any() and (~empty).any()
    assert torch.equal(rendered.features[0][empty], torch.zeros_like(rendered.features[0][empty]))
    partial = (rendered.alpha[0] > 0.05) & (rendered.alpha[0] < 0.95)
    assert partial.sum() > 10
    # For one Gaussian alone: value = alpha * feature (no division by alpha).
    single = render_features(gaussians[:1], features[:1], pinhole(24.0, 24.0, 13.0, 9.0, 40, 40))
    torch.testing.assert_close(single.features[0], single.alpha[0, ..., None] * features[0], rtol=1e-12, atol=1e-15)


def test_moving_the_principal_point_by_three_pixels_moves_the_image_by_three_pixels():
    gaussians, features = random_scene(25, 3, seed=5, dtype=torch.float64, spread=0.25)
    before = render_features(gaussians, features, pinhole(30.0, 30.0, 15.0, 12.0, 24, 32))
    after = render_features(gaussians, features, pinhole(30.0, 30.0, 18.0, 12.0, 24, 32))
    assert before.alpha.sum() > 10  # the comparison is not between two empty images
    torch.testing.assert_close(after.features[:, :, 3:], before.features[:, :, :-3], rtol=0, atol=1e-12)
    torch.testing.assert_close(after.alpha[:, :, 3:], before.alpha[:, :, :-3], rtol=0, atol=1e-12)
    assert not torch.allclose(after.features, before.features)


def test_twin_matches_the_per_pixel_definition_including_early_stop_and_culling():
    # Dense opaque layers so that many pixels reach the transmittance stop; small tiles and chunks so that the
    # transmittance is carried across chunks and tiles.
    gaussians, features = random_scene(60, 3, seed=11, dtype=torch.float64, spread=0.35, size_range=(0.05, 0.4))
    gaussians.opacities[:60] = 0.6 + 0.39 * gaussians.opacities[:60]
    camera = two_cameras(20, 26, dtype=torch.float64)
    expected, expected_alpha, stopped = render_by_definition(gaussians, features, camera)
    assert stopped > 10, "the scene must exercise the transmittance stop"
    rendered = _render_features_torch(gaussians, features, camera, tile_size=8, max_pairs=64 * 5)
    torch.testing.assert_close(rendered.features, torch.from_numpy(expected), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(rendered.alpha, torch.from_numpy(expected_alpha), rtol=1e-9, atol=1e-12)
    default = render_features(gaussians, features, camera)
    torch.testing.assert_close(default.features, rendered.features, rtol=1e-12, atol=1e-14)


def test_gradients_reach_every_input_and_are_finite():
    gaussians, features = random_scene(40, 5, seed=7, dtype=torch.float32, spread=0.5)
    gaussians.opacities[0] = 1.0  # clamped to 0.999 per pixel: no gradient through the clamp, but no NaN
    leaves = [gaussians.means, gaussians.quats, gaussians.scales, gaussians.opacities, features]
    for leaf in leaves:
        leaf.requires_grad_(True)
    # One camera (off-centre principal point): the extra Gaussians are placed to be culled by this one.
    rendered = render_features(gaussians, features, two_cameras(24, 30)[:1])
    weights = torch.randn_like(rendered.features)
    (rendered.features * weights).sum().add(rendered.alpha.sum()).backward()
    for name, leaf in zip(["means", "quats", "scales", "opacities", "features"], leaves):
        assert leaf.grad is not None, name
        assert torch.isfinite(leaf.grad).all(), name
        assert leaf.grad[:40].abs().sum() > 0, name
    # The culled Gaussians (behind, at the camera centre, outside the view, below 1/255) get exactly zero.
    for leaf in leaves:
        assert torch.equal(leaf.grad[-5:], torch.zeros_like(leaf.grad[-5:]))


def test_gradcheck_on_a_tiny_scene():
    generator = torch.Generator().manual_seed(0)
    means = torch.tensor([[0.05, -0.02, 2.0], [-0.1, 0.08, 2.6], [0.12, 0.1, 3.1]], dtype=torch.float64)
    quats = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    scales = torch.tensor([[0.10, 0.06, 0.14], [0.2, 0.12, 0.08], [0.15, 0.15, 0.1]], dtype=torch.float64)
    opacities = torch.tensor([0.7, 0.5, 0.85], dtype=torch.float64)
    features = torch.randn(3, 2, generator=generator, dtype=torch.float64)
    camera = pinhole(9.0, 10.0, 3.7, 4.4, 8, 8)
    inputs = tuple(t.clone().requires_grad_(True) for t in (means, quats, scales, opacities, features))

    def render(means, quats, scales, opacities, features):
        gaussians = Gaussians(means, quats, scales, opacities, torch.zeros(3, dtype=torch.long), torch.arange(3))
        rendered = render_features(gaussians, features, camera, backend="torch")
        return rendered.features, rendered.alpha

    assert torch.autograd.gradcheck(render, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_cpu_render_of_two_context_views_is_fast_and_bounded():
    height, width, channels = 64, 80, 384
    context = two_cameras(height, width)
    generator = torch.Generator().manual_seed(0)
    depth = 2.0 + torch.rand(2, height, width, generator=generator)
    means = unproject_depth(depth, context).reshape(-1, 3)
    count = means.shape[0]
    footprint = depth.reshape(-1, 1) / context.intrinsics[0, 0, 0]  # metres per pixel at that depth
    gaussians = Gaussians(
        means,
        torch.nn.functional.normalize(torch.randn(count, 4, generator=generator), dim=-1),
        footprint * 0.6 * torch.exp(0.3 * torch.randn(count, 3, generator=generator)),
        0.05 + 0.9 * torch.rand(count, generator=generator),
        torch.arange(2).repeat_interleave(height * width),
        torch.arange(height * width).repeat(2),
    )
    features = torch.randn(count, channels, generator=generator, requires_grad=True)
    start = time.process_time()  # CPU time of this process: robust to other processes sharing the cores
    rendered = render_features(gaussians, features, context[:1])
    (rendered.features.square().sum() + rendered.alpha.sum()).backward()
    elapsed = time.process_time() - start
    assert rendered.features.shape == (1, height, width, channels)
    assert rendered.alpha.min() > 0.5  # the source view itself is covered everywhere
    assert torch.isfinite(features.grad).all()
    assert elapsed < 20, f"forward + backward took {elapsed:.1f} s of CPU time (about 1 s expected)"


def test_bad_inputs_are_rejected_with_their_shapes():
    gaussians, features = random_scene(4, 3, seed=0)
    camera = two_cameras(8, 8)
    with pytest.raises(ValueError, match=r"N = 9 Gaussians.*\(5, 3\)"):
        render_features(gaussians, features[:5], camera)
    with pytest.raises(ValueError, match=r"\(9,\)"):
        render_features(gaussians, features[:, 0], camera)
    with pytest.raises(ValueError, match=r"batch shape \[V\]"):
        render_features(gaussians, features, camera[0])
    with pytest.raises(ValueError, match="backend"):
        render_features(gaussians, features, camera, backend="cuda")
    with pytest.raises(ValueError, match="near"):
        render_features(gaussians, features, camera, near=0.0)


def test_gsplat_backend_refuses_cpu_tensors():
    gaussians, features = random_scene(4, 3, seed=0)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        render_features(gaussians, features, two_cameras(8, 8), backend="gsplat")


# ----------------------------------------------------------------------------------------------------------------
# GPU: gsplat against the twin
# ----------------------------------------------------------------------------------------------------------------

needs_gsplat = pytest.mark.skipif(
    not gsplat_cuda_available(),
    reason="needs a CUDA device and gsplat's CUDA extension"
    if torch.cuda.is_available()
    else "needs a CUDA device (torch.cuda.is_available() is False)",
)

# Explicit tolerances of the parity tests: float32 gsplat against the twin in float64. Measured on an H100
# (scenes below, C in {3, 32, 384}): per-pixel forward error <= 1.5e-6 of the feature scale (alpha <= 1.4e-6)
# except at a few pixels where a pixel-Gaussian pair sits within float32 rounding of the 1/255 skip threshold or
# of the 1e-4 transmittance stop: there the two legitimately differ by one skipped term, at most ~1/255 of the
# feature scale (measured: one pixel of 6144, 5.6e-4; alpha 1.2e-4). Gradients: relative error <= 1e-5 on the
# random and pixel-aligned scenes, <= 1.7e-4 on the opaque one (gsplat's backward recovers the transmittance by
# dividing by 1 - a in float32, which loses digits behind near-opaque terms); cosine >= 0.99999999 everywhere.
FORWARD_TOLERANCE = 1e-5  # per-pixel max |gsplat - twin| / max|feature| (and |d alpha|) off threshold flips
FLIPPED_PIXEL_FRACTION = 2e-3  # pixels allowed above FORWARD_TOLERANCE (about 12 of 2 x 48 x 64)
FLIP_BOUND = 2.0 / 255.0  # the largest difference a threshold flip can make, relative to max|feature|
GRADIENT_RELATIVE_ERROR = 5e-4  # ||g_gsplat - g_twin|| / ||g_twin|| per input
GRADIENT_COSINE = 0.99999


def pixel_aligned_scene(channels, seed, device):
    """Pixel-aligned Gaussians of two 24x32 context views (1536 Gaussians), as the pipeline makes them."""
    generator = torch.Generator().manual_seed(seed)
    context = two_cameras(24, 32, dtype=torch.float64)
    depth = 2.0 + 2.0 * torch.rand(2, 24, 32, generator=generator, dtype=torch.float64)
    means = unproject_depth(depth, context).reshape(-1, 3)
    count = means.shape[0]
    footprint = depth.reshape(-1, 1) / context.intrinsics[0, 0, 0]
    gaussians = Gaussians(
        means,
        torch.randn(count, 4, generator=generator, dtype=torch.float64),
        footprint * 0.5 * torch.exp(0.4 * torch.randn(count, 3, generator=generator, dtype=torch.float64)),
        0.05 + 0.93 * torch.rand(count, generator=generator, dtype=torch.float64),
        torch.arange(2).repeat_interleave(24 * 32),
        torch.arange(24 * 32).repeat(2),
    ).to(device=device, dtype=torch.float32)
    features = torch.randn(count, channels, generator=generator, dtype=torch.float64).to(device, torch.float32)
    return gaussians, features


def render_with_grads(gaussians, features, camera, backend, dtype, loss_weights):
    leaves = [
        t.detach().to(dtype).requires_grad_(True)
        for t in (gaussians.means, gaussians.quats, gaussians.scales, gaussians.opacities, features)
    ]
    scene = Gaussians(*leaves[:4], gaussians.source_view, gaussians.source_pixel)
    rendered = render_features(scene, leaves[4], camera.to(dtype=dtype), backend=backend)
    feature_weights, alpha_weights = loss_weights
    loss = (rendered.features * feature_weights.to(dtype)).sum() + (rendered.alpha * alpha_weights.to(dtype)).sum()
    loss.backward()
    names = ["means", "quats", "scales", "opacities", "features"]
    return rendered, {name: leaf.grad for name, leaf in zip(names, leaves)}


@pytest.mark.gpu
@needs_gsplat
@pytest.mark.parametrize("channels", [3, 32, 384])
@pytest.mark.parametrize("scene", ["random", "opaque", "pixel_aligned"])
def test_gsplat_matches_the_twin_forward_and_backward(scene, channels):
    device = torch.device("cuda")
    if scene == "random":
        gaussians, features = random_scene(1500, channels, seed=channels, device=device)
    elif scene == "opaque":  # deep stacks of near-opaque Gaussians: many pixels reach the transmittance stop
        gaussians, features = random_scene(3000, channels, seed=channels + 1, device=device, size_range=(0.05, 0.4))
        gaussians.opacities[:3000] = 0.6 + 0.39 * gaussians.opacities[:3000]
    else:
        gaussians, features = pixel_aligned_scene(channels, seed=channels, device=device)
    camera = two_cameras(48, 64, device=device)
    generator = torch.Generator(device=device).manual_seed(1)
    loss_weights = (
        torch.randn(2, 48, 64, channels, generator=generator, device=device),
        torch.randn(2, 48, 64, generator=generator, device=device),
    )
    fast, fast_grads = render_with_grads(gaussians, features, camera, "gsplat", torch.float32, loss_weights)
    reference, reference_grads = render_with_grads(gaussians, features, camera, "torch", torch.float64, loss_weights)

    scale = features.abs().max().item()
    feature_error = (fast.features.double() - reference.features).abs() / scale
    alpha_error = (fast.alpha.double() - reference.alpha).abs()
    pixel_error = feature_error.amax(dim=-1)  # [V, H, W]
    flipped = (pixel_error > FORWARD_TOLERANCE).double().mean().item()
    flipped_alpha = (alpha_error > FORWARD_TOLERANCE).double().mean().item()
    typical = torch.quantile(pixel_error.flatten().float(), 1 - FLIPPED_PIXEL_FRACTION).item()
    report = [
        f"[{torch.cuda.get_device_name()}] scene={scene} C={channels} N={len(gaussians)} "
        f"coverage={reference.alpha.mean().item():.3f}",
        f"  forward |d features|/max|f| per pixel: max {pixel_error.max().item():.2e}  "
        f"q{1 - FLIPPED_PIXEL_FRACTION:g} {typical:.2e}  mean {feature_error.mean().item():.2e}  "
        f"pixels >{FORWARD_TOLERANCE:g}: {int((pixel_error > FORWARD_TOLERANCE).sum())}",
        f"  forward |d alpha|: max {alpha_error.max().item():.2e}  mean {alpha_error.mean().item():.2e}  "
        f"pixels >{FORWARD_TOLERANCE:g}: {int((alpha_error > FORWARD_TOLERANCE).sum())}",
    ]
    gradient_stats = {}
    for name, reference_grad in reference_grads.items():
        fast_grad = fast_grads[name].double()
        relative = ((fast_grad - reference_grad).norm() / reference_grad.norm()).item()
        cosine = torch.nn.functional.cosine_similarity(fast_grad.flatten(), reference_grad.flatten(), dim=0).item()
        worst = ((fast_grad - reference_grad).abs().max() / reference_grad.abs().max()).item()
        gradient_stats[name] = (relative, cosine)
        report.append(f"  grad {name:9s}: rel {relative:.2e}  cos {cosine:.8f}  max|d|/max|g| {worst:.2e}")
    print("\n".join(report))

    assert flipped <= FLIPPED_PIXEL_FRACTION and flipped_alpha <= FLIPPED_PIXEL_FRACTION, (flipped, flipped_alpha)
    assert pixel_error.max() < FLIP_BOUND and alpha_error.max() < FLIP_BOUND
    for name, (relative, cosine) in gradient_stats.items():
        assert relative < GRADIENT_RELATIVE_ERROR, (name, relative)
        assert cosine > GRADIENT_COSINE, (name, cosine)


@pytest.mark.gpu
@needs_gsplat
def test_auto_backend_uses_gsplat_on_cuda_and_gsplat_timing():
    device = torch.device("cuda")
    gaussians, features = pixel_aligned_scene(8, seed=0, device=device)
    camera = two_cameras(48, 64, device=device)
    auto = render_features(gaussians, features, camera)
    explicit = render_features(gaussians, features, camera, backend="gsplat")
    assert torch.equal(auto.features, explicit.features)

    # Benchmark at the size of one training target: 2 x 448 x 448 pixel-aligned Gaussians, C = 384, one view.
    size, channels = 448, 384
    context = two_cameras(size, size, device=device)
    depth = 2.0 + torch.rand(2, size, size, device=device)
    means = unproject_depth(depth, context).reshape(-1, 3)
    count = means.shape[0]
    footprint = depth.reshape(-1, 1) / context.intrinsics[0, 0, 0]
    big = Gaussians(
        means,
        torch.nn.functional.normalize(torch.randn(count, 4, device=device), dim=-1),
        (footprint * 0.6).expand(count, 3).contiguous(),
        0.05 + 0.9 * torch.rand(count, device=device),
        torch.zeros(count, dtype=torch.long, device=device),
        torch.zeros(count, dtype=torch.long, device=device),
    )
    values = torch.randn(count, channels, device=device, requires_grad=True)
    target = context[1:]

    def timed(function, repeats=10):
        for _ in range(3):
            function()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(repeats):
            start.record()
            function()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return float(np.median(times))

    def forward():
        with torch.no_grad():
            render_features(big, values, target)

    def forward_backward():
        rendered = render_features(big, values, target)
        rendered.features.sum().backward()

    torch.cuda.reset_peak_memory_stats()
    forward_ms, step_ms = timed(forward), timed(forward_backward)
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(
        f"\n[{torch.cuda.get_device_name()}] gsplat {count} Gaussians -> 1 x {size}x{size}, C={channels}: "
        f"forward {forward_ms:.1f} ms, forward+backward {step_ms:.1f} ms, peak {peak:.2f} GiB"
    )
