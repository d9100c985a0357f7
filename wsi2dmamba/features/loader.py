"""Reading the tiles of one slide in batches, in worker processes, for an encoder.

Each worker process opens its own handle on the slide (OpenSlide handles are not shared across
processes) and produces whole batches: uint8 (B, tile_px, tile_px, 3) arrays, in the order of the tiles
file. Neighbouring tiles of a row that lie on the read level's pixel grid are read with one
``read_region`` call and cut apart, which saves the per-call overhead of the reader.

A tile whose read fails (a damaged JPEG tile, a truncated file) is retried once on a fresh handle
(OpenSlide refuses every read after an error on a handle), then replaced by a white tile and flagged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..errors import WsiError
from ..grid import TileGrid

BLANK_VALUE = 255  # a blank tile is white, like glass


@dataclass(frozen=True)
class TileReadPlan:
    """How to read the tiles of one tiles file.

    Attributes:
        slide_path: the slide file.
        mpp_level0: µm per level-0 pixel to open the slide with (so every handle agrees).
        coords: (N, 2) int64 level-0 top-left corners.
        level: pyramid level to read.
        downsample: downsample of that level.
        read_px: side of a tile at ``level``, in pixels (before resizing to ``tile_px``).
        tile_px: side of the delivered tile, in pixels.
        max_run: at most this many neighbouring tiles are read with one call.
    """

    slide_path: str
    mpp_level0: float
    coords: np.ndarray
    level: int
    downsample: float
    read_px: int
    tile_px: int
    max_run: int = 8

    @classmethod
    def from_tiles(cls, tiles: TileGrid, slide_path: str | os.PathLike[str], mpp_level0: float,
                   max_run: int = 8) -> TileReadPlan:
        # As wsi2dmamba.tiling.read_tile: a native tile is read as is, else a larger region is shrunk.
        read_px = tiles.tile_px if tiles.is_native_level else max(
            tiles.tile_px, int(round(tiles.tile_size_level0 / tiles.read_downsample)))
        return cls(str(slide_path), float(mpp_level0), tiles.coords, int(tiles.read_level),
                   float(tiles.read_downsample), read_px, int(tiles.tile_px), max(1, int(max_run)))

    def runs(self, indices: np.ndarray) -> list[tuple[int, int]]:
        """Split sorted tile indices into runs ``(start, stop)`` (positions in ``indices``) that one region
        read can cover: same row, each tile ``read_px`` level pixels right of the previous one."""
        ds = int(round(self.downsample))
        exact = abs(self.downsample - ds) < 1e-9
        step = self.read_px * ds  # level-0 distance between abutting tiles when the downsample is integral
        out = []
        start = 0
        for i in range(1, len(indices) + 1):
            if i < len(indices) and exact and i - start < self.max_run:
                a, b = self.coords[indices[i - 1]], self.coords[indices[i]]
                if a[1] == b[1] and b[0] - a[0] == step:
                    continue
            out.append((start, i))
            start = i
        return out


class TileBatches:
    """A map-style dataset whose items are whole batches of tiles (a torch ``Dataset`` by duck typing).

    Item ``i`` is ``(images, indices, blank)``: uint8 (B, tile_px, tile_px, 3), int64 (B,) row numbers
    in the tiles file, and bool (B,) True where a white tile replaced one that could not be read.
    """

    def __init__(self, plan: TileReadPlan, batch_size: int) -> None:
        self.plan = plan
        n = len(plan.coords)
        self.batches = [np.arange(s, min(s + batch_size, n)) for s in range(0, n, max(1, batch_size))]
        self._slide = None  # opened lazily, once per worker process

    def __len__(self) -> int:
        return len(self.batches)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_slide"] = None  # never ship an open handle to another process
        return state

    def _handle(self, fresh: bool = False):
        from ..slide import open_slide

        if fresh and self._slide is not None:
            try:
                self._slide.close()
            except Exception:  # the broken handle may refuse to close; it is dropped anyway
                pass
            self._slide = None
        if self._slide is None:
            self._slide = open_slide(self.plan.slide_path, mpp_override=self.plan.mpp_level0)
        return self._slide

    def _read(self, xy, width_px: int) -> np.ndarray:
        p = self.plan
        return self._handle().read_region((int(xy[0]), int(xy[1])), p.level, (width_px, p.read_px))

    def _read_one(self, xy) -> np.ndarray | None:
        """One tile at read resolution, retried once on a fresh handle; None when it cannot be read."""
        for attempt in range(2):
            try:
                return self._read(xy, self.plan.read_px)
            except (WsiError, OSError, ValueError):
                self._handle(fresh=True)
        return None

    def read_batch(self, indices: np.ndarray):
        p = self.plan
        out = np.empty((len(indices), p.tile_px, p.tile_px, 3), np.uint8)
        blank = np.zeros(len(indices), bool)
        for start, stop in p.runs(indices):
            k = stop - start
            region = None
            if k > 1:
                try:
                    region = self._read(p.coords[indices[start]], k * p.read_px)
                except (WsiError, OSError, ValueError):
                    self._handle(fresh=True)  # fall back to single tiles to find the damaged one
            for j in range(k):
                if region is not None:
                    tile = region[:, j * p.read_px:(j + 1) * p.read_px]
                else:
                    tile = self._read_one(p.coords[indices[start + j]])
                if tile is None:
                    out[start + j] = BLANK_VALUE
                    blank[start + j] = True
                elif p.read_px != p.tile_px:
                    out[start + j] = _resize(tile, p.tile_px)
                else:
                    out[start + j] = tile
        return out, blank

    def __getitem__(self, i: int):
        import torch

        idx = self.batches[i]
        images, blank = self.read_batch(idx)
        return torch.from_numpy(images), torch.from_numpy(idx.astype(np.int64)), torch.from_numpy(blank)


def _resize(tile: np.ndarray, side: int) -> np.ndarray:
    """Area-averaged shrink (or bilinear enlargement) of a square tile to ``side`` pixels."""
    import cv2

    interp = cv2.INTER_AREA if tile.shape[0] > side else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(tile), (side, side), interpolation=interp)


# Starting a reader process (a fresh interpreter importing torch) costs about as much as decoding a few
# hundred tiles, so slides with fewer tiles than this are read in the main process.
IN_PROCESS_TILES = 256


def default_workers(n_tiles: int | None = None) -> int:
    """Reader processes when none are asked for: every core but one, at most 16; none (read in the main
    process) for a slide of fewer than :data:`IN_PROCESS_TILES` tiles."""
    if n_tiles is not None and n_tiles < IN_PROCESS_TILES:
        return 0
    return max(1, min(16, (os.cpu_count() or 2) - 1))


def make_loader(plan: TileReadPlan, *, batch_size: int, workers: int, pin_memory: bool, prefetch: int = 4):
    """A torch DataLoader yielding whole batches from ``workers`` processes (0 = in this process)."""
    import torch

    ds = TileBatches(plan, batch_size)
    n_workers = min(max(int(workers), 0), len(ds))
    kwargs = {"prefetch_factor": prefetch} if n_workers else {}
    return torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=n_workers,
                                       pin_memory=pin_memory, **kwargs)
