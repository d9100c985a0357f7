"""Tiling: one lattice of tiles per slide at an exact µm/px, with the tissue fraction of every tile.

    from wsi2dmamba.tiling import TileConfig, Tiler, read_tile
    grid = Tiler(TileConfig(tile_px=256, mpp=0.5)).tile(slide, tissue, slide_id="s1")
    pixels = read_tile(slide, grid, 0)   # (256, 256, 3) uint8
"""

from .config import TileConfig
from .pictures import grid_picture
from .read import iter_tiles, read_tile
from .stage import tile_cohort, tile_outputs, tile_paths, tile_slide
from .tiler import Sampling, Tiler, cell_tissue_fractions, plan_sampling

__all__ = [
    "Sampling",
    "TileConfig",
    "Tiler",
    "cell_tissue_fractions",
    "grid_picture",
    "iter_tiles",
    "plan_sampling",
    "read_tile",
    "tile_cohort",
    "tile_outputs",
    "tile_paths",
    "tile_slide",
]
