"""A picture of the tile grid over the slide's thumbnail."""

from __future__ import annotations

import numpy as np

from ..grid import TileGrid

TILE_RGB = np.array([0, 200, 70], np.float32)
EDGE_RGB = (0, 110, 40)
BOX_RGB = (40, 90, 255)


def grid_picture(thumb: np.ndarray, grid: TileGrid) -> np.ndarray:
    """The thumbnail with kept tiles tinted green (stronger = more tissue), their edges when they are at
    least 4 thumbnail pixels wide, and the lattice's extent in blue.

    Args:
        thumb: (h, w, 3) uint8 RGB of the whole slide.
        grid: the tiles.

    Returns:
        (h, w, 3) uint8 RGB.
    """
    import cv2

    h, w = thumb.shape[:2]
    sx, sy = w / grid.level0_size[0], h / grid.level0_size[1]
    out = thumb.astype(np.float32)
    tint = np.zeros((h, w), np.float32)
    side = grid.tile_size_level0
    for (x, y), f in zip(grid.coords, grid.tissue_fraction):
        x0, y0 = int(np.floor(x * sx)), int(np.floor(y * sy))
        x1, y1 = int(np.ceil((x + side) * sx)), int(np.ceil((y + side) * sy))
        tint[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = np.maximum(
            tint[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)], 0.25 + 0.35 * float(f))
    out = out * (1 - tint[..., None]) + TILE_RGB * tint[..., None]
    out = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    if side * sx >= 4:
        for x, y in grid.coords:
            cv2.rectangle(out, (int(round(x * sx)), int(round(y * sy))),
                          (int(round((x + side) * sx)) - 1, int(round((y + side) * sy)) - 1), EDGE_RGB, 1)
    ox, oy = grid.origin_level0
    gh, gw = grid.shape
    ex, ey = ox + (gw - 1) * grid.stride_level0 + side, oy + (gh - 1) * grid.stride_level0 + side
    cv2.rectangle(out, (int(round(ox * sx)), int(round(oy * sy))), (int(round(ex * sx)), int(round(ey * sy))),
                  BOX_RGB, max(1, round(max(h, w) / 500)))
    return out
