"""Classical tissue segmentation: saturation threshold, clean-up in µm², polygons with holes.

The result is a :class:`TissueMap`: polygons in level-0 pixel coordinates plus the binary mask they were
traced from, at the segmentation resolution. The polygons and the mask describe the same pixels exactly:
:func:`rasterize` of the polygons gives the mask back, so a tissue map can be stored as GeoJSON alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .config import SegmentConfig
from .pen import pen_mask

# Longer side of the thumbnail read with the segmentation image (the overlay picture is drawn on it).
THUMBNAIL_MAX_PX = 1024


@dataclass(frozen=True)
class TissuePolygon:
    """One piece of tissue.

    Attributes:
        exterior: (K, 2) float64 level-0 (x, y) of the outline, not closed (first point not repeated).
        holes: outlines of the holes inside it, each (K, 2) float64 level-0 (x, y).
    """

    exterior: np.ndarray
    holes: tuple[np.ndarray, ...] = ()


@dataclass(frozen=True)
class TissueMap:
    """Where the tissue is on one slide.

    Attributes:
        polygons: tissue pieces with holes, level-0 pixel coordinates.
        mask: (h, w) bool tissue mask at the segmentation resolution.
        downsample: (sx, sy) level-0 pixels per mask pixel along x and y.
        mpp: µm per mask pixel (along x).
        level0_size: (width, height) of the slide's level 0 in pixels.
        pen: (h, w) bool pixels removed as pen marks (all False when pen removal is off).
    """

    polygons: tuple[TissuePolygon, ...]
    mask: np.ndarray
    downsample: tuple[float, float]
    mpp: float
    level0_size: tuple[int, int]
    pen: np.ndarray | None = field(default=None, repr=False)

    @property
    def is_empty(self) -> bool:
        return not bool(self.mask.any())

    @property
    def tissue_area_um2(self) -> float:
        """Area of tissue in µm² (mask pixels × pixel area)."""
        return float(self.mask.sum()) * self.mpp * self.mpp * self.downsample[1] / self.downsample[0]

    @property
    def n_holes(self) -> int:
        return sum(len(p.holes) for p in self.polygons)

    def bbox_level0(self) -> tuple[float, float, float, float] | None:
        """(x0, y0, x1, y1) in level-0 pixels of the mask pixels that hold tissue; None when empty."""
        ys, xs = np.nonzero(self.mask.any(axis=1))[0], np.nonzero(self.mask.any(axis=0))[0]
        if xs.size == 0:
            return None
        sx, sy = self.downsample
        return float(xs[0] * sx), float(ys[0] * sy), float((xs[-1] + 1) * sx), float((ys[-1] + 1) * sy)


# ----------------------------------------------------------------------------------------------- helpers

def odd_window(length_um: float, px_um: float) -> int:
    """A window length in µm as an odd number of pixels (1 = no window)."""
    n = int(round(length_um / px_um))
    if n < 2:
        return 1
    return n if n % 2 == 1 else n + 1


def _fill_small_holes(mask: np.ndarray, max_area_px: float) -> np.ndarray:
    """Fill background regions enclosed by tissue whose area is below ``max_area_px``."""
    import cv2

    if max_area_px <= 0:
        return mask
    bg = (~mask).astype(np.uint8)
    # Background is 4-connected when tissue is 8-connected (the convention of cv2.findContours).
    n, labels, stats, _ = cv2.connectedComponentsWithStats(bg, connectivity=4)
    if n <= 1:
        return mask
    h, w = mask.shape
    x, y, bw, bh, area = (stats[:, i] for i in range(5))
    touches_border = (x == 0) | (y == 0) | (x + bw == w) | (y + bh == h)
    fill = (~touches_border) & (area < max_area_px)
    fill[0] = False
    return mask | fill[labels]


def _drop_small_pieces(mask: np.ndarray, min_area_px: float) -> np.ndarray:
    """Remove 8-connected tissue pieces whose pixel count is below ``min_area_px``."""
    import cv2

    if min_area_px <= 0 or not mask.any():
        return mask
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area_px
    keep[0] = False
    return keep[labels]


def mask_to_rings(mask: np.ndarray) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """Trace a binary mask into (exterior, holes) rings in mask pixel-centre coordinates (int32 (K, 2))."""
    import cv2

    if not mask.any():
        return []
    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    hier = hierarchy[0]
    out = []
    for i, c in enumerate(contours):
        if hier[i][3] != -1:  # a hole: collected with its parent
            continue
        holes = []
        child = hier[i][2]
        while child != -1:
            holes.append(contours[child].reshape(-1, 2))
            child = hier[child][0]
        out.append((c.reshape(-1, 2), holes))
    # A stable order (top-left first) so that outputs are byte-identical between runs.
    out.sort(key=lambda item: (int(item[0][:, 1].min()), int(item[0][:, 0].min())))
    return out


def rasterize(rings: list[tuple[np.ndarray, list[np.ndarray]]], shape: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`mask_to_rings`: fill exteriors, clear holes but keep their outline pixels
    (a traced hole's outline runs through the tissue pixels around it).

    Args:
        rings: (exterior, holes) in mask pixel-centre coordinates (integers, or floats that round to them).
        shape: (h, w) of the mask.

    Returns:
        (h, w) bool.
    """
    import cv2

    out = np.zeros(shape, np.uint8)
    for ext, holes in rings:
        ext_i = np.round(ext).astype(np.int32).reshape(-1, 1, 2)
        x0, y0 = ext_i[:, 0, 0].min(), ext_i[:, 0, 1].min()
        x1, y1 = ext_i[:, 0, 0].max() + 1, ext_i[:, 0, 1].max() + 1
        piece = np.zeros((y1 - y0, x1 - x0), np.uint8)
        off = np.array([x0, y0], np.int32)
        cv2.fillPoly(piece, [ext_i - off], 1)
        cv2.polylines(piece, [ext_i - off], True, 1)
        hole_i = [np.round(h).astype(np.int32).reshape(-1, 1, 2) - off for h in holes]
        if hole_i:
            cv2.fillPoly(piece, hole_i, 0)
            cv2.polylines(piece, hole_i, True, 1)
        # Clip to the mask (a polygon edited by hand may run past the slide).
        ys, xs = slice(max(y0, 0), min(y1, shape[0])), slice(max(x0, 0), min(x1, shape[1]))
        sub = piece[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
        if sub.size:
            out[ys, xs] |= sub
    return out.astype(bool)


def rings_to_level0(rings, downsample: tuple[float, float]) -> tuple[TissuePolygon, ...]:
    """Mask pixel-centre rings → level-0 polygons: pixel (i, j) covers level-0 [i·sx, (i+1)·sx), its centre
    is at (i + 0.5)·sx."""
    sx, sy = downsample
    scale = np.array([sx, sy])

    def conv(r: np.ndarray) -> np.ndarray:
        return np.round((r.astype(np.float64) + 0.5) * scale, 2)

    return tuple(TissuePolygon(conv(ext), tuple(conv(h) for h in holes)) for ext, holes in rings)


def level0_to_rings(polygons, downsample: tuple[float, float]):
    """Inverse of :func:`rings_to_level0` (coordinates in mask pixel-centre units, as floats)."""
    sx, sy = downsample
    scale = np.array([sx, sy])

    def conv(r: np.ndarray) -> np.ndarray:
        return np.asarray(r, np.float64) / scale - 0.5

    return [(conv(p.exterior), [conv(h) for h in p.holes]) for p in polygons]


# ----------------------------------------------------------------------------------------------- the segmenter

class TissueSegmenter:
    """Find tissue on a slide with a classical (non-learned) method; see :class:`SegmentConfig`."""

    def __init__(self, config: SegmentConfig | None = None) -> None:
        self.config = config or SegmentConfig()

    def segment(self, slide) -> TissueMap:
        """Segment a :class:`~wsi2dmamba.slide.Slide`."""
        return self.segment_with_thumbnail(slide)[0]

    def segment_with_thumbnail(self, slide, thumb_max_px: int = THUMBNAIL_MAX_PX) -> tuple[TissueMap, np.ndarray | None]:
        """Segment a slide and also return its thumbnail (longer side ``thumb_max_px``), from one read.

        The finer of the two images is read from the slide; the other is shrunk from it. The mask depends
        on ``thumb_max_px`` through that choice, so :meth:`segment` uses the same default.
        """
        import cv2

        w0, h0 = slide.dimensions
        seg_ds = max(self.config.seg_mpp / slide.mpp, 1.0)
        seg_size = slide.downsampled_size(seg_ds)
        thumb = None
        if thumb_max_px > 0:
            thumb_ds = max(max(w0, h0) / thumb_max_px, 1.0)
            thumb_size = slide.downsampled_size(thumb_ds)
            if thumb_ds <= seg_ds:
                thumb = slide.read_downsampled(thumb_ds)
                image = cv2.resize(thumb, seg_size, interpolation=cv2.INTER_AREA) if thumb_size != seg_size else thumb
            else:
                image = slide.read_downsampled(seg_ds)
                thumb = cv2.resize(image, thumb_size, interpolation=cv2.INTER_AREA)
        else:
            image = slide.read_downsampled(seg_ds)
        ds = (w0 / image.shape[1], h0 / image.shape[0])
        tissue = self.segment_image(image, slide.mpp * ds[0], level0_size=(w0, h0), downsample=ds)
        return tissue, thumb

    def segment_image(self, rgb: np.ndarray, px_um: float, *, level0_size: tuple[int, int] | None = None,
                      downsample: tuple[float, float] = (1.0, 1.0)) -> TissueMap:
        """Segment an RGB image whose pixels are ``px_um`` µm wide.

        Args:
            rgb: (h, w, 3) uint8.
            px_um: µm per pixel of ``rgb``.
            level0_size: (width, height) of level 0; defaults to the image size times ``downsample``.
            downsample: level-0 pixels per image pixel (sx, sy), to place the polygons at level 0.
        """
        import cv2

        cfg = self.config
        h, w = rgb.shape[:2]
        if level0_size is None:
            level0_size = (round(w * downsample[0]), round(h * downsample[1]))
        px_area = px_um * px_um * downsample[1] / downsample[0]
        hsv = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)
        sat, val = hsv[..., 1], hsv[..., 2]
        k = odd_window(cfg.median_um, px_um)
        if k > 1:
            sat = cv2.medianBlur(sat, k)
            val = cv2.medianBlur(val, k)
        thr = cfg.saturation_threshold
        if cfg.threshold == "otsu":
            otsu, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
            thr = max(thr, int(otsu))
        tissue = (sat > thr) & (val >= cfg.min_value)

        pen = np.zeros_like(tissue)
        if cfg.remove_pen and cfg.pen_colors:
            pen = pen_mask(rgb, cfg.pen_colors)
            if k > 1:  # isolated ink-coloured pixels inside tissue are not a pen stroke
                pen = cv2.medianBlur(pen.astype(np.uint8) * 255, k) > 127
            grow = odd_window(2 * cfg.pen_margin_um, px_um)
            if grow > 1 and pen.any():
                kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (grow, grow))
                pen = cv2.dilate(pen.astype(np.uint8), kernel) > 0
            tissue &= ~pen

        c = odd_window(cfg.close_um, px_um)
        if c > 1 and tissue.any():
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (c, c))
            tissue = cv2.morphologyEx(tissue.astype(np.uint8), cv2.MORPH_CLOSE, kernel) > 0
            if cfg.remove_pen:
                tissue &= ~pen  # closing must not bridge tissue back over a pen stroke
        tissue = _fill_small_holes(tissue, cfg.min_hole_area_um2 / px_area)
        tissue = _drop_small_pieces(tissue, cfg.min_tissue_area_um2 / px_area)

        rings = mask_to_rings(tissue)
        mask = rasterize(rings, tissue.shape)
        return TissueMap(polygons=rings_to_level0(rings, downsample), mask=mask, downsample=tuple(downsample),
                         mpp=px_um, level0_size=tuple(level0_size), pen=pen)
