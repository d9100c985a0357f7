"""Feature extraction on a real slide (CPU, the default encoder): files, resume, stale tiles, damaged tiles,
and compatibility with the way CLAM and TRIDENT read feature files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from helpers import write_cohort
from wsi2dmamba.cohort import load_cohort
from wsi2dmamba.errors import SlideError
from wsi2dmamba.features import ExtractConfig, extract_cohort, extract_features, feature_path, load_encoder
from wsi2dmamba.features.extract import tiles_path
from wsi2dmamba.fileio import file_sha256
from wsi2dmamba.grid import read_feature_grid, read_tile_grid, write_tile_grid
from wsi2dmamba.grid.files import with_params_hash
from wsi2dmamba.slide import open_slide
from wsi2dmamba.tiling import TileConfig, read_tile, tile_cohort

ENCODER = "efficientnet-lite0"
# 224-px tiles at 1 µm/px: a few dozen cells on the CMU slide, so a CPU run takes seconds.
COARSE = TileConfig(tile_px=224, mpp=1.0, segment_missing=True)




def tiled_run(run: Path, slide: Path, config: TileConfig = COARSE, slide_id: str = "cmu"):
    """A run folder whose tiles file was made by the tile stage; returns the cohort."""
    cohort = load_cohort(write_cohort(run, [(slide_id, slide)]))
    summary = tile_cohort(cohort, run, config, progress=False)
    assert summary.ok, summary.failed
    return cohort


@pytest.fixture(scope="module")
def encoder():
    return load_encoder(ENCODER, device="cpu")


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, cmu_slide, encoder):
    """The CMU slide tiled and extracted with the CLI: (run folder, cohort, summary text)."""
    from typer.testing import CliRunner

    from wsi2dmamba.cli import app

    run = tmp_path_factory.mktemp("run")
    cohort = tiled_run(run, cmu_slide)
    result = CliRunner().invoke(app, ["extract", "--cohort", str(run / "cohort.csv"), "--out", str(run),
                                      "--encoder", ENCODER, "--device", "cpu", "--workers", "1",
                                      "--batch-size", "8", "--quiet"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return run, cohort, result.output


def test_extraction_writes_a_feature_grid_matching_its_tiles(extracted, encoder, cmu_slide):
    run, cohort, output = extracted
    tiles = read_tile_grid(tiles_path(run, "cmu"))
    grid = read_feature_grid(feature_path(run, ENCODER, "cmu"))
    assert grid.n_tiles == tiles.n_tiles >= 6
    assert grid.features.shape == (tiles.n_tiles, 1280) and grid.features.dtype == np.float32
    assert np.isfinite(grid.features).all() and grid.features.std() > 0
    # The grid is the tiles' grid: same cells, same mask of tissue and non-tissue cells.
    np.testing.assert_array_equal(grid.mask, tiles.mask)
    np.testing.assert_array_equal(grid.index, tiles.index)
    np.testing.assert_array_equal(grid.coords, tiles.coords)
    assert grid.shape == tiles.shape and 0 < grid.mask.sum() < grid.mask.size
    np.testing.assert_array_equal(grid.tissue_fraction, tiles.tissue_fraction)
    assert not grid.blank.any()
    assert grid.encoder == ENCODER and grid.weights_sha256 == file_sha256(encoder.spec.weights_path())
    with h5py.File(feature_path(run, ENCODER, "cmu"), "r") as f:
        assert f.attrs["tiles_params_hash"] == tiles.params_hash
        assert f.attrs["encoder_precision"] == "fp32" and f.attrs["n_blank_tiles"] == 0
    assert f"{tiles.n_tiles} tiles encoded" in output and "0 unreadable" in output
    # Each row is the encoding of its tile as the shared tile reader returns it.
    with open_slide(cmu_slide) as slide:
        pixels = np.stack([read_tile(slide, tiles, i) for i in (0, tiles.n_tiles - 1)])
    direct = encoder.encode(torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(grid.features[[0, -1]], direct, atol=2e-4, rtol=1e-3)
    ledger = (run / "ledger.csv").read_text()
    assert "features/efficientnet-lite0,cmu,done" in ledger


def test_resume_skips_done_slides_whatever_the_speed_settings(extracted, encoder):
    run, cohort, _ = extracted
    before = feature_path(run, ENCODER, "cmu").stat().st_mtime_ns
    cfg = ExtractConfig(encoder=ENCODER, device="cpu", batch_size=3, workers=0, max_run_tiles=2)
    summary = extract_cohort(cohort, run, cfg, progress=False, encoder=encoder)
    assert summary.skipped == ["cmu"] and not summary.done
    assert feature_path(run, ENCODER, "cmu").stat().st_mtime_ns == before


def test_a_tiles_file_from_other_parameters_is_extracted_again(extracted, encoder, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(extracted[0], run)
    cohort = load_cohort(write_cohort(run, [("cmu", extracted[1].records[0].path)]))
    cfg = ExtractConfig(encoder=ENCODER, device="cpu", workers=0)
    old = read_tile_grid(tiles_path(run, "cmu"))
    write_tile_grid(tiles_path(run, "cmu"), with_params_hash(old, "0123456789abcdef"))
    # Recorded as the tile stage records its outputs (a tiles file changed behind its back is refused).
    state = json.loads((run / "tiles" / ".state" / "cmu.json").read_text())
    state["outputs"] = {"tiles/cmu.h5": file_sha256(tiles_path(run, "cmu"))}
    (run / "tiles" / ".state" / "cmu.json").write_text(json.dumps(state))
    summary = extract_cohort(cohort, run, cfg, progress=False, encoder=encoder)
    assert summary.done == ["cmu"] and not summary.skipped
    with h5py.File(feature_path(run, ENCODER, "cmu"), "r") as f:
        assert f.attrs["tiles_params_hash"] == "0123456789abcdef"
    # Unchanged tiles: skipped again.
    assert extract_cohort(cohort, run, cfg, progress=False, encoder=encoder).skipped == ["cmu"]


def test_a_slide_without_tiles_file_fails_with_a_pointer_to_the_tile_stage(extracted, encoder, tmp_path):
    run = tmp_path / "run"
    cohort = load_cohort(write_cohort(run, [("untiled", extracted[1].records[0].path)]))
    summary = extract_cohort(cohort, run, ExtractConfig(device="cpu", workers=0), progress=False,
                             encoder=encoder)
    assert list(summary.failed) == ["untiled"]
    assert "No tiles file" in summary.failed["untiled"] and "wsi2dmamba tile" in summary.failed["untiled"]
    assert "untiled,failed,No tiles file" in (run / "ledger.csv").read_text()
    assert not feature_path(run, ENCODER, "untiled").exists()


def _damage_one_jpeg_tile(src: Path, dst: Path, level0_xy: tuple[int, int]) -> tuple[int, int, int, int]:
    """Copy an Aperio slide and overwrite the start of the JPEG tile holding ``level0_xy``; returns that
    tile's level-0 box (x0, y0, x1, y1)."""
    import tifffile

    shutil.copy(src, dst)
    with tifffile.TiffFile(dst) as tf:
        page = tf.pages[0]
        tw, th = page.tilewidth, page.tilelength
        across = -(-page.imagewidth // tw)
        col, row = level0_xy[0] // tw, level0_xy[1] // th
        k = row * across + col
        offset = page.dataoffsets[k]
    with open(dst, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\0" * 64)  # no JPEG start marker: the decoder refuses the tile
    return col * tw, row * th, (col + 1) * tw, (row + 1) * th


def test_a_damaged_tile_becomes_a_flagged_blank_tile(extracted, encoder, tmp_path, cmu_slide):
    run = tmp_path / "run"
    (run / "tiles").mkdir(parents=True)
    shutil.copy(tiles_path(extracted[0], "cmu"), tiles_path(run, "cmu"))
    tiles = read_tile_grid(tiles_path(run, "cmu"))
    x, y = (int(v) for v in tiles.coords[tiles.n_tiles // 2] + int(tiles.tile_size_level0 // 2))
    bad = tmp_path / "damaged.svs"
    x0, y0, x1, y1 = _damage_one_jpeg_tile(cmu_slide, bad, (x, y))
    with open_slide(bad) as slide, pytest.raises(SlideError):
        slide.read_region((x0, y0), 0, (8, 8))

    cohort = load_cohort(write_cohort(run, [("cmu", bad)]))
    summary = extract_cohort(cohort, run, ExtractConfig(device="cpu", workers=1, batch_size=4),
                             progress=False, encoder=encoder)
    assert summary.done == ["cmu"], summary.failed
    grid = read_feature_grid(feature_path(run, ENCODER, "cmu"))
    # Exactly the tiles whose field of view touches the damaged JPEG tile are blank.
    size = int(round(tiles.tile_size_level0))
    cx, cy = tiles.coords[:, 0], tiles.coords[:, 1]
    touches = (cx < x1) & (cx + size > x0) & (cy < y1) & (cy + size > y0)
    assert touches.any()
    np.testing.assert_array_equal(grid.blank, touches)
    assert summary.infos["cmu"]["n_blank"] == int(touches.sum())
    with h5py.File(feature_path(run, ENCODER, "cmu"), "r") as f:
        assert f.attrs["n_blank_tiles"] == int(touches.sum())
    white = encoder.encode(torch.full((1, tiles.tile_px, tiles.tile_px, 3), 255, dtype=torch.uint8)).numpy()[0]
    np.testing.assert_allclose(grid.features[touches], np.tile(white, (int(touches.sum()), 1)), atol=2e-4)
    good = read_feature_grid(feature_path(extracted[0], ENCODER, "cmu"))
    np.testing.assert_allclose(grid.features[~touches], good.features[~touches], atol=2e-4, rtol=1e-3)

    # A slide with more unreadable tiles than tolerated fails instead.
    with open_slide(bad) as slide, pytest.raises(SlideError, match="could not be read"):
        extract_features(tiles, slide, encoder, ExtractConfig(device="cpu", workers=0, max_blank_fraction=0.0),
                         progress=False)


def test_feature_files_read_the_way_clam_and_trident_read_them(tmp_path, cmu_slide, encoder):
    # 512-px tiles at the slide's own resolution: a native level, so CLAM's attributes are written.
    run = tmp_path / "run"
    cohort = tiled_run(run, cmu_slide, TileConfig(tile_px=512, mpp=0.5, segment_missing=True))
    summary = extract_cohort(cohort, run, ExtractConfig(device="cpu", workers=0, batch_size=32),
                             progress=False, encoder=encoder)
    assert summary.done == ["cmu"]
    path = feature_path(run, ENCODER, "cmu")
    with h5py.File(path, "r") as f:
        # CLAM / 2DMambaMIL: features and coords, nothing else.
        features, coords = f["features"][:], f["coords"][:]
        assert features.shape == (len(coords), 1280) and coords.dtype == np.int64
        a = dict(f["coords"].attrs)
        # CLAM reads patch_size pixels at patch_level from each corner.
        level, size = int(a["patch_level"]), int(a["patch_size"])
        # TRIDENT: the level-0 footprint from the magnifications is exactly ours.
        footprint = a["patch_size"] * a["level0_magnification"] / a["target_magnification"]
        assert footprint == pytest.approx(a["patch_size_level0"], abs=0.5)
        assert f["features"].attrs["encoder"] == ENCODER and f["features"].attrs["name"] == "cmu"
    with open_slide(cmu_slide) as slide:
        patches = np.stack([slide.read_region(tuple(int(v) for v in coords[i]), level, (size, size))
                            for i in (0, len(coords) - 1)])
    np.testing.assert_allclose(features[[0, -1]], encoder.encode(torch.from_numpy(patches)).numpy(),
                               atol=2e-4, rtol=1e-3)


def test_cli_errors_name_the_problem(tmp_path, cmu_slide, monkeypatch):
    from typer.testing import CliRunner

    from wsi2dmamba.cli import app
    from wsi2dmamba.errors import ConfigError, WeightsError

    manifest = write_cohort(tmp_path, [("cmu", cmu_slide)])
    args = ["extract", "--cohort", str(manifest), "--out", str(tmp_path / "run"), "--device", "cpu"]
    result = CliRunner().invoke(app, args + ["--encoder", "resnet-51"])
    assert isinstance(result.exception, ConfigError) and "Unknown encoder 'resnet-51'" in str(result.exception)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    result = CliRunner().invoke(app, args + ["--encoder", "resnet50-trunc"])
    assert isinstance(result.exception, WeightsError)
    assert "No weight file for encoder 'resnet50-trunc'" in str(result.exception)


def test_small_slides_are_read_in_the_main_process():
    from wsi2dmamba.features.loader import IN_PROCESS_TILES, default_workers

    assert default_workers(IN_PROCESS_TILES - 1) == 0
    assert default_workers(IN_PROCESS_TILES) >= 1 and default_workers() >= 1
