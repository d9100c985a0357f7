"""Read the pixels of tiles placed by the tiler."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from ..grid import TileGrid


def read_tile(slide, grid: TileGrid, i: int) -> np.ndarray:
    """Pixels of tile ``i`` of ``grid``: (tile_px, tile_px, 3) uint8 RGB at the grid's effective mpp.

    The tile is read from ``grid.read_level``; when that level is finer than the target, a region of
    ``tile_size_level0 / read_downsample`` pixels is read and shrunk with area averaging.
    """
    import cv2

    x, y = (int(v) for v in grid.coords[i])
    n = grid.tile_px
    if grid.is_native_level:
        return slide.read_region((x, y), grid.read_level, (n, n))
    side = max(n, int(round(grid.tile_size_level0 / grid.read_downsample)))
    region = slide.read_region((x, y), grid.read_level, (side, side))
    return cv2.resize(region, (n, n), interpolation=cv2.INTER_AREA) if side != n else region


def iter_tiles(slide, grid: TileGrid, indices: Iterable[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(i, pixels) for each tile (all of them, in file order, by default)."""
    for i in range(grid.n_tiles) if indices is None else indices:
        yield int(i), read_tile(slide, grid, int(i))
