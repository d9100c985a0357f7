"""Tiling on real slides: level choice, exact lattice, tissue fractions, tile pixels, the tiles file."""

from __future__ import annotations

import cv2
import h5py
import numpy as np
import pytest

from wsi2dmamba.cohort import Cohort
from wsi2dmamba.grid import read_tile_grid
from wsi2dmamba.slide import open_slide
from wsi2dmamba.tiling import TileConfig, Tiler, plan_sampling, read_tile, tile_cohort, tile_paths
from wsi2dmamba.tissue import SegmentConfig, TissueSegmenter, segment_cohort


@pytest.fixture(scope="module")
def cmu(cmu_slide):
    s = open_slide(cmu_slide)
    yield s, TissueSegmenter().segment(s)
    s.close()


def brute_force_fractions(tissue, grid):
    """Tissue fraction of every kept tile, counted pixel by pixel on the mask blown up to level 0."""
    w0, h0 = tissue.level0_size
    sx, sy = tissue.downsample
    cols = np.minimum((np.arange(w0) / sx).astype(int), tissue.mask.shape[1] - 1)
    rows = np.minimum((np.arange(h0) / sy).astype(int), tissue.mask.shape[0] - 1)
    full = tissue.mask[rows][:, cols]
    size = grid.tile_size_level0
    out = []
    for x, y in grid.coords:
        x1, y1 = int(round(x + size)), int(round(y + size))
        out.append(full[max(y, 0):min(y1, h0), max(x, 0):min(x1, w0)].sum() / ((x1 - x) * (y1 - y)))
    return np.array(out)


def assert_exact_lattice(grid):
    grid.validate()
    rel = (grid.coords - np.array(grid.origin_level0)) / grid.stride_level0
    assert np.abs(rel - grid.index[:, ::-1]).max() <= 0.5 / grid.stride_level0 + 1e-9
    # The lattice passes through (0, 0): the origin is a whole number of strides.
    for o in grid.origin_level0:
        assert o / grid.stride_level0 == pytest.approx(round(o / grid.stride_level0), abs=1e-9)
    flat = grid.index[:, 0].astype(np.int64) * grid.shape[1] + grid.index[:, 1]
    assert np.all(np.diff(flat) > 0)  # row-major, no shared cell


def test_cmu_default_tiles_native_level(cmu):
    slide, tissue = cmu
    g = Tiler().tile(slide, tissue, slide_id="cmu")
    # 0.499 µm/px is within 2 % of 0.5: level 0 read as is, 256 level-0 px per tile.
    assert g.read_level == 0 and g.is_native_level and g.mpp_effective == pytest.approx(0.499)
    assert g.tile_size_level0 == 256 and g.stride_level0 == 256
    assert np.all(g.coords % 256 == 0)
    assert_exact_lattice(g)
    assert g.n_tiles == 47 and g.shape == (12, 7)
    assert (g.tissue_fraction >= 0.25).all()
    # The grid is cropped to the tissue's bounding box.
    x0, y0, x1, y1 = tissue.bbox_level0()
    assert g.origin_level0[0] <= x0 < g.origin_level0[0] + 256 and g.origin_level0[1] <= y0
    assert g.origin_level0[0] + (g.shape[1] - 1) * 256 < x1


def test_tissue_fractions_match_a_pixel_count(cmu):
    slide, tissue = cmu
    g = Tiler(TileConfig(min_tissue=0.0)).tile(slide, tissue)
    assert np.abs(g.tissue_fraction - brute_force_fractions(tissue, g)).max() < 0.01
    # Every cell with any tissue is kept with min_tissue=0, and counts go down as the threshold goes up.
    counts = [Tiler(TileConfig(min_tissue=m)).tile(slide, tissue).n_tiles for m in (0.0, 0.25, 0.5, 0.9)]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]
    assert counts[0] == int((g.tissue_fraction > 0).sum())


