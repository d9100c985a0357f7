"""The built-in demo cohort: mosaic slides whose label depends on the 2D arrangement of real tissue.

See :mod:`.layout` for the rule that sets labels and survival times, :mod:`.mosaic` for how slides are
drawn and written, :mod:`.cohort` to build a cohort, and ``docs/demo.md``.
"""

from .cohort import LABEL_NAMES, DemoCohortSpec, DemoSlide, build_demo_cohort, draw_cohort
from .layout import Layout, LayoutSpec, SurvivalSpec, count_contacts, draw_layout, draw_survival
from .mosaic import CELL_PX, MOSAIC_MPP, render_cells, write_pyramidal_tiff

__all__ = [
    "CELL_PX",
    "LABEL_NAMES",
    "MOSAIC_MPP",
    "DemoCohortSpec",
    "DemoSlide",
    "Layout",
    "LayoutSpec",
    "SurvivalSpec",
    "build_demo_cohort",
    "count_contacts",
    "draw_cohort",
    "draw_layout",
    "draw_survival",
    "render_cells",
    "write_pyramidal_tiff",
]
