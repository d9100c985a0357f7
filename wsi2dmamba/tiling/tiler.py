"""Place tiles on one lattice per slide and measure how much tissue each holds.

The lattice has spacing ``stride_level0`` level-0 pixels and passes through (0, 0) of level 0, so every
tile's cell (row, col) is an exact integer and two tiles never share a cell. Only the part of the
lattice over the tissue's bounding box is kept: cell (0, 0) is the first lattice cell whose tile
reaches into that box, and the grid ends with the last cell that starts inside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import SlideError
from ..grid import TileGrid
from ..tissue.segment import TissueMap
from .config import TileConfig


@dataclass(frozen=True)
class Sampling:
    """How tiles are read: pyramid level, its downsample, and the tile geometry in level-0 pixels."""

    read_level: int
    read_downsample: float
    mpp_effective: float
    tile_size_level0: float
    stride_level0: float


def plan_sampling(level_downsamples, mpp_level0: float, config: TileConfig) -> Sampling:
    """Choose the pyramid level and the tile footprint for ``config`` on a slide.

    Args:
        level_downsamples: the slide's downsample per level (level 0 = 1).
        mpp_level0: µm per level-0 pixel.
        config: tiling parameters.
    """
    target, tol = config.mpp, config.mpp_tolerance
    level = 0
    for lvl, ds in enumerate(level_downsamples):
        if mpp_level0 * ds <= target * (1.0 + tol) and ds > level_downsamples[level]:
            level = lvl
    ds = float(level_downsamples[level])
    level_mpp = mpp_level0 * ds
    if abs(level_mpp / target - 1.0) <= tol:
        scale, effective = ds, level_mpp          # read as is: the tile is tile_px pixels of that level
    else:
        scale, effective = target / mpp_level0, target  # read a larger region and shrink it
    return Sampling(read_level=level, read_downsample=ds, mpp_effective=effective,
                    tile_size_level0=config.tile_px * scale, stride_level0=config.stride_px * scale)


def integral_at(integral: np.ndarray, vs: np.ndarray, us: np.ndarray) -> np.ndarray:
    """Area under a mask up to (v, u), for every v in ``vs`` and u in ``us`` (mask pixel units, fractional).

    ``integral`` is the (h+1, w+1) summed-area table of the mask. Between integer points the area is
    bilinear in (v, u), so interpolating the table is exact for a pixelwise-constant mask.

    Returns:
        (len(vs), len(us)) float64.
    """
    h, w = integral.shape[0] - 1, integral.shape[1] - 1
    v = np.clip(np.asarray(vs, np.float64), 0, h)
    u = np.clip(np.asarray(us, np.float64), 0, w)
    i = np.minimum(np.floor(v).astype(np.int64), max(h - 1, 0))
    j = np.minimum(np.floor(u).astype(np.int64), max(w - 1, 0))
    fv, fu = (v - i)[:, None], (u - j)[None, :]
    f = integral.astype(np.float64)
    rows = (1 - fv) * f[i, :] + fv * f[np.minimum(i + 1, h), :]          # (nv, w+1)
    return (1 - fu) * rows[:, j] + fu * rows[:, np.minimum(j + 1, w)]


def cell_tissue_fractions(tissue: TissueMap, origin: tuple[float, float], stride: float, tile: float,
                          shape: tuple[int, int]) -> np.ndarray:
    """Fraction of each cell's tile covered by the tissue mask.

    Args:
        tissue: the tissue map (its mask and downsample).
        origin: level-0 (x, y) of cell (0, 0).
        stride: lattice spacing in level-0 pixels.
        tile: tile side in level-0 pixels.
        shape: (H, W) cells.

    Returns:
        (H, W) float64 in [0, 1]; the part of a tile outside the slide counts as no tissue.
    """
    import cv2

    h, w = shape
    sx, sy = tissue.downsample
    integral = cv2.integral(tissue.mask.astype(np.uint8))  # (mh+1, mw+1) int32
    x0 = (origin[0] + np.arange(w) * stride) / sx
    y0 = (origin[1] + np.arange(h) * stride) / sy
    x1, y1 = x0 + tile / sx, y0 + tile / sy
    area = (integral_at(integral, y1, x1) - integral_at(integral, y0, x1)
            - integral_at(integral, y1, x0) + integral_at(integral, y0, x0))
    return np.clip(area / ((tile / sx) * (tile / sy)), 0.0, 1.0)


class Tiler:
    """Make the :class:`~wsi2dmamba.grid.TileGrid` of a slide from its tissue map."""

    def __init__(self, config: TileConfig | None = None) -> None:
        self.config = config or TileConfig()

    def tile(self, slide, tissue: TissueMap, *, slide_id: str = "", params_hash: str = "",
             extra_attrs: dict | None = None) -> TileGrid:
        """Tiles of ``slide`` that hold at least ``min_tissue`` tissue.

        Raises:
            SlideError: the tissue map is empty or was made for a slide of another size.
        """
        cfg = self.config
        if tuple(tissue.level0_size) != tuple(slide.dimensions):
            raise SlideError(f"{slide.path}: the tissue contours were made for a slide of "
                             f"{tissue.level0_size[0]}×{tissue.level0_size[1]} pixels, but this slide has "
                             f"{slide.dimensions[0]}×{slide.dimensions[1]}; segment it again.")
        box = tissue.bbox_level0()
        if box is None:
            raise SlideError(f"{slide.path}: no tissue to tile.")
        s = plan_sampling(slide.level_downsamples, slide.mpp, cfg)
        stride, size = s.stride_level0, s.tile_size_level0
        # First cell whose tile reaches past the box's left/top edge, never left of the slide.
        c_lo = max(0, math.floor((box[0] - size) / stride) + 1)
        r_lo = max(0, math.floor((box[1] - size) / stride) + 1)
        # Last cell that starts inside the box.
        c_hi = max(c_lo, math.ceil(box[2] / stride) - 1)
        r_hi = max(r_lo, math.ceil(box[3] / stride) - 1)
        origin = (c_lo * stride, r_lo * stride)
        shape = (r_hi - r_lo + 1, c_hi - c_lo + 1)
        frac = cell_tissue_fractions(tissue, origin, stride, size, shape)
        keep = (frac >= cfg.min_tissue) & (frac > 0)
        rows, cols = np.nonzero(keep)  # row-major order
        index = np.stack([rows, cols], axis=1).astype(np.int32)
        coords = np.round(np.stack([origin[0] + cols * stride, origin[1] + rows * stride], axis=1)).astype(np.int64)
        return TileGrid(
            slide_id=slide_id, coords=coords, index=index, shape=shape,
            tissue_fraction=frac[rows, cols].astype(np.float32),
            origin_level0=(float(origin[0]), float(origin[1])), stride_level0=float(stride),
            tile_size_level0=float(size), tile_px=cfg.tile_px, stride_px=cfg.stride_px,
            mpp_requested=cfg.mpp, mpp_effective=float(s.mpp_effective), mpp_level0=float(slide.mpp),
            read_level=s.read_level, read_downsample=s.read_downsample,
            level0_size=tuple(slide.dimensions), slide_path=str(slide.path), params_hash=params_hash,
            extra_attrs=dict(extra_attrs or {}),
        )
