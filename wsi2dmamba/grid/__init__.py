"""The slide as a grid: tiles and feature grid files (HDF5), one lattice per slide.

See ``docs/grid-format.md`` for the file layout. Files are a superset of the CLAM and TRIDENT layouts
(``coords`` with their attributes, ``features``), plus a ``grid/`` group that places every tile in a cell
of one lattice and marks the non-tissue cells.
"""

from .files import (
    FORMAT_NAME,
    FORMAT_VERSION,
    FeatureGrid,
    TileGrid,
    check_grid_file,
    read_feature_grid,
    read_tile_grid,
    write_feature_grid,
    write_tile_grid,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "FeatureGrid",
    "TileGrid",
    "check_grid_file",
    "read_feature_grid",
    "read_tile_grid",
    "write_feature_grid",
    "write_tile_grid",
]
