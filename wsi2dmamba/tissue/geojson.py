"""Tissue maps as GeoJSON that QuPath opens (File ▸ Import objects), and back.

Each piece of tissue is a ``Feature`` with a ``Polygon`` geometry: the first ring is its outline, the
others its holes, in level-0 pixel coordinates (x right, y down, as QuPath uses). The features carry
QuPath's ``objectType`` and ``classification`` so that they open as "Tissue" annotations.

The FeatureCollection also carries a ``wsi2dmamba`` member (allowed by RFC 7946 as a foreign member) with
the mask's shape and downsample, so that the mask can be rebuilt exactly. A file edited in QuPath loses
that member; it is then rasterised at the default segmentation resolution.
"""

from __future__ import annotations

import json
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


def to_geojson(tissue: TissueMap, *, properties: dict[str, Any] | None = None) -> dict[str, Any]:
    """A GeoJSON FeatureCollection of the tissue polygons (level-0 pixels), with the mask geometry."""
    features = []
    for i, poly in enumerate(tissue.polygons):
        features.append({
            "type": "Feature",
            "id": f"tissue-{i}",
            "geometry": {"type": "Polygon", "coordinates": [_ring(poly.exterior)] + [_ring(h) for h in poly.holes]},
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
    return {"type": "FeatureCollection", "wsi2dmamba": meta, "features": features}


def dumps(obj: dict[str, Any]) -> str:
    """Compact, deterministic JSON text (one feature per line keeps diffs readable)."""
    head = {k: v for k, v in obj.items() if k != "features"}
    head_text = json.dumps(head, sort_keys=True, separators=(",", ":"))
    feats = ",\n".join(json.dumps(f, sort_keys=True, separators=(",", ":")) for f in obj.get("features", []))
    return head_text[:-1] + ',"features":[\n' + feats + "\n]}\n"


def _polygons_from(obj: dict[str, Any], where: str) -> list[TissuePolygon]:
    def geometries(o: dict[str, Any]):
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


def from_geojson(obj: dict[str, Any], *, level0_size: tuple[int, int], mpp: float, default_seg_mpp: float,
                 where: str = "GeoJSON") -> TissueMap:
    """A :class:`TissueMap` from GeoJSON: the polygons, and the mask rebuilt from them.

    Args:
        obj: parsed GeoJSON (FeatureCollection, Feature, or geometry; Polygon and MultiPolygon are used).
        level0_size: (width, height) of the slide's level 0.
        mpp: µm per level-0 pixel of the slide.
        default_seg_mpp: µm per mask pixel when the file does not say (e.g. exported by QuPath).
        where: the file, for error messages.
    """
    polys = _polygons_from(obj, where)
    meta = obj.get("wsi2dmamba") if isinstance(obj, dict) else None
    w0, h0 = int(level0_size[0]), int(level0_size[1])
    if meta and meta.get("mask_shape") and meta.get("mask_downsample") \
            and [int(v) for v in meta.get("level0_size", [w0, h0])] == [w0, h0]:
        shape = (int(meta["mask_shape"][0]), int(meta["mask_shape"][1]))
        ds = (float(meta["mask_downsample"][0]), float(meta["mask_downsample"][1]))
    else:
        d = max(default_seg_mpp / mpp, 1.0)
        shape = (max(1, round(h0 / d)), max(1, round(w0 / d)))
        ds = (w0 / shape[1], h0 / shape[0])
    mask = rasterize(level0_to_rings(polys, ds), shape)
    return TissueMap(polygons=tuple(polys), mask=mask, downsample=ds, mpp=mpp * ds[0], level0_size=(w0, h0))


def read_geojson(path, *, level0_size: tuple[int, int], mpp: float, default_seg_mpp: float) -> tuple[TissueMap, dict]:
    """Read a tissue GeoJSON file; returns the map and the file's ``wsi2dmamba`` member (or {})."""
    try:
        obj = json.loads(open(path, encoding="utf-8").read())
    except FileNotFoundError as exc:
        raise StageInputError(f"Tissue contours not found: {path}; run `wsi2dmamba segment` first.") from exc
    except (OSError, ValueError) as exc:
        raise StageInputError(f"{path} is not readable JSON ({exc}); rerun `wsi2dmamba segment` for it.") from exc
    tissue = from_geojson(obj, level0_size=level0_size, mpp=mpp, default_seg_mpp=default_seg_mpp, where=str(path))
    return tissue, dict(obj.get("wsi2dmamba") or {}) if isinstance(obj, dict) else {}
