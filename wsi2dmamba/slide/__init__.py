"""Slide reading: one small interface over OpenSlide and plain images, with the slide's resolution.

    from wsi2dmamba.slide import open_slide
    with open_slide("slide.svs", mpp_override=None) as slide:
        rgb = slide.read_region((x0, y0), level, (w, h))   # (h, w, 3) uint8
"""

from .mpp import Resolution, mpp_from_properties, mpp_from_tiff_resolution, resolve_mpp
from .reader import Slide, composite_on_white, open_slide, resolve_slide_file, to_rgb

__all__ = [
    "Resolution",
    "Slide",
    "composite_on_white",
    "mpp_from_properties",
    "mpp_from_tiff_resolution",
    "open_slide",
    "resolve_mpp",
    "resolve_slide_file",
    "to_rgb",
]
