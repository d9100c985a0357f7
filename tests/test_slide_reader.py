"""Slide reading on real slides: formats, pyramid levels, resolution, transparent pixels, damaged files."""

from __future__ import annotations

import shutil

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

from wsi2dmamba.errors import SlideError
from wsi2dmamba.slide import mpp_from_tiff_resolution, open_slide, resolve_mpp


def test_svs_geometry_resolution_and_pixels(cmu_slide):
    with open_slide(cmu_slide) as s:
        assert s.backend == "openslide" and s.vendor == "aperio"
        assert s.dimensions == (2220, 2967) and s.level_count == 1
        assert s.mpp == pytest.approx(0.499) and s.mpp_source == "metadata"
        region = s.read_region((1000, 1500), 0, (64, 48))
        assert region.shape == (48, 64, 3) and region.dtype == np.uint8
        # Same pixels as OpenSlide's own RGBA read (opaque inside the slide).
        ref = np.asarray(openslide.OpenSlide(str(cmu_slide)).read_region((1000, 1500), 0, (64, 48)))
        assert np.array_equal(region, ref[..., :3])
        assert region.std() > 10  # tissue, not glass


def test_pixels_past_the_edge_are_white(cmu_slide):
    with open_slide(cmu_slide) as s:
        r = s.read_region((2220 - 20, 2967 - 10), 0, (50, 40))
        assert (r[:, 20:] == 255).all() and (r[10:, :] == 255).all()
        neg = s.read_region((-30, -30), 0, (40, 40))
        assert (neg[:30] == 255).all()


def test_thumbnail_keeps_aspect_and_size(cmu_slide):
    with open_slide(cmu_slide) as s:
        th = s.thumbnail(300)
    assert max(th.shape[:2]) == 300 and th.shape[1] == round(2220 / (2967 / 300))
    assert th.dtype == np.uint8 and th.mean() < 250


def test_mpp_override_wins_over_metadata(cmu_slide):
    with open_slide(cmu_slide, mpp_override=0.25) as s:
        assert s.mpp == 0.25 and s.mpp_source == "override"
    with pytest.raises(SlideError, match="not a positive number"):
        open_slide(cmu_slide, mpp_override=-1)


def test_slide_without_mpp_has_a_clear_error_and_opens_with_override(shared_data):
    path = shared_data / "slides/aperio_svs/tcga-cr-7395-01a-01-ts1.svs"
    with pytest.raises(SlideError) as err:
        open_slide(path)
    msg = str(err.value)
    assert "tcga-cr-7395" in msg and "'mpp' column" in msg and "--slide-mpp" in msg
    # JPEG 2000 tiles decode through OpenSlide once the resolution is given.
    with open_slide(path, mpp_override=0.5) as s:
        assert s.level_count == 2 and s.mpp_source == "override"
        th = s.read_level(1)
        assert th.shape == (1783, 2221, 3) and th.mean() < 230


def test_objective_power_is_only_a_hint():
    with pytest.raises(SlideError, match=r"objective power of 20×.*'mpp' column"):
        resolve_mpp(None, None, path="x.svs", objective_power="20")


def test_tiff_resolution_tags():
    assert mpp_from_tiff_resolution(20000, 20000, "centimeter").mpp == pytest.approx(0.5)
    assert mpp_from_tiff_resolution(50800, 50800, "inch").mpp == pytest.approx(0.5)
    assert mpp_from_tiff_resolution(72, 72, "inch") is None  # a screen default, not a scan
    assert mpp_from_tiff_resolution(20000, 20000, "none") is None
    assert mpp_from_tiff_resolution(None, None, "centimeter") is None


def test_ndpi_levels_and_metadata(shared_data):
    with open_slide(shared_data / "slides/hamamatsu_ndpi/test3-DAPI-2-(387).ndpi") as s:
        assert s.vendor == "hamamatsu" and s.level_count == 7
        assert s.mpp == pytest.approx(0.22818, rel=1e-3)
        assert s.best_level_for(0.5) == 1 and s.best_level_for(0.1) == 0 and s.best_level_for(100) == 6
        assert s.read_region((2000, 2000), 2, (32, 32)).shape == (32, 32, 3)


def test_dicom_folder_and_file_open_the_same_pyramid_with_true_colours(shared_data, cmu_slide):
    folder = shared_data / "slides/dicom_wsi/cmu-1-small-region"
    with open_slide(folder) as d, open_slide(next(iter(sorted(folder.glob("*.dcm"))))) as d2, \
            open_slide(cmu_slide) as svs:
        assert d.vendor == "dicom" and d.level_count == 12 and d.dimensions == svs.dimensions
        assert d2.level_dimensions == d.level_dimensions and d.mpp == pytest.approx(0.499)
        assert d.best_level_for(2.0) == 2
        # The same tissue as the SVS: the frames are YCbCr although the header says RGB, and the colours
        # must come out as RGB (mean difference of a few grey levels from re-encoding, not ~60).
        a = d.read_region((600, 800), 0, (400, 400)).astype(int)
        b = svs.read_region((600, 800), 0, (400, 400)).astype(int)
        assert np.abs(a - b).mean() < 8


