"""Pictures of per-tile scores on a slide: smooth score maps, a figure with a colour bar, tile montages.

Scores live on tiles; a tile covers the level-0 box of its cell (see :func:`tile_boxes`). Where tiles
overlap (a stride smaller than the tile, e.g. CLAM's 50 % overlap), a thumbnail pixel shows the mean of
the scores of every tile covering it, so overlapping tiles give a smooth map. An optional Gaussian blur
(normalised by the tissue it covers, so edges do not fade) smooths further.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from ..errors import ConfigError
from ..fileio import atomic_path

SCALES = ("rank", "percentile", "linear")


@dataclass(frozen=True)
class HeatmapStyle:
    """How scores are drawn.

    Attributes:
        scale: ``rank`` (each tile's rank among the slide's tiles, 0–1: every slide uses the whole colour
            range), ``percentile`` (linear between the ``clip`` percentiles of the scores, clipped), or
            ``linear`` (linear between the smallest and largest score).
        clip: (low, high) percentiles for ``percentile``.
        blur: Gaussian blur, sigma in tile strides (0: none).
        alpha: opacity of the colour over tissue.
        cmap: matplotlib colour map.
        colorbar: also write ``<slide>_figure.png`` with a colour bar.
        top_k: number of highest and of lowest scoring tiles in the montage (0: no montage).
    """

    scale: Literal["rank", "percentile", "linear"] = "rank"
    clip: tuple[float, float] = (1.0, 99.0)
    blur: float = 0.0
    alpha: float = 0.5
    cmap: str = "jet"
    colorbar: bool = True
    top_k: int = 8

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ConfigError(f"--scale must be one of {', '.join(SCALES)}, not {self.scale!r}.")
        lo, hi = self.clip
        if not 0 <= lo < hi <= 100:
            raise ConfigError(f"percentile clip must satisfy 0 ≤ low < high ≤ 100, got {self.clip}.")
        if self.blur < 0 or not 0 <= self.alpha <= 1 or self.top_k < 0:
            raise ConfigError("--blur must be ≥ 0, alpha in [0, 1] and --top-k ≥ 0.")

    def to_dict(self) -> dict:
        return asdict(self)


def scale_scores(values: np.ndarray, style: HeatmapStyle) -> tuple[np.ndarray, tuple[float, float]]:
    """Scores → [0, 1] for the colour map, and the (low, high) score values the ends of the bar stand for.

    For ``rank`` the ends are ranks 0 and 100 (percent of tiles below).
    """
    from .attention import percentiles

    v = np.asarray(values, np.float64)
    if style.scale == "rank":
        return percentiles(v) / 100.0, (0.0, 100.0)
    if v.size == 0:
        return v, (0.0, 1.0)
    lo, hi = (np.percentile(v, style.clip) if style.scale == "percentile" else (v.min(), v.max()))
    span = hi - lo if hi > lo else 1.0
    return np.clip((v - lo) / span, 0.0, 1.0), (float(lo), float(hi))


def score_map(shape: tuple[int, int], boxes: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean score of the tiles covering each pixel of an image.

    Args:
        shape: (h, w) of the image.
        boxes: (N, 4) tile boxes (x0, y0, x1, y1) in image pixels.
        values: (N,) scores.

    Returns:
        (h, w) float64 mean score (0 where no tile), and (h, w) int32 number of tiles covering each pixel.
    """
    h, w = shape
    total = np.zeros((h + 1, w + 1), np.float64)
    count = np.zeros((h + 1, w + 1), np.int32)
    for (x0, y0, x1, y1), v in zip(boxes, values):
        c0, r0 = max(int(np.floor(x0)), 0), max(int(np.floor(y0)), 0)
        c1, r1 = min(int(np.ceil(x1)), w), min(int(np.ceil(y1)), h)
        if c1 > c0 and r1 > r0:  # summed-area corners: +v at (r0, c0) … cumulated below
            total[r0, c0] += v
            total[r0, c1] -= v
            total[r1, c0] -= v
            total[r1, c1] += v
            count[r0, c0] += 1
            count[r0, c1] -= 1
            count[r1, c0] -= 1
            count[r1, c1] += 1
    total = total.cumsum(0).cumsum(1)[:h, :w]
    count = count.cumsum(0).cumsum(1)[:h, :w]
    mean = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    return mean, count


def blurred(mean: np.ndarray, covered: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur of ``mean`` over the ``covered`` pixels only (normalised convolution)."""
    import cv2

    if sigma_px <= 0:
        return mean
    w = covered.astype(np.float64)
    num = cv2.GaussianBlur(mean * w, (0, 0), sigma_px)
    den = cv2.GaussianBlur(w, (0, 0), sigma_px)
    return np.where(covered, num / np.maximum(den, 1e-12), 0.0)


def blend(thumb: np.ndarray, unit: np.ndarray, covered: np.ndarray, style: HeatmapStyle,
          cmap: str | None = None) -> np.ndarray:
    """Colour ``unit`` (values in [0, 1]) over the ``covered`` pixels of an RGB thumbnail."""
    import matplotlib

    colours = matplotlib.colormaps[cmap or style.cmap](np.clip(unit, 0, 1))[..., :3] * 255.0
    img = thumb.astype(np.float64)
    a = style.alpha * covered[..., None]
    return np.clip((1 - a) * img + a * colours + 0.5, 0, 255).astype(np.uint8)


def save_png(path: Path, img: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(img).save(tmp, format="PNG")


def _figure_to_png(fig, path: Path, dpi: int) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)


def colorbar_figure(path: Path, img: np.ndarray, style: HeatmapStyle, ends: tuple[float, float], title: str,
                    label: str, cmap: str | None = None) -> None:
    """The overlay with a colour bar (and a title) as a figure for a paper."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    h, w = img.shape[:2]
    dpi = 100
    fig, ax = plt.subplots(figsize=(max(w / dpi, 3.0) + 1.2, max(h / dpi, 3.0)), dpi=dpi)
    ax.imshow(img, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    bar = fig.colorbar(ScalarMappable(Normalize(*ends), cmap or style.cmap), ax=ax, fraction=0.04, pad=0.02)
    bar.set_label(label)
    _figure_to_png(fig, path, dpi)


def extreme_tiles(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the ``k`` highest (highest first) and ``k`` lowest (lowest first) scores."""
    order = np.argsort(-np.asarray(values), kind="stable")
    k = min(k, len(order))
    return order[:k], order[::-1][:k]


def montage(path: Path, tiles_top: list[np.ndarray], tiles_bottom: list[np.ndarray], labels_top: list[str],
            labels_bottom: list[str], title: str) -> None:
    """Top and bottom tiles in two rows, each titled with its level-0 coordinates and score."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    k = max(len(tiles_top), len(tiles_bottom), 1)
    fig, axes = plt.subplots(2, k, figsize=(1.9 * k, 4.6), squeeze=False)
    for row, (tiles, labels, name) in enumerate(((tiles_top, labels_top, "highest"),
                                                 (tiles_bottom, labels_bottom, "lowest"))):
        for j in range(k):
            ax = axes[row, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(tiles):
                ax.imshow(tiles[j])
                ax.set_title(labels[j], fontsize=6)
            else:
                ax.set_axis_off()
        axes[row, 0].set_ylabel(name, fontsize=9)
    fig.suptitle(title, fontsize=9)
    _figure_to_png(fig, path, 100)
