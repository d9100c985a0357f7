"""QuPath round trips: valid tissue geometry on every real slide, QuPath's two GeoJSON export forms,
and attention tiles that stay on the slide."""

from __future__ import annotations

import json

import numpy as np
import pytest
import shapely
from shapely.geometry import shape
from typer.testing import CliRunner

from wsi2dmamba.cli import app
from wsi2dmamba.errors import StageInputError
from wsi2dmamba.slide import open_slide
from wsi2dmamba.tissue import SegmentConfig, TissueSegmenter, from_geojson, to_geojson

SHARED_SLIDES = [  # (path under shared data, mpp override)
    ("slides/aperio_svs/CMU-1-Small-Region.svs", None),
    ("slides/aperio_svs/tcga-cr-7395-01a-01-ts1.svs", 0.5),
    ("slides/hamamatsu_ndpi/test3-DAPI-2-(387).ndpi", None),  # outlines pinched in three places
    ("slides/dicom_wsi/cmu-1-small-region", None),
    ("slides/dicom_wsi_other/test_dicom.dcm", None),
]


def _shoelace(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def assert_valid_geometry_same_area_same_mask(tissue) -> int:
    """Every feature is valid, covers the traced polygon's area, and the file rebuilds the mask exactly.
    Returns how many traced outlines were invalid."""
    gj = json.loads(json.dumps(to_geojson(tissue)))
    fixed = 0
    for poly, feature in zip(tissue.polygons, gj["features"], strict=True):
        geom = shape(feature["geometry"])
        assert geom.is_valid, shapely.validation.explain_validity(geom)
        traced = shapely.geometry.Polygon(poly.exterior, list(poly.holes))
        fixed += not traced.is_valid
        # The traced outline's area (shoelace; holes subtracted) is kept.
        area = _shoelace(poly.exterior) - sum(_shoelace(h) for h in poly.holes)
        assert geom.area == pytest.approx(area, rel=1e-9, abs=1e-6)
    w, h = tissue.level0_size
    back = from_geojson(gj, level0_size=(w, h), mpp=1.0, default_seg_mpp=8.0)
    assert np.array_equal(back.mask, tissue.mask)
    return fixed


@pytest.mark.parametrize("rel, mpp", SHARED_SLIDES)
def test_tissue_geometry_is_valid_on_every_shared_slide(shared_data, rel, mpp):
    with open_slide(shared_data / rel, mpp_override=mpp) as s:
        tissue = TissueSegmenter(SegmentConfig()).segment(s)
    fixed = assert_valid_geometry_same_area_same_mask(tissue)
    if "ndpi" in rel:
        assert fixed >= 1  # the case that needs make_valid is covered


PINCHED_DEMO_SLIDES = (22, 44, 56, 74)  # of the default 96-slide demo cohort (seed 0)


def demo_slide_tissue(tmp_path, indices):
    """Tissue maps of the default demo cohort's slides ``indices``, written and read as the demo does."""
    from wsi2dmamba.demo import DemoCohortSpec
    from wsi2dmamba.demo.cohort import draw_cohort
    from wsi2dmamba.demo.mosaic import MOSAIC_MPP, render_cells, write_pyramidal_tiff

    spec = DemoCohortSpec(n_slides=96, seed=0, rule="contact")  # the demo pipelines' slides
    slides = draw_cohort(spec)
    for i in indices:
        s = slides[i]
        path = tmp_path / f"{s.slide_id}.tiff"
        rng = np.random.default_rng([spec.seed, i, 1])
        write_pyramidal_tiff(path, render_cells(s.layout.cells, rng, spec.augment), MOSAIC_MPP,
                             quality=spec.jpeg_quality)
        with open_slide(path) as sl:
            yield TissueSegmenter(SegmentConfig()).segment(sl)


def test_tissue_geometry_is_valid_on_pinched_demo_slides(tmp_path):
    fixed = [assert_valid_geometry_same_area_same_mask(t)
             for t in demo_slide_tissue(tmp_path, PINCHED_DEMO_SLIDES + (0, 1))]
    assert fixed == [1, 1, 1, 1, 0, 0]


@pytest.mark.slow
def test_tissue_geometry_is_valid_on_every_demo_slide(tmp_path):
    fixed = [assert_valid_geometry_same_area_same_mask(t) for t in demo_slide_tissue(tmp_path, range(96))]
    assert len(fixed) == 96 and [i for i, f in enumerate(fixed) if f] == list(PINCHED_DEMO_SLIDES)


# ----------------------------------------------------------------------------- QuPath's export forms

SQUARE = [[512, 512], [1536, 512], [1536, 1536], [512, 1536], [512, 512]]
FEATURE = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [SQUARE]},
           "properties": {"objectType": "annotation", "classification": {"name": "Tissue"}}}


