"""Files a run wrote itself are compared with the sha256 recorded when they were written: a later stage
refuses a changed file before reading it, and a rerun of the stage that wrote it notices the change and
makes the slide again, with a warning."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from wsi2dmamba.cohort import load_cohort, read_state
from wsi2dmamba.cohort.ledger import (
    SlideState,
    hash_outputs,
    recorded_sha256,
    write_state,
)
from wsi2dmamba.errors import GridFileError
from wsi2dmamba.fileio import file_sha256
from wsi2dmamba.grid import read_tile_grid
from wsi2dmamba.grid.guard import guard_grid_files

pytest_plugins = ["conftest_reliability"]

VALID = Path(__file__).parent / "data" / "damaged" / "valid_tiles.h5"
COARSE = {"tile_px": 224, "mpp": 1.0, "segment_missing": True}


def _flip(path: Path, rng: random.Random, n_bits: int = 1) -> None:
    data = bytearray(path.read_bytes())
    for _ in range(n_bits):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


def _assert_redone(summary, path: Path) -> None:
    assert summary.done == ["cmu"]
    assert not summary.skipped
    assert str(path) in summary.redone["cmu"]
    assert "changed since it was written" in summary.redone["cmu"]
    assert "done again because their outputs had changed" in summary.line()


def test_rerun_redoes_a_slide_whose_output_changed_with_a_warning(tmp_path, cmu_slide, counts):
    from typer.testing import CliRunner

    from wsi2dmamba.cli import app
    from wsi2dmamba.tiling import TileConfig, tile_cohort

    manifest = tmp_path / "cohort.csv"
    manifest.write_text(f"slide_id,path\ncmu,{cmu_slide}\n")
    cohort, run, config = load_cohort(manifest), tmp_path / "run", TileConfig(**COARSE)
    assert tile_cohort(cohort, run, config, progress=False).done == ["cmu"]
    tiles = run / "tiles" / "cmu.h5"
    first = read_tile_grid(tiles)
    again = tile_cohort(cohort, run, config, progress=False)
    assert again.skipped == ["cmu"] and not again.redone  # the control: unchanged outputs are skipped
    _flip(tiles, random.Random(0))
    counts("faults")
    assert file_sha256(tiles) != recorded_sha256(tiles)
    _assert_redone(tile_cohort(cohort, run, config, progress=False), tiles)
    assert file_sha256(tiles) == recorded_sha256(tiles)
    back = read_tile_grid(tiles)
    assert (back.index == first.index).all() and (back.coords == first.coords).all()
    # The command line prints the warning.
    _flip(run / "tiles" / "cmu_grid.png", random.Random(1))
    counts("faults")
    result = CliRunner().invoke(app, ["tile", "--cohort", str(manifest), "--out", str(run), "--tile-px", "224",
                                      "--mpp", "1.0", "--segment-missing", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "warning: slide cmu:" in result.output and "cmu_grid.png changed since it was written" in result.output


def test_flipped_bits_in_recorded_files_are_all_refused_before_reading(tmp_path, counts):
    """200 copies of a tiles file, each with 1 to 8 random bits flipped, recorded with the original's hash:
    every one is refused by the hash (no child process: a tiny time limit would fail any that got there)."""
    folder = tmp_path / "tiles"
    folder.mkdir()
    rng = random.Random(7)
    paths = []
    for i in range(200):
        p = folder / f"s{i}.h5"
        p.write_bytes(VALID.read_bytes())
        write_state(tmp_path, SlideState(stage="tiles", slide_id=f"s{i}", status="done", params_hash="x",
                                         outputs=hash_outputs(tmp_path, [p])))
        _flip(p, rng, rng.randint(1, 8))
        paths.append(p)
    counts("inputs", len(paths))
    bad = guard_grid_files(paths, "tiles", {p: recorded_sha256(p) for p in paths}, "tile", base_limit_s=1e-3)
    assert set(bad) == set(paths)
    assert all("changed since the tile stage wrote it" in why for why in bad.values())


def test_training_refuses_a_feature_file_changed_since_extraction(tmp_path, counts):
    from training_data import make_cohort

    from wsi2dmamba.training import load_feature_grids

    manifest, feats = make_cohort(tmp_path, n_patients=4, seed=1)
    cohort = load_cohort(manifest, require_path=False)
    for sid in cohort.slide_ids:  # recorded as the extract stage records them
        write_state(tmp_path, SlideState(stage="features/colour-stats", slide_id=sid, status="done",
                                         params_hash="x", outputs=hash_outputs(tmp_path, [feats / f"{sid}.h5"])))
    assert len(load_feature_grids(cohort, feats)) == len(cohort.slide_ids)
    victim = feats / f"{cohort.slide_ids[2]}.h5"
    _flip(victim, random.Random(3))
    counts("faults")
    with pytest.raises(GridFileError) as ei:
        load_feature_grids(cohort, feats)
    assert f"{victim} changed since the extract stage wrote it" in str(ei.value)
    assert json.loads((feats / ".state" / f"{cohort.slide_ids[2]}.json").read_text())["status"] == "done"


def test_hand_edited_contours_are_kept_while_a_changed_mask_is_redone(tmp_path, cmu_slide, counts):
    """The GeoJSON of the segment stage is meant to be corrected by hand: a rerun keeps the edit. Its
    mask, not meant to be edited, is made again when its bytes change."""
    from wsi2dmamba.tissue import segment_cohort, segment_paths

    manifest = tmp_path / "cohort.csv"
    manifest.write_text(f"slide_id,path\ncmu,{cmu_slide}\n")
    cohort, run = load_cohort(manifest), tmp_path / "run"
    assert segment_cohort(cohort, run, progress=False).done == ["cmu"]
    paths = segment_paths(run, "cmu")
    edited = json.loads(paths["geojson"].read_text())
    edited["features"] = edited["features"][:1]  # a person deleted all but one piece of tissue
    paths["geojson"].write_text(json.dumps(edited))
    again = segment_cohort(cohort, run, progress=False)
    assert again.skipped == ["cmu"] and not again.redone
    assert json.loads(paths["geojson"].read_text()) == edited
    _flip(paths["mask"], random.Random(5))
    counts("faults")
    redone = segment_cohort(cohort, run, progress=False)
    assert redone.done == ["cmu"] and str(paths["mask"]) in redone.redone["cmu"]
    assert file_sha256(paths["mask"]) == read_state(run, "segment", "cmu").outputs["segment/cmu_mask.png"]
