"""Tissue segmentation: where the tissue is on a slide, as polygons with holes (level-0 pixels) and a mask.

    from wsi2dmamba.slide import open_slide
    from wsi2dmamba.tissue import SegmentConfig, TissueSegmenter
    tissue = TissueSegmenter(SegmentConfig(remove_pen=True)).segment(open_slide("slide.svs"))
"""

from .config import SegmentConfig
from .geojson import from_geojson, read_geojson, to_geojson
from .pen import pen_mask
from .pictures import mask_picture, overlay_picture
from .segment import TissueMap, TissuePolygon, TissueSegmenter, mask_to_rings, rasterize
from .stage import read_segment_config, segment_cohort, segment_outputs, segment_paths, segment_slide

__all__ = [
    "SegmentConfig",
    "TissueMap",
    "TissuePolygon",
    "TissueSegmenter",
    "from_geojson",
    "mask_picture",
    "mask_to_rings",
    "overlay_picture",
    "pen_mask",
    "rasterize",
    "read_geojson",
    "read_segment_config",
    "segment_cohort",
    "segment_outputs",
    "segment_paths",
    "segment_slide",
    "to_geojson",
]