def test_resampled_resolution_and_tile_pixels(cmu):
    slide, tissue = cmu
    g = Tiler(TileConfig(mpp=1.0, tile_px=224)).tile(slide, tissue)
    assert not g.is_native_level and g.read_level == 0 and g.mpp_effective == 1.0
    assert g.tile_size_level0 == pytest.approx(224 / 0.499)
    assert_exact_lattice(g)
    # Expected count: the same footprint in µm² of tissue, roughly (area / tile area) over the threshold.
    assert 0.5 * tissue.tissue_area_um2 / 224 ** 2 < g.n_tiles < 2.5 * tissue.tissue_area_um2 / 224 ** 2
    i = int(np.argmax(g.tissue_fraction))
    px = read_tile(slide, g, i)
    assert px.shape == (224, 224, 3) and px.dtype == np.uint8
    side = round(g.tile_size_level0)
    ref = cv2.resize(slide.read_region(tuple(g.coords[i]), 0, (side, side)), (224, 224), interpolation=cv2.INTER_AREA)
    assert np.array_equal(px, ref)
    assert px.mean() < 220  # a tissue tile


def test_overlap_gives_a_finer_lattice(cmu):
    slide, tissue = cmu
    plain = Tiler().tile(slide, tissue)
    over = Tiler(TileConfig(overlap=64)).tile(slide, tissue)
    assert over.stride_level0 == 192 and over.tile_size_level0 == 256 and over.stride_px == 192
    assert_exact_lattice(over)
    assert over.n_tiles > plain.n_tiles * (256 / 192) ** 2 * 0.8


def test_level_choice_on_pyramids(shared_data):
    with open_slide(shared_data / "slides/dicom_wsi/cmu-1-small-region") as d:
        s = plan_sampling(d.level_downsamples, d.mpp, TileConfig(mpp=1.0))
        assert s.read_level == 1 and s.mpp_effective == pytest.approx(0.998, rel=1e-3)  # native
        s = plan_sampling(d.level_downsamples, d.mpp, TileConfig(mpp=1.5))
        assert s.read_level == 1 and s.mpp_effective == 1.5 and s.tile_size_level0 == pytest.approx(256 * 1.5 / 0.499)
    with open_slide(shared_data / "slides/hamamatsu_ndpi/test3-DAPI-2-(387).ndpi") as n:
        s = plan_sampling(n.level_downsamples, n.mpp, TileConfig(mpp=0.5))
        assert s.read_level == 1 and s.mpp_effective == 0.5  # 0.456 µm/px: finer, read and shrink


def test_svs_and_dicom_of_the_same_pixels_give_the_same_tiles(shared_data, cmu):
    slide, tissue = cmu
    a = Tiler().tile(slide, tissue)
    with open_slide(shared_data / "slides/dicom_wsi/cmu-1-small-region") as d:
        b = Tiler().tile(d, TissueSegmenter().segment(d))
    assert a.shape == b.shape and abs(a.n_tiles - b.n_tiles) <= 3
    shared = set(map(tuple, a.index)) & set(map(tuple, b.index))
    assert len(shared) >= 0.9 * a.n_tiles


def test_ndpi_fluorescence_opens_and_tiles(shared_data, tmp_path):
    """DAPI nuclei are saturated blue on black: the H&E defaults take nucleus-rich areas as tissue."""
    path = shared_data / "slides/hamamatsu_ndpi/test3-DAPI-2-(387).ndpi"
    summary = tile_cohort(Cohort.from_paths([path], mpp=0.25), tmp_path,
                          TileConfig(segment_missing=True), progress=False)
    assert summary.ok, summary.failed
    g = read_tile_grid(tile_paths(tmp_path, path.stem)["h5"])
    assert g.n_tiles > 0 and g.mpp_level0 == 0.25 and g.read_level == 1
    with open_slide(path, mpp_override=0.25) as s:
        assert read_tile(s, g, 0).shape == (256, 256, 3)


