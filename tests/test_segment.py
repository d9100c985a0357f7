"""Tissue segmentation on real slides, blank tiles and real pen-marked images."""

from __future__ import annotations

import json

import numpy as np
import pytest

from wsi2dmamba.slide import open_slide
from wsi2dmamba.tissue import (SegmentConfig, TissueSegmenter, from_geojson, pen_mask, segment_cohort,
                               segment_paths, to_geojson)
from wsi2dmamba.cohort import Cohort

H_AND_E_SLIDES = [  # (path under shared data, mpp override)
    ("slides/aperio_svs/CMU-1-Small-Region.svs", None),
    ("slides/aperio_svs/tcga-cr-7395-01a-01-ts1.svs", 0.5),  # no mpp in the file
    ("slides/dicom_wsi/cmu-1-small-region", None),
    ("slides/dicom_wsi_other/test_dicom.dcm", None),
]
TILES = "tiles/histolab_fixture_tiles/"
PENS = "thumbnails/histolab_pen_marks/"


def segment(path, mpp=None, **cfg):
    with open_slide(path, mpp_override=mpp) as s:
        return TissueSegmenter(SegmentConfig(**cfg)).segment(s), s.dimensions


def iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


@pytest.fixture(scope="module")
def cmu_tissue(cmu_slide):
    return segment(cmu_slide)[0]


def test_cmu_tissue_polygons_holes_and_mask_agree(cmu_tissue):
    t = cmu_tissue
    assert not t.is_empty and 0.25 < t.mask.mean() < 0.5  # skin strip over a third of the field
    assert len(t.polygons) >= 1 and t.n_holes >= 1  # the tear near the top is a hole
    assert t.mpp == pytest.approx(8.0, rel=0.02)
    x0, y0, x1, y1 = t.bbox_level0()
    assert 0 <= x0 < x1 <= 2220 and 0 <= y0 < y1 <= 2967
    for p in t.polygons:
        assert p.exterior[:, 0].min() >= 0 and p.exterior[:, 0].max() <= 2220
    # Area in µm² is the mask area: about 0.38 of 1.108 mm × 1.481 mm.
    assert t.tissue_area_um2 / 1e6 == pytest.approx(t.mask.mean() * 2220 * 2967 * 0.499 ** 2 / 1e6, rel=0.03)


@pytest.mark.parametrize("rel, mpp", H_AND_E_SLIDES)
def test_tissue_found_on_every_h_and_e_slide(shared_data, rel, mpp):
    t, dims = segment(shared_data / rel, mpp)
    assert not t.is_empty
    assert 0.1 < t.mask.mean() < 0.9, "tissue should be found, and glass should not"
    assert t.level0_size == dims


def test_same_tissue_from_svs_and_dicom(shared_data, cmu_tissue):
    d, _ = segment(shared_data / "slides/dicom_wsi/cmu-1-small-region")
    assert d.mask.shape == cmu_tissue.mask.shape
    assert iou(d.mask, cmu_tissue.mask) > 0.9  # read from another pyramid level


@pytest.mark.parametrize("name", ["no-tissue.png", "no-tissue2.png", "no-tissue-line.png", "almost-white-1.png",
                                  "almost-white-2.png"])
def test_no_tissue_on_blank_tiles(shared_data, name):
    t, _ = segment(shared_data / TILES / name, mpp=0.5)
    assert t.is_empty


def test_no_tissue_on_background_tile_and_tissue_on_tissue_tiles(shared_data):
    back = next((shared_data / "tiles/nct_crc_he_100k_samples/BACK").glob("*.tif"))
    assert segment(back, mpp=0.5)[0].is_empty
    for name in ["tissue-level0-4302-10273-4814-10785.png", "tissue-level2-1784-6289-5880-10386.png"]:
        assert segment(shared_data / TILES / name, mpp=0.5)[0].mask.mean() > 0.4


def test_otsu_threshold_agrees_with_fixed_on_cmu(cmu_slide, cmu_tissue):
    t, _ = segment(cmu_slide, threshold="otsu")
    assert iou(t.mask, cmu_tissue.mask) > 0.8


def test_areas_are_physical_not_pixels(cmu_slide, cmu_tissue):
    fine, _ = segment(cmu_slide, seg_mpp=4.0)
    assert fine.mask.shape[0] == pytest.approx(2 * cmu_tissue.mask.shape[0], abs=1)
    assert fine.tissue_area_um2 == pytest.approx(cmu_tissue.tissue_area_um2, rel=0.1)
    # A minimum area larger than the slide leaves nothing; a hole limit larger than any hole fills them.
    assert segment(cmu_slide, min_tissue_area_um2=2e6)[0].is_empty
    assert segment(cmu_slide, min_hole_area_um2=1e7)[0].n_holes == 0


# --------------------------------------------------------------------------------------------- pen marks

