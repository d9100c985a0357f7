"""Tiles decoded from the slides' stored JPEG tiles (the GPU decode path, run here on the CPU) against the
OpenSlide path: equal pixels where the lattice sits on whole level pixels, rounding elsewhere; every stored
tile decoded once; the per-slide fallback to OpenSlide; the path recorded; the features' identity unchanged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from wsi2dmamba.features.loader import TileBatches, TileReadPlan
from wsi2dmamba.features.tile_decode import (
    JpegTileBatches,
    area_matrix,
    choose_decode,
    decode_streams,
)
from wsi2dmamba.slide import open_slide
from wsi2dmamba.slide.jpeg_tiles import (
    UnsupportedTiles,
    decode_schedule,
    jpeg_tile_level,
    region_windows,
)

ENCODER = "efficientnet-lite0"


def openslide_tiles(plan: TileReadPlan) -> np.ndarray:
    images, blank = TileBatches(plan, len(plan.coords)).read_batch(np.arange(len(plan.coords)))
    assert not blank.any()
    return images


def jpeg_tiles(plan: TileReadPlan, level, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    out = [(im.numpy(), bad.numpy()) for im, _, bad in JpegTileBatches(plan, level, batch_size, "cpu")]
    return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])


def lattice(width: int, height: int, step: int, start: int = 0) -> np.ndarray:
    xs, ys = np.arange(start, width, step), np.arange(start, height, step)
    return np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2).astype(np.int64)


@pytest.fixture(scope="module")
def demo_tiff(tmp_path_factory) -> Path:
    """A demo slide: a pyramidal TIFF of YCbCr JPEG tiles (256 px) with 2× levels, made of the shipped tissue."""
    from wsi2dmamba.demo.mosaic import render_cells, write_pyramidal_tiff

    cells = np.array([[1, 2, 3, 4, 1], [3, 1, 1, 2, 4], [4, 4, 3, 1, 0], [2, 1, 3, 3, 1]])
    image = render_cells(cells, np.random.default_rng(1))
    return write_pyramidal_tiff(tmp_path_factory.mktemp("demo") / "demo.tif", image)


def test_aperio_tiles_equal_openslide_on_whole_pixels_across_stored_tile_borders(cmu_slide):
    """CMU's stored tiles are 240 px and RGB-coded; a 256-px lattice straddles them."""
    with open_slide(cmu_slide) as s:
        level = jpeg_tile_level(s.path, s.vendor, s.level_dimensions[0])
        plan = TileReadPlan(str(s.path), s.mpp, lattice(2220, 2967, 256, start=100)[::5], 0, 1.0, 256, 256)
    assert level.rgb_coded and (level.tile_width, level.tile_height) == (240, 240)
    got, blank = jpeg_tiles(plan, level)
    ref = openslide_tiles(plan)
    assert not blank.any()
    np.testing.assert_array_equal(got, ref)  # past the slide's right and bottom edges too (white)
    assert (got[:, :, :, :] == 255).all(axis=-1).mean() < 0.9  # real tissue, not a white page


def test_resized_tiles_are_within_rounding_of_openslide_and_cv2(cmu_slide):
    with open_slide(cmu_slide) as s:
        level = jpeg_tile_level(s.path, s.vendor, s.level_dimensions[0])
        plan = TileReadPlan(str(s.path), s.mpp, lattice(2220, 2967, 700, start=33)[:6], 0, 1.0, 150, 112)
    got, _ = jpeg_tiles(plan, level, batch_size=4)
    diff = np.abs(got.astype(int) - openslide_tiles(plan))
    assert diff.max() <= 1 and diff.mean() < 0.05


def test_a_lattice_on_the_stored_tiles_grid_is_the_decoded_tiles(demo_tiff):
    """256-px tiles on the demo slide's 256-px stored tiles (the last column and row reach past the edge)."""
    with open_slide(demo_tiff) as s:
        level = jpeg_tile_level(s.path, s.vendor, s.level_dimensions[0])
        plan = TileReadPlan(str(s.path), s.mpp, lattice(*s.dimensions, 256), 0, 1.0, 256, 256)
    got, blank = jpeg_tiles(plan, level, batch_size=4)
    np.testing.assert_array_equal(got, openslide_tiles(plan))
    assert not blank.any() and (got == 255).all(axis=-1).any()  # white past the slide's edge


