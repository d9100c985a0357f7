"""The built-in demo cohort: mosaic slides whose label depends on the 2D arrangement of real tissue.

See :mod:`.long_range` (the default rule) and :mod:`.layout` (the contact rule) for the rules that set
labels and survival times, :mod:`.mosaic` for how slides are drawn and written, :mod:`.cohort` to build
a cohort, and ``docs/demo.md``.
"""

from .cohort import DEMO_RULES, LABEL_NAMES, DemoCohortSpec, DemoSlide, build_demo_cohort, draw_cohort
from .layout import Layout, LayoutSpec, SurvivalSpec, count_contacts, draw_layout, draw_survival
from .long_range import LongRangeSpec, draw_long_range, paired_tumours
from .mosaic import CELL_PX, MOSAIC_MPP, render_cells, write_pyramidal_tiff

__all__ = [
    "CELL_PX",
    "DEMO_RULES",
    "LABEL_NAMES",
    "MOSAIC_MPP",
    "DemoCohortSpec",
    "DemoSlide",
    "Layout",
    "LayoutSpec",
    "LongRangeSpec",
    "SurvivalSpec",
    "build_demo_cohort",
    "count_contacts",
    "draw_cohort",
    "draw_layout",
    "draw_long_range",
    "draw_survival",
    "paired_tumours",
    "render_cells",
    "write_pyramidal_tiff",
]