@pytest.mark.parametrize("name", ["no-tissue-red-pen.png", "no-tissue-green-pen.png"])
def test_pen_over_glass_is_not_tissue(shared_data, name):
    path = shared_data / TILES / name
    assert segment(path, mpp=0.5)[0].mask.mean() > 0.3  # ink is saturated: it looks like tissue
    assert segment(path, mpp=0.5, remove_pen=True)[0].is_empty


@pytest.mark.parametrize("name, mpp, colors", [
    ("tcga-red-pen.png", 4.0, ("red",)),
    ("tcga-green-pen.png", 4.0, ("green", "blue")),  # a teal marker: between green and blue
    ("wsi-blue-pen.png", 16.0, ("blue",)),
])
def test_pen_marks_removed_from_tissue(shared_data, name, mpp, colors):
    path = shared_data / PENS / name
    with open_slide(path, mpp_override=mpp) as s:
        rgb = s.read_level(0)
    ink = pen_mask(rgb, colors)
    assert ink.mean() > 0.01
    keep, _ = segment(path, mpp=mpp, seg_mpp=mpp)  # segmented at the image's own resolution
    removed, _ = segment(path, mpp=mpp, seg_mpp=mpp, remove_pen=True)

    def ink_covered(t):  # share of ink pixels that the tissue mask claims (mask is at this image's size)
        m = np.asarray(t.mask, bool)
        assert m.shape == ink.shape[:2]
        return (m & ink).sum() / ink.sum()

    assert ink_covered(keep) > 0.5
    assert ink_covered(removed) < 0.05
    assert not removed.is_empty  # the tissue beside the ink stays


@pytest.mark.parametrize("name", ["tissue-level0-4302-10273-4814-10785.png", "tissue-level0-7352-11762-7864-12274.png",
                                  "tissue-level2-3000-7666-7096-11763.png", "medium-nuclei-score-level1.png",
                                  "high-nuclei-score-level0.png"])
def test_pen_removal_leaves_pen_free_h_and_e_alone(shared_data, name):
    path = shared_data / TILES / name
    a, _ = segment(path, mpp=0.5)
    b, _ = segment(path, mpp=0.5, remove_pen=True)
    assert abs(a.mask.mean() - b.mask.mean()) < 0.02


def test_pen_removal_on_cmu_changes_nothing(cmu_slide, cmu_tissue):
    t, _ = segment(cmu_slide, remove_pen=True)
    assert iou(t.mask, cmu_tissue.mask) > 0.99


# --------------------------------------------------------------------------------------------- GeoJSON

def test_geojson_is_qupath_shaped_and_rebuilds_the_mask(cmu_tissue):
    gj = json.loads(json.dumps(to_geojson(cmu_tissue)))
    assert gj["type"] == "FeatureCollection" and gj["features"]
    holes = 0
    for f in gj["features"]:
        assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon"
        assert f["properties"]["objectType"] == "annotation"
        assert f["properties"]["classification"]["name"] == "Tissue"
        for ring in f["geometry"]["coordinates"]:
            assert len(ring) >= 4 and ring[0] == ring[-1]
            xy = np.array(ring)
            assert xy[:, 0].min() >= 0 and xy[:, 0].max() <= 2220 and xy[:, 1].max() <= 2967
        holes += len(f["geometry"]["coordinates"]) - 1
    assert holes == cmu_tissue.n_holes
    back = from_geojson(gj, level0_size=(2220, 2967), mpp=0.499, default_seg_mpp=8.0)
    assert np.array_equal(back.mask, cmu_tissue.mask)
    # A file edited elsewhere (no wsi2dmamba member) is rasterised at the default resolution.
    bare = {"type": "FeatureCollection", "features": gj["features"]}
    again = from_geojson(bare, level0_size=(2220, 2967), mpp=0.499, default_seg_mpp=8.0)
    assert again.mask.shape == cmu_tissue.mask.shape and iou(again.mask, cmu_tissue.mask) > 0.97


def test_segment_stage_writes_geojson_mask_and_overlay(tmp_path, cmu_slide, cmu_tissue):
    from PIL import Image

    summary = segment_cohort(Cohort.from_paths([cmu_slide]), tmp_path, progress=False)
    assert summary.ok and summary.done == ["CMU-1-Small-Region"]
    paths = segment_paths(tmp_path, "CMU-1-Small-Region")
    gj = json.loads(paths["geojson"].read_text())
    meta = gj["wsi2dmamba"]
    assert meta["slide_id"] == "CMU-1-Small-Region" and meta["mpp_level0"] == pytest.approx(0.499)
    assert meta["params"]["seg_mpp"] == 8.0 and len(meta["params_hash"]) == 16
    mask = np.asarray(Image.open(paths["mask"]))
    assert mask.shape == cmu_tissue.mask.shape and np.array_equal(mask > 0, cmu_tissue.mask)
    overlay = Image.open(paths["overlay"])
    assert overlay.mode == "RGB" and max(overlay.size) == 1024
    assert summary.infos["CMU-1-Small-Region"]["n_holes"] >= 1