def test_tiles_file_is_clam_and_trident_readable(tmp_path, cmu_slide):
    cohort = Cohort.from_paths([cmu_slide])
    segment_cohort(cohort, tmp_path, progress=False)
    summary = tile_cohort(cohort, tmp_path, progress=False)
    assert summary.ok
    paths = tile_paths(tmp_path, "CMU-1-Small-Region")
    with h5py.File(paths["h5"], "r") as f:
        c = f["coords"]
        assert c.dtype == np.int64 and c.shape == (47, 2)
        a = c.attrs
        assert a["patch_size"] == 256 and a["patch_size_level0"] == 256 and a["overlap"] == 0
        assert a["level0_magnification"] == pytest.approx(10 / 0.499)
        assert a["target_magnification"] == pytest.approx(10 / 0.499)  # the level read, not the request
        assert a["patch_level"] == 0 and list(a["level_dim"]) == [2220, 2967]  # CLAM: native level
        assert a["name"] == "CMU-1-Small-Region"
        assert f["grid/index"].shape == (47, 2) and f["grid/mask"].shape == (12, 7)
        assert f["grid/mask"][...].sum() == 47 and f["grid"].attrs["order"] == "row-major"
        assert f["tissue_fraction"].dtype == np.float32
        r = f.attrs
        assert r["mpp_requested"] == 0.5 and r["mpp_effective"] == pytest.approx(0.499)
        assert r["tissue_source"] == "geojson" and len(r["segment_params_hash"]) == 16
        assert r["params_hash"] == summary_hash(tmp_path)
    g = read_tile_grid(paths["h5"])
    assert_exact_lattice(g)
    from PIL import Image

    pic = Image.open(paths["picture"])
    assert pic.mode == "RGB" and max(pic.size) == 1024


def summary_hash(run):
    import json

    return json.loads((run / "tiles/.state/CMU-1-Small-Region.json").read_text())["params_hash"]


def test_changed_segment_parameters_are_refused_or_redone(tmp_path, cmu_slide):
    cohort = Cohort.from_paths([cmu_slide])
    segment_cohort(cohort, tmp_path, SegmentConfig(close_um=48), progress=False)
    # Tiling with other segmentation parameters than the contours were made with is refused.
    bad = tile_cohort(cohort, tmp_path, TileConfig(), progress=False)
    assert "other segmentation parameters" in bad.failed["CMU-1-Small-Region"]
    ok = tile_cohort(cohort, tmp_path, progress=False)  # reads RUN/segment/config.json
    assert ok.ok and ok.done == ["CMU-1-Small-Region"]
    # Changing the segmentation invalidates the tiles.
    segment_cohort(cohort, tmp_path, SegmentConfig(close_um=64), progress=False)
    again = tile_cohort(cohort, tmp_path, progress=False)
    assert again.done == ["CMU-1-Small-Region"] and not again.skipped


def test_hand_edited_geojson_is_used(tmp_path, cmu_slide):
    import json

    cohort = Cohort.from_paths([cmu_slide])
    segment_cohort(cohort, tmp_path, progress=False)
    geo = tmp_path / "segment/CMU-1-Small-Region.geojson"
    obj = json.loads(geo.read_text())
    # Keep one square of 1024 × 1024 level-0 pixels, as if drawn in QuPath (no wsi2dmamba member).
    sq = [[512, 512], [1536, 512], [1536, 1536], [512, 1536], [512, 512]]
    geo.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [sq]}, "properties": {}}]}))
    assert obj["features"]
    s = tile_cohort(cohort, tmp_path, TileConfig(min_tissue=0.99), progress=False)
    assert s.ok
    g = read_tile_grid(tile_paths(tmp_path, "CMU-1-Small-Region")["h5"])
    # The 4 × 4 cells inside the square are whole tissue; the cells the square's edge runs through are not.
    assert g.n_tiles == 16
    assert g.coords.min(axis=0).tolist() == [512, 512] and g.coords.max(axis=0).tolist() == [1280, 1280]
    assert g.origin_level0[0] <= 512 and g.shape[0] <= 6
    assert dict(h5py.File(tile_paths(tmp_path, "CMU-1-Small-Region")["h5"]).attrs)["tissue_source"] == "geojson (edited)"
