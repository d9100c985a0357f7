"""Render a cell layout into a slide image and write it as a pyramidal tiled JPEG TIFF.

Each cell of a layout (:mod:`.layout`) becomes one ``cell_px × cell_px`` patch of real tissue at
``MOSAIC_MPP`` µm/px, taken from the shipped assets (``assets/README.md``) and augmented (one of the 8
flips/rotations by 90°, a slight per-channel colour jitter). Glass cells are a flat light grey with
noise. The TIFF holds the full image and 2× downsampled levels, 256×256 JPEG tiles, and its resolution
tags, so OpenSlide opens it as a generic tiled TIFF with ``openslide.mpp-x`` = ``mpp``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

from ..fileio import atomic_path
from .layout import GLASS, LYMPHOCYTES, OTHER, STROMA, TUMOUR

MOSAIC_MPP = 0.5
"""µm per pixel of the assets and of level 0 of every demo slide."""
CELL_PX = 224
"""Side of one cell in level-0 pixels (the assets' size)."""

_KIND_ASSETS = {
    TUMOUR: ("nct-TUM-AACHEHDV.jpg",),
    LYMPHOCYTES: ("nct-LYM-AATTSRNN.jpg",),
    STROMA: ("nct-STR-AACRYYNQ.jpg",),
    OTHER: ("nct-MUS-AACVWIEK.jpg", "nct-NORM-AAAWMSFI.jpg", "nct-DEB-ACHGAMCT.jpg",
            "cmu1-small-region-x1120-y896.jpg", "cmu1-small-region-x1064-y1792.jpg",
            "cmu1-small-region-x1120-y2128.jpg", "cmu1-small-region-x1064-y672.jpg",
            "cmu1-small-region-x616-y2576.jpg", "cmu1-small-region-x840-y2688.jpg"),
}
_GLASS_RGB = (236, 234, 239)


@dataclass(frozen=True)
class Augment:
    """Per-cell augmentation. ``jitter``: largest relative change of each RGB channel's gain."""

    jitter: float = 0.04
    glass_noise: float = 2.0


@lru_cache(maxsize=None)
def load_asset(name: str) -> np.ndarray:
    """(CELL_PX, CELL_PX, 3) uint8 RGB patch shipped in ``wsi2dmamba/demo/assets``."""
    from PIL import Image

    with resources.as_file(resources.files(__package__) / "assets" / name) as path:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    if arr.shape != (CELL_PX, CELL_PX, 3):
        raise ValueError(f"demo asset {name} is {arr.shape}, expected ({CELL_PX}, {CELL_PX}, 3)")
    arr.setflags(write=False)
    return arr


def asset_names() -> list[str]:
    """Every asset file a demo slide may use."""
    return sorted({n for names in _KIND_ASSETS.values() for n in names})


def render_cells(cells: np.ndarray, rng: np.random.Generator, augment: Augment = Augment()) -> np.ndarray:
    """The level-0 image of a layout: (rows·CELL_PX, cols·CELL_PX, 3) uint8 RGB."""
    rows, cols = cells.shape
    out = np.empty((rows * CELL_PX, cols * CELL_PX, 3), dtype=np.uint8)
    for r in range(rows):
        for c in range(cols):
            out[r * CELL_PX:(r + 1) * CELL_PX, c * CELL_PX:(c + 1) * CELL_PX] = cell_image(int(cells[r, c]), rng, augment)
    return out


def cell_image(kind: int, rng: np.random.Generator, augment: Augment = Augment()) -> np.ndarray:
    """One (CELL_PX, CELL_PX, 3) uint8 cell of the given kind: an augmented asset, or glass."""
    if kind == GLASS:
        noise = rng.normal(0.0, augment.glass_noise, size=(CELL_PX, CELL_PX, 3))
        return np.clip(np.array(_GLASS_RGB, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    names = _KIND_ASSETS[kind]
    patch = load_asset(names[int(rng.integers(len(names)))])
    patch = np.rot90(patch, k=int(rng.integers(4)))
    if rng.integers(2):
        patch = patch[:, ::-1]
    gain = 1.0 + rng.uniform(-augment.jitter, augment.jitter, size=3)
    return np.clip(patch.astype(np.float32) * gain, 0, 255).astype(np.uint8)


def pyramid(image: np.ndarray, min_side: int = 256) -> list[np.ndarray]:
    """Level 0 and its 2×-downsampled levels (2×2 box mean) while the smaller side stays ≥ ``min_side``."""
    levels = [image]
    while min(levels[-1].shape[:2]) // 2 >= min_side:
        a = levels[-1]
        h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
        a = a[:h, :w].astype(np.uint16)
        levels.append(((a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2] + 2) // 4).astype(np.uint8))
    return levels


def write_pyramidal_tiff(path: str | os.PathLike[str], image: np.ndarray, mpp: float = MOSAIC_MPP,
                         quality: int = 90, tile: int = 256, description: str = "") -> Path:
    """Write ``image`` (H, W, 3) uint8 as a tiled JPEG TIFF pyramid with resolution tags; atomic.

    Every level is a page of its own (the layout OpenSlide's generic-tiff reader expects); each page's
    XResolution/YResolution give pixels per centimetre at that level (10⁴ / µm per pixel).
    """
    import tifffile

    path = Path(path)
    with atomic_path(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=False) as tw:
            for i, level in enumerate(pyramid(image, min_side=tile)):
                px_per_cm = 1e4 / (mpp * 2 ** i)
                tw.write(level, tile=(tile, tile), compression="jpeg", compressionargs={"level": quality},
                         photometric="rgb", resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER",
                         subfiletype=0 if i == 0 else 1, description=description if i == 0 else None,
                         metadata=None)
    return path
