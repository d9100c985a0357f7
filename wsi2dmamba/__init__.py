"""wsi2dmamba: whole-slide images to cross-validated 2D state-space models.

The package is organised by stage; import what you need::

    from wsi2dmamba.cohort import load_cohort
    from wsi2dmamba.grid import read_feature_grid
    from wsi2dmamba.ops import selective_scan_2d

Heavy modules (torch, OpenSlide) are imported only when a stage that needs them is used.
"""

__version__ = "0.1.0"