def test_sub_pixel_corners_on_a_coarser_level_follow_openslides_shift(demo_tiff):
    """Level 1 of the demo slide (2× downsample): odd level-0 corners fall half a pixel apart."""
    coords = np.array([[0, 0], [1, 1], [3, 0], [101, 257], [511, 301], [333, 333], [700, 500]], np.int64)
    with open_slide(demo_tiff) as s:
        assert s.vendor == "generic-tiff" and s.level_downsamples[1] == 2.0
        level = jpeg_tile_level(s.path, s.vendor, s.level_dimensions[1])
        plan = TileReadPlan(str(s.path), s.mpp, coords, 1, 2.0, 128, 128)
    assert not level.rgb_coded
    got, _ = jpeg_tiles(plan, level, batch_size=3)
    diff = np.abs(got.astype(int) - openslide_tiles(plan)).reshape(len(coords), -1)
    np.testing.assert_array_equal(diff[0], 0)  # (0, 0): on whole pixels, equal
    assert diff.max() <= 3 and diff.mean() < 0.5


def test_each_stored_tile_is_decoded_once_however_the_lattice_falls(cmu_slide, monkeypatch):
    import wsi2dmamba.features.tile_decode as td

    with open_slide(cmu_slide) as s:
        level = jpeg_tile_level(s.path, s.vendor, s.level_dimensions[0])
        plan = TileReadPlan(str(s.path), s.mpp, lattice(2220, 2967, 200, start=70)[:40], 0, 1.0, 200, 200)
    origins, _ = region_windows(plan.coords, 1.0, 200)
    batches = [np.arange(s, min(s + 7, 40)) for s in range(0, 40, 7)]
    steps = decode_schedule(level, origins, 200, batches)
    decoded = np.concatenate([st.decode for st in steps])
    forgotten = np.concatenate([st.forget for st in steps])
    assert len(decoded) == len(set(decoded.tolist())) == len(set(forgotten.tolist())) == len(forgotten)
    assert set(decoded.tolist()) == set(forgotten.tolist())
    # A tile is forgotten only after the last batch that needs it, never before it is decoded.
    first = {t: b for b, st in enumerate(steps) for t in st.decode.tolist()}
    last = {t: b for b, st in enumerate(steps) for t in st.forget.tolist()}
    assert all(first[t] <= last[t] for t in first) and any(first[t] < last[t] for t in first)
    calls = []
    real = td.decode_streams
    monkeypatch.setattr(td, "decode_streams", lambda streams, *a: calls.append(len(streams)) or real(streams, *a))
    got, _ = jpeg_tiles(plan, level, batch_size=7)
    assert sum(calls) == len(decoded) < sum(len(b) for b in batches) * 2
    np.testing.assert_array_equal(got, openslide_tiles(plan))


def test_area_matrix_is_cv2_inter_area():
    import cv2

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (37, 37)).astype(np.float64)
    m = area_matrix(37, 16)
    np.testing.assert_allclose(m.sum(axis=1), 1.0)
    ours = m @ img @ m.T
    ref = cv2.resize(img.astype(np.float32), (16, 16), interpolation=cv2.INTER_AREA)
    np.testing.assert_allclose(ours, ref, atol=1e-3)


def test_a_damaged_stored_tile_flags_the_tiles_over_it(demo_tiff, tmp_path):
    with open_slide(demo_tiff) as s:
        level = jpeg_tile_level(s.path, s.vendor, s.level_dimensions[0])
    broken = tmp_path / "broken.tif"
    shutil.copy(demo_tiff, broken)
    with open(broken, "r+b") as fh:  # stored tile 1 (x 256-511, y 0-255) no longer starts a JPEG
        fh.seek(int(level.offsets[1]))
        fh.write(b"\0" * 16)
    with open_slide(broken) as s:
        level = jpeg_tile_level(s.path, s.vendor, s.level_dimensions[0])
        plan = TileReadPlan(str(s.path), s.mpp, np.array([[0, 0], [300, 10], [600, 300]], np.int64), 0, 1.0, 224, 224)
    got, blank = jpeg_tiles(plan, level)
    assert blank.tolist() == [False, True, False]
    assert (got[1] == 255).all() and not (got[0] == 255).all()
    tiles, bad = decode_streams([torch.tensor([0, 1, 2], dtype=torch.uint8), None], "cpu", (256, 256))
    assert bad == {0} and tiles == [None, None]


def test_slides_not_stored_as_jpeg_tiles_fall_back_to_openslide_with_the_reason(shared_data, cmu_slide):
    slides = shared_data / "slides"
    expected = {
        slides / "aperio_svs" / "tcga-cr-7395-01a-01-ts1.svs": "compression 33005",
        slides / "hamamatsu_ndpi" / "test3-DAPI-2-(387).ndpi": "OpenSlide only",
    }
    for path, reason in expected.items():
        with open_slide(path, mpp_override=0.5) as s:
            with pytest.raises(UnsupportedTiles, match=reason):
                choose_decode("jpeg", s, 0, "cpu")
            level, why = choose_decode("auto", s, 0, "cpu")
            assert level is None and why
            assert choose_decode("openslide", s, 0, "cpu")[0] is None
    with open_slide(slides / "aperio_svs" / "CMU-1-Small-Region.svs") as s:
        level, why = choose_decode("jpeg", s, 0, "cpu")
        assert level is not None and why == ""