@pytest.mark.parametrize("obj", [[FEATURE], {"type": "FeatureCollection", "features": [FEATURE]}])
def test_a_plain_array_of_features_reads_like_a_feature_collection(obj):
    t = from_geojson(obj, level0_size=(2220, 2967), mpp=0.499, default_seg_mpp=8.0)
    assert len(t.polygons) == 1 and t.mask.sum() > 0
    assert t.tissue_area_um2 == pytest.approx(1024 ** 2 * 0.499 ** 2, rel=0.05)


@pytest.mark.parametrize("obj, match", [
    ({"features": []}, "not GeoJSON.*got an object of type None"),
    ([1, 2], "item 0 of the JSON array is not a GeoJSON Feature"),
    ("text", "not GeoJSON.*got a JSON str"),
    ({"type": "Feature", "geometry": {"type": "Polygon", "coordinates": 5}}, "malformed GeoJSON geometry"),
])
def test_anything_else_is_a_clear_error(obj, match):
    with pytest.raises(StageInputError, match=match):
        from_geojson(obj, level0_size=(2220, 2967), mpp=0.499, default_seg_mpp=8.0, where="x.geojson")


def test_tile_uses_qupaths_array_export(tmp_path, cmu_slide):
    runner = CliRunner()
    assert runner.invoke(app, ["segment", str(cmu_slide), "--out", str(tmp_path), "-q"]).exit_code == 0
    geo = tmp_path / "segment" / "CMU-1-Small-Region.geojson"
    geo.write_text(json.dumps([FEATURE]))
    res = runner.invoke(app, ["tile", str(cmu_slide), "--out", str(tmp_path), "-q"])
    assert res.exit_code == 0, res.output
    geo.write_text(json.dumps({"annotations": []}))
    res = runner.invoke(app, ["tile", str(cmu_slide), "--out", str(tmp_path), "-q", "--force"])
    assert res.exit_code == 1 and "is not GeoJSON" in res.output + (res.stderr or "")


# ----------------------------------------------------------------------------- heatmap tiles

def test_heatmap_tiles_stay_on_the_slide(tmp_path, cmu_slide):
    from wsi2dmamba.cohort import Cohort
    from wsi2dmamba.heatmaps.attention import geojson_tiles, tile_boxes
    from wsi2dmamba.grid import FeatureGrid, read_tile_grid
    from wsi2dmamba.tiling import tile_cohort, tile_paths
    from wsi2dmamba.tissue import segment_cohort

    assert segment_cohort(Cohort.from_paths([cmu_slide]), tmp_path, progress=False).ok
    assert tile_cohort(Cohort.from_paths([cmu_slide]), tmp_path, progress=False).ok
    tiles = read_tile_grid(tile_paths(tmp_path, "CMU-1-Small-Region")["h5"])
    grid = FeatureGrid.from_tiles(tiles, np.zeros((tiles.n_tiles, 2), np.float32), encoder="none")
    w0, h0 = grid.level0_size
    raw = tile_boxes(grid)
    assert (raw[:, 2] > w0).any() or (raw[:, 3] > h0).any()  # the lattice runs past the edge
    geo = geojson_tiles(grid, np.full(grid.n_tiles, 1.0 / grid.n_tiles), "abmil")
    for f in geo["features"]:
        g = shape(f["geometry"])
        assert g.is_valid and g.area > 0
        x0, y0, x1, y1 = g.bounds
        assert 0 <= x0 < x1 <= w0 and 0 <= y0 < y1 <= h0
