"""Pictures of a segmentation a person can check at a glance: the mask, and contours over a thumbnail."""

from __future__ import annotations

import numpy as np

from .segment import TissueMap

OUTLINE_RGB = (0, 170, 60)
HOLE_RGB = (30, 90, 255)
PEN_RGB = (255, 0, 255)


def mask_picture(tissue: TissueMap) -> np.ndarray:
    """(h, w) uint8 mask at the segmentation resolution: 255 = tissue, 0 = not."""
    return tissue.mask.astype(np.uint8) * 255


def overlay_picture(thumb: np.ndarray, tissue: TissueMap, level0_size: tuple[int, int]) -> np.ndarray:
    """The thumbnail with tissue outlines (green), holes (blue) and removed pen marks (magenta, hatched).

    Args:
        thumb: (h, w, 3) uint8 RGB thumbnail of the whole slide.
        tissue: the segmentation.
        level0_size: (width, height) of level 0, to scale level-0 polygons onto the thumbnail.

    Returns:
        (h, w, 3) uint8 RGB.
    """
    import cv2

    out = np.ascontiguousarray(thumb.copy())
    h, w = out.shape[:2]
    scale = np.array([w / level0_size[0], h / level0_size[1]])
    if tissue.pen is not None and tissue.pen.any():
        pen = cv2.resize(tissue.pen.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
        hatch = ((np.add.outer(np.arange(h), np.arange(w)) // 4) % 2 == 0)
        out[pen & hatch] = PEN_RGB
    thick = max(1, round(max(h, w) / 400))

    def pts(r: np.ndarray) -> np.ndarray:
        return np.round(np.asarray(r) * scale).astype(np.int32).reshape(-1, 1, 2)

    for poly in tissue.polygons:
        cv2.polylines(out, [pts(poly.exterior)], True, OUTLINE_RGB, thick, lineType=cv2.LINE_AA)
        if poly.holes:
            cv2.polylines(out, [pts(hh) for hh in poly.holes], True, HOLE_RGB, thick, lineType=cv2.LINE_AA)
    return out


def load_rgb(path) -> np.ndarray | None:
    """An RGB picture written earlier, or None when it is missing or unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError):
        return None


def save_png(path, image: np.ndarray) -> None:
    """Write an RGB or greyscale uint8 image as PNG to ``path`` (already a temporary name)."""
    from PIL import Image

    Image.fromarray(image).save(path, format="PNG", optimize=False, compress_level=3)