def test_single_file_dicom(shared_data):
    with open_slide(shared_data / "slides/dicom_wsi_other/test_dicom.dcm") as s:
        assert s.dimensions == (1000, 2459) and s.mpp == pytest.approx(2.004)
        assert s.thumbnail(256).mean() < 245


def test_plain_png_needs_an_mpp(shared_data):
    png = shared_data / "thumbnails/histolab_pen_marks/tcga-red-pen.png"
    with pytest.raises(SlideError, match="mpp"):
        open_slide(png)
    with open_slide(png, mpp_override=4.0) as s:
        assert s.backend == "image" and s.dimensions == (471, 448)
        assert s.read_region((460, 440), 0, (20, 20))[10:, 11:].min() == 255


def test_plain_tiff_resolution_from_tags(tmp_path, cmu_slide):
    with open_slide(cmu_slide) as s:
        rgb = s.read_region((800, 1200), 0, (300, 200))
    path = tmp_path / "crop.tif"
    tifffile.imwrite(path, rgb, photometric="rgb", resolution=(20000, 20000), resolutionunit="CENTIMETER")
    with open_slide(path) as t:
        assert t.backend == "image" and t.mpp == pytest.approx(0.5) and t.mpp_source == "tiff-tags"
        assert np.array_equal(t.read_region((0, 0), 0, (300, 200)), rgb)


def test_generic_tiled_pyramidal_tiff(tmp_path, cmu_slide):
    with open_slide(cmu_slide) as s:
        rgb = s.read_region((0, 0), 0, (2048, 2048))
    path = tmp_path / "pyr.tif"
    with tifffile.TiffWriter(path) as tw:
        for i, img in enumerate((rgb, rgb[::2, ::2], rgb[::4, ::4])):
            tw.write(np.ascontiguousarray(img), tile=(256, 256), photometric="rgb", compression="jpeg",
                     resolution=(1e4 / (0.5 * 2 ** i),) * 2, resolutionunit="CENTIMETER",
                     subfiletype=1 if i else 0)
    with open_slide(path) as t:
        assert t.backend == "openslide" and t.level_count == 3
        assert t.mpp == pytest.approx(0.5, rel=1e-3)
        assert t.best_level_for(1.0) == 1 and t.best_level_for(2.0) == 2
        assert np.abs(t.read_region((512, 512), 0, (64, 64)).astype(int) - rgb[512:576, 512:576]).mean() < 6


def test_rgba_png_is_composited_on_white(tmp_path):
    a = np.zeros((10, 10, 4), np.uint8)
    a[..., 0] = 200
    a[:5, :, 3] = 255
    Image.fromarray(a).save(tmp_path / "a.png")
    with open_slide(tmp_path / "a.png", mpp_override=1.0) as s:
        r = s.read_region((0, 0), 0, (10, 10))
    assert (r[:5, :, 0] == 200).all() and (r[:5, :, 1] == 0).all() and (r[5:] == 255).all()


def test_truncated_slide_is_a_slide_error(tmp_path, cmu_slide):
    bad = tmp_path / "half.svs"
    data = cmu_slide.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideError, match="truncated or damaged"):
        with open_slide(bad) as s:
            s.read_level(0)


def test_missing_file_and_folder_without_dicom(tmp_path):
    with pytest.raises(SlideError, match="not found"):
        open_slide(tmp_path / "nope.svs")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlideError, match="folder without .dcm"):
        open_slide(tmp_path / "empty")
    (tmp_path / "x.svs").write_bytes(b"not a slide at all")
    with pytest.raises(SlideError):
        open_slide(tmp_path / "x.svs")


def test_copy_of_slide_with_spaces_and_parentheses(tmp_path, cmu_slide):
    p = tmp_path / "a slide (1).svs"
    shutil.copy(cmu_slide, p)
    with open_slide(p) as s:
        assert s.dimensions == (2220, 2967)


def test_doctor_and_single_file_commands(tmp_path, cmu_slide):
    from typer.testing import CliRunner

    from wsi2dmamba.cli import app

    r = CliRunner().invoke(app, ["doctor"])
    assert r.exit_code == 0, r.output
    assert "openslide" in r.output and "(library 4." in r.output and "JPEG 2000: yes" in r.output
    assert "torch" in r.output and "CuPy" in r.output
    for stage in ("segment", "tile", "extract", "train"):
        assert f"{stage:<9} ready" in r.output
    run = tmp_path / "run"
    r = CliRunner().invoke(app, ["segment", str(cmu_slide), "--out", str(run), "-q", "--remove-pen"])
    assert r.exit_code == 0 and "1 done" in r.output
    r = CliRunner().invoke(app, ["tile", str(cmu_slide), "--out", str(run), "-q", "--tile-px", "224"])
    assert r.exit_code == 0 and "1 done" in r.output
    assert (run / "tiles" / "CMU-1-Small-Region.h5").is_file()