def test_extract_decode_option_records_the_path_and_keeps_the_features_identity(demo_tiff, tmp_path):
    """`extract --decode jpeg` and `--decode openslide` on a demo slide: same features, same hash, the path
    recorded in the feature file and the stage state; `auto` on the CPU reads with OpenSlide and says why."""
    from typer.testing import CliRunner

    from wsi2dmamba.cli import app
    from wsi2dmamba.features import feature_path
    from wsi2dmamba.grid import read_feature_grid

    (tmp_path / "cohort.csv").write_text(f"slide_id,path\ndemo,{demo_tiff}\n")
    runner = CliRunner()
    tiled = runner.invoke(app, ["tile", "--cohort", str(tmp_path / "cohort.csv"), "--out", str(tmp_path / "a"),
                                "--mpp", "0.5", "--tile-px", "224", "--segment-missing", "--quiet"])
    assert tiled.exit_code == 0, tiled.output
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    grids, states = {}, {}
    for run, decode in (("a", "jpeg"), ("b", "openslide")):
        res = runner.invoke(app, ["extract", "--cohort", str(tmp_path / "cohort.csv"), "--out", str(tmp_path / run),
                                  "--encoder", ENCODER, "--device", "cpu", "--workers", "0", "--batch-size", "8",
                                  "--decode", decode, "--quiet"])
        assert res.exit_code == 0, res.output + repr(res.exception)
        grids[decode] = read_feature_grid(feature_path(tmp_path / run, ENCODER, "demo"))
        states[decode] = json.loads((tmp_path / run / "features" / ENCODER / ".state" / "demo.json").read_text())
    a, b = grids["jpeg"].features, grids["openslide"].features
    assert a.shape == b.shape and a.shape[0] >= 10
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.999
    assert states["jpeg"]["params_hash"] == states["openslide"]["params_hash"]
    assert states["jpeg"]["info"]["decode"] == "jpeg-tiles:cpu" and states["openslide"]["info"]["decode"] == "openslide"
    with h5py.File(feature_path(tmp_path / "a", ENCODER, "demo"), "r") as f:
        assert f.attrs["decode"] == "jpeg-tiles:cpu"
    # Resume: changing only the decode path does not make the slide be done again.
    res = runner.invoke(app, ["extract", "--cohort", str(tmp_path / "cohort.csv"), "--out", str(tmp_path / "a"),
                              "--encoder", ENCODER, "--device", "cpu", "--decode", "auto", "--quiet"])
    assert res.exit_code == 0 and "1 skipped" in res.output, res.output


@pytest.mark.parametrize("name,level,exact", [("dicom_wsi/cmu-1-small-region", 0, False),
                                              ("dicom_wsi/cmu-1-small-region", 1, False),
                                              ("dicom_wsi_other/test_dicom.dcm", 0, True)])
def test_dicom_wsi_frames_match_openslide(shared_data, name, level, exact):
    """DICOM WSI levels are read from their JPEG frames: the CMU series' frames are JFIF (YCbCr) under a
    header that says RGB, which the OpenSlide path corrects after the fact (±1 rounding); its level 1 has
    a downsample of 2.0003, so OpenSlide shifts regions by sub-pixel amounts (rounding-level means)."""
    from wsi2dmamba.slide.dicom_frames import read_dicom_header

    with open_slide(shared_data / "slides" / name, mpp_override=0.5) as s:
        stored, why = choose_decode("jpeg", s, level, "cpu")
        assert stored is not None and why == ""
        w, h = s.level_dimensions[level]
        ds = s.level_downsamples[level]
        coords = (lattice(w, h, 300) * ds).astype(np.int64)[:16]
        plan = TileReadPlan(str(s.path), s.mpp, coords, level, ds, 256, 256)
    got, blank = jpeg_tiles(plan, stored)
    diff = np.abs(got.astype(int) - openslide_tiles(plan))
    assert not blank.any() and (got < 250).mean() > 0.2  # tissue, not white
    if exact:
        np.testing.assert_array_equal(diff, 0)
    else:
        assert diff.mean() < 0.5 and np.percentile(diff, 99.9) <= 16
    with pytest.raises(UnsupportedTiles, match="not a DICOM"):
        read_dicom_header(shared_data / "slides" / "aperio_svs" / "CMU-1-Small-Region.svs")
