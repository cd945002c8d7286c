"""The report's pictures: each probe's predictions beside the truth for every model, and PCA feature maps.

Each picture is a row (or column) of titled panels: the test image, the truth, then one panel per model, as
``report.md`` orders the models.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..scenes.correspondence import CorrespondencePair
from ..visualize import pca_rgb
from .backbone import Features
from .frames import ProbeFrames


def depth_figure(report_dir: Path, frames: ProbeFrames, predictions: dict[str, list]) -> Path:
    """``depth.png``: the first test frame's depth, truth and each model's probe, on one colour scale."""
    truth = frames.depth[0].numpy()
    high = float(truth.max())
    panels = [_first_image(frames), colour_map(truth, 0, high)]
    panels += [colour_map(shown[0].numpy(), 0, high) for shown in predictions.values()]
    return save_panels(report_dir / "depth.png", panels, ["image", "truth", *predictions])


def normals_figure(report_dir: Path, frames: ProbeFrames, predictions: dict[str, list]) -> Path:
    """``normals.png``: the first test frame's normals as RGB = (n + 1) / 2, truth and each model's probe."""
    def to_rgb(normals):
        return ((normals.clamp(-1, 1) + 1) / 2 * 255).round().byte().numpy()

    panels = [_first_image(frames), to_rgb(frames.normals[0].float().permute(1, 2, 0))]
    panels += [to_rgb(shown[0].permute(1, 2, 0)) for shown in predictions.values()]
    return save_panels(report_dir / "normals.png", panels, ["image", "truth", *predictions])


def correspondence_figure(report_dir: Path, frames: ProbeFrames, predictions: dict[str, tuple]) -> Path:
    """``correspondence.png``: the first pair's top matches for each model, one row per model."""
    rows = [correspondence_picture(*shown) for shown in predictions.values()]
    return save_panels(report_dir / "correspondence.png", rows, list(predictions), vertical=True)


def pca_figure(report_dir: Path, frames: ProbeFrames, features: dict[str, Features]) -> Path:
    """``pca.png``: the first test frame and each model's final-normed last-block tokens in PCA colours."""
    image = _first_image(frames)
    panels = [pca_picture(tokens, image.shape[:2]) for tokens in features.values()]
    return save_panels(report_dir / "pca.png", [image, *panels], ["image", *features])


def _first_image(frames: ProbeFrames) -> np.ndarray:
    return np.asarray(frames.load_image(0))


def colour_map(values: np.ndarray, low: float, high: float) -> np.ndarray:
    import matplotlib

    scaled = np.clip((values - low) / max(high - low, 1e-9), 0, 1)
    return (matplotlib.colormaps["magma_r"](scaled)[..., :3] * 255).astype(np.uint8)


def pca_picture(features: Features, size) -> np.ndarray:
    picture = pca_rgb(features.tokens[0])
    return np.asarray(Image.fromarray(picture).resize((size[1], size[0]), Image.NEAREST))


def correspondence_picture(pair: CorrespondencePair, pixels0, pixels1, errors, shown: int = 80) -> np.ndarray:
    """Both images side by side, every n-th of the top matches as a line from green (0 px) to red (>= 20 px)."""
    image0, image1 = pair.load_image(0), pair.load_image(1)
    width = image0.shape[1]
    canvas = Image.fromarray(np.concatenate([image0, image1], axis=1))
    draw = ImageDraw.Draw(canvas)
    for index in range(0, len(errors), max(1, len(errors) // shown)):
        badness = min(float(errors[index]) / 20.0, 1.0)
        (x0, y0), (x1, y1) = pixels0[index].tolist(), pixels1[index].tolist()
        draw.line([(x0, y0), (x1 + width, y1)], fill=(int(255 * badness), int(255 * (1 - badness)), 0), width=1)
    return np.asarray(canvas)


def save_panels(path: Path, panels: list[np.ndarray], titles: list[str], vertical: bool = False) -> Path:
    """Panels side by side (or stacked), each under a title strip that names it."""
    titled = []
    for panel, title in zip(panels, titles):
        strip = Image.new("RGB", (panel.shape[1], 14), (255, 255, 255))
        ImageDraw.Draw(strip).text((2, 1), title[: max(4, panel.shape[1] // 6)], fill=(0, 0, 0))
        titled.append(np.concatenate([np.asarray(strip), panel[..., :3]], axis=0))
    Image.fromarray(np.concatenate(titled, axis=0 if vertical else 1)).save(path)
    return path
