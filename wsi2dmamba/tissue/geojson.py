"""Tissue maps as GeoJSON that QuPath opens (File ▸ Import objects), and back.

Each piece of tissue is a ``Feature`` with a ``Polygon`` geometry: the first ring is its outline, the
others its holes, in level-0 pixel coordinates (x right, y down, as QuPath uses). The features carry
QuPath's ``objectType`` and ``classification`` so that they open as "Tissue" annotations.

Every geometry is valid in the OGC sense (shapely's ``is_valid``): an outline traced through a pinch
point of the mask crosses itself, and is written as the valid ``Polygon`` or ``MultiPolygon`` of the
same area (``shapely.make_valid``), so that GIS tools and QuPath measure it correctly.

A file may be a FeatureCollection, a Feature, a geometry, or a plain JSON array of Features (QuPath's
export with "Export as FeatureCollection" unticked).

The FeatureCollection also carries a ``wsi2dmamba`` member (allowed by RFC 7946 as a foreign member) with
the mask's shape and downsample, so that the mask can be rebuilt exactly. A file edited in QuPath loses
that member; it is then rasterised at the default segmentation resolution.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StageInputError
from .segment import TissueMap, TissuePolygon, level0_to_rings, rasterize

TISSUE_COLOR = [0, 180, 60]


def _ring(points: np.ndarray) -> list[list[float]]:
    pts = [[_num(x), _num(y)] for x, y in np.asarray(points, np.float64)]
    while len(pts) < 3:  # a ring of a one- or two-pixel piece: repeat points to make a valid ring
        pts.append(list(pts[-1]))
    return pts + [list(pts[0])]


def _num(v: float) -> float | int:
    v = round(float(v), 2)
    return int(v) if v.is_integer() else v


def _rings_of(polygon) -> list[list[list[float]]]:
    return [_ring(np.asarray(polygon.exterior.coords)[:-1])] + \
        [_ring(np.asarray(h.coords)[:-1]) for h in polygon.interiors]


def _strands(shp) -> list[list[list[float]]]:
    """The zero-area lines of an invalid polygon (the one-pixel-wide strands of a traced outline)."""
    import shapely

    pieces = shapely.get_parts(shapely.make_valid(shp, method="linework"))
    lines = [line for g in pieces if "LineString" in g.geom_type for line in shapely.get_parts(g)]
    return [[[_num(x), _num(y)] for x, y in line.coords] for line in lines if not line.is_empty]


def valid_geometry(poly: TissuePolygon) -> tuple[dict[str, Any], list[list[list[float]]]]:
    """GeoJSON geometry of one tissue piece, made valid where its outline crosses or touches itself.

    A valid outline is written as traced. Otherwise ``shapely.make_valid`` splits it at its pinch points
    into the ``Polygon`` or ``MultiPolygon`` covering the same area.

    Returns:
        The geometry, and the one-pixel-wide strands of the outline that cover no area (lines of level-0
        (x, y) points) which a valid polygon cannot hold; they are kept so that the mask is rebuilt
        exactly.
    """
    import shapely
    from shapely.geometry import Polygon

    rings = [_ring(poly.exterior)] + [_ring(h) for h in poly.holes]
    shp = Polygon(rings[0], rings[1:])
    if shp.is_valid:
        return {"type": "Polygon", "coordinates": rings}, []
    fixed = shapely.make_valid(shp, method="structure")
    parts = [g for g in shapely.get_parts(fixed) if g.geom_type == "Polygon" and not g.is_empty]
    strands = _strands(shp)
    if len(parts) == 1:
        return {"type": "Polygon", "coordinates": _rings_of(parts[0])}, strands
    return {"type": "MultiPolygon", "coordinates": [_rings_of(g) for g in parts]}, strands


def to_geojson(tissue: TissueMap, *, properties: dict[str, Any] | None = None) -> dict[str, Any]:
    """A GeoJSON FeatureCollection of the tissue polygons (level-0 pixels, valid geometry), with the mask
    geometry."""
    features, strands = [], []
    for i, poly in enumerate(tissue.polygons):
        geometry, lines = valid_geometry(poly)
        strands += lines
        features.append({
            "type": "Feature",
            "id": f"tissue-{i}",
            "geometry": geometry,
            "properties": {"objectType": "annotation", "name": f"tissue {i}",
                           "classification": {"name": "Tissue", "color": TISSUE_COLOR},
                           "isLocked": False},
        })
    meta = {
        "coordinates": "level-0 pixels, x right, y down",
        "mask_shape": [int(tissue.mask.shape[0]), int(tissue.mask.shape[1])],
        "mask_downsample": [float(tissue.downsample[0]), float(tissue.downsample[1])],
        "mask_mpp": float(tissue.mpp),
        "level0_size": [int(tissue.level0_size[0]), int(tissue.level0_size[1])],
        "tissue_area_um2": round(tissue.tissue_area_um2, 1),
        **(properties or {}),
    }
    if strands:
        meta["strands_level0"] = strands
    return {"type": "FeatureCollection", "wsi2dmamba": meta, "features": features}


def dumps(obj: dict[str, Any]) -> str:
    """Compact, deterministic JSON text (one feature per line keeps diffs readable)."""
    head = {k: v for k, v in obj.items() if k != "features"}
    head_text = json.dumps(head, sort_keys=True, separators=(",", ":"))
    feats = ",\n".join(json.dumps(f, sort_keys=True, separators=(",", ":")) for f in obj.get("features", []))
    return head_text[:-1] + ',"features":[\n' + feats + "\n]}\n"


GEOJSON_TYPES = ("FeatureCollection", "Feature", "GeometryCollection", "Polygon", "MultiPolygon", "Point",
                 "MultiPoint", "LineString", "MultiLineString")


def as_feature_collection(obj: Any, where: str) -> dict[str, Any]:
    """``obj`` as a GeoJSON object: a plain JSON array of Features (QuPath's export with "Export as
    FeatureCollection" unticked) becomes a FeatureCollection; anything else that is not GeoJSON is refused.

    Raises:
        StageInputError: naming ``where`` and the forms accepted.
    """
    accepted = ("expected a GeoJSON FeatureCollection, Feature or geometry, or a JSON array of Features "
                "(QuPath: File ▸ Export objects as GeoJSON)")
    if isinstance(obj, list):
        odd = [i for i, f in enumerate(obj) if not (isinstance(f, dict) and f.get("type") in GEOJSON_TYPES)]
        if odd:
            raise StageInputError(f"{where}: item {odd[0]} of the JSON array is not a GeoJSON Feature; {accepted}.")
        return {"type": "FeatureCollection", "features": obj}
    if not isinstance(obj, dict) or obj.get("type") not in GEOJSON_TYPES:
        got = f"an object of type {obj.get('type')!r}" if isinstance(obj, dict) else f"a JSON {type(obj).__name__}"
        raise StageInputError(f"{where} is not GeoJSON ({accepted}; got {got}). Export the annotations from "
                              "QuPath again, or rerun `wsi2dmamba segment` for this slide.")
    return obj


def _polygons_from(obj: dict[str, Any], where: str) -> list[TissuePolygon]:
    def geometries(o: dict[str, Any]):
        if not isinstance(o, dict):
            raise TypeError(f"expected a GeoJSON object, got {type(o).__name__}")
        t = o.get("type")
        if t == "FeatureCollection":
            for f in o.get("features", []):
                yield from geometries(f)
        elif t == "Feature":
            if o.get("geometry"):
                yield from geometries(o["geometry"])
        elif t == "GeometryCollection":
            for g in o.get("geometries", []):
                yield from geometries(g)
        elif t == "Polygon":
            yield o["coordinates"]
        elif t == "MultiPolygon":
            yield from o["coordinates"]

    polys = []
    try:
        for rings in geometries(obj):
            if not rings:
                continue
            arrs = [np.asarray(r, np.float64)[:, :2] for r in rings]
            arrs = [a[:-1] if len(a) > 1 and np.array_equal(a[0], a[-1]) else a for a in arrs]
            polys.append(TissuePolygon(arrs[0], tuple(arrs[1:])))
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise StageInputError(f"{where}: malformed GeoJSON geometry ({exc}).") from exc
    return polys


def _draw_strands(mask: np.ndarray, strands: list, ds: tuple[float, float], where: str) -> np.ndarray:
    """The mask with the outline's zero-area strands (level-0 lines) drawn in, as they were traced."""
    import cv2

    out = mask.astype(np.uint8)
    try:
        lines = [np.round(np.asarray(s, np.float64)[:, :2] / np.asarray(ds) - 0.5).astype(np.int32).reshape(-1, 1, 2)
                 for s in strands]
    except (TypeError, ValueError, IndexError) as exc:
        raise StageInputError(f"{where}: malformed 'strands_level0' member ({exc}).") from exc
    cv2.polylines(out, lines, False, 1)
    return out.astype(bool)


def _mask_frame(meta: dict | None, level0_size: tuple[int, int], mpp: float, default_seg_mpp: float,
                ) -> tuple[tuple[int, int], tuple[float, float], bool]:
    """(mask shape (h, w), downsample (sx, sy), whether they are the file's own) of the mask to rebuild."""
    w0, h0 = level0_size
    if meta and meta.get("mask_shape") and meta.get("mask_downsample") \
            and [int(v) for v in meta.get("level0_size", [w0, h0])] == [w0, h0]:
        shape = (int(meta["mask_shape"][0]), int(meta["mask_shape"][1]))
        return shape, (float(meta["mask_downsample"][0]), float(meta["mask_downsample"][1])), True
    d = max(default_seg_mpp / mpp, 1.0)
    shape = (max(1, round(h0 / d)), max(1, round(w0 / d)))
    return shape, (w0 / shape[1], h0 / shape[0]), False


def from_geojson(obj: dict[str, Any], *, level0_size: tuple[int, int], mpp: float, default_seg_mpp: float,
                 where: str = "GeoJSON") -> TissueMap:
    """A :class:`TissueMap` from GeoJSON: the polygons, and the mask rebuilt from them.

    Args:
        obj: parsed GeoJSON (FeatureCollection, Feature, geometry, or a list of Features; Polygon and
            MultiPolygon are used).
        level0_size: (width, height) of the slide's level 0.
        mpp: µm per level-0 pixel of the slide.
        default_seg_mpp: µm per mask pixel when the file does not say (e.g. exported by QuPath).
        where: the file, for error messages.
    """
    obj = as_feature_collection(obj, where)
    polys = _polygons_from(obj, where)
    meta = obj.get("wsi2dmamba")
    meta = meta if isinstance(meta, dict) else None
    w0, h0 = int(level0_size[0]), int(level0_size[1])
    shape, ds, own = _mask_frame(meta, (w0, h0), mpp, default_seg_mpp)
    mask = rasterize(level0_to_rings(polys, ds), shape)
    if own and meta.get("strands_level0"):
        mask = _draw_strands(mask, meta["strands_level0"], ds, where)
    return TissueMap(polygons=tuple(polys), mask=mask, downsample=ds, mpp=mpp * ds[0], level0_size=(w0, h0))


def read_geojson(path, *, level0_size: tuple[int, int], mpp: float, default_seg_mpp: float) -> tuple[TissueMap, dict]:
    """Read a tissue GeoJSON file; returns the map and the file's ``wsi2dmamba`` member (or {})."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise StageInputError(f"Tissue contours not found: {path}; run `wsi2dmamba segment` first.") from exc
    except (OSError, ValueError) as exc:
        raise StageInputError(f"{path} is not readable JSON ({exc}); rerun `wsi2dmamba segment` for it.") from exc
    tissue = from_geojson(obj, level0_size=level0_size, mpp=mpp, default_seg_mpp=default_seg_mpp, where=str(path))
    meta = obj.get("wsi2dmamba") if isinstance(obj, dict) else None
    return tissue, dict(meta) if isinstance(meta, dict) else {}
