"""Attention heatmaps: PNG over the real slide's thumbnail, QuPath GeoJSON tiles on the level-0 lattice."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from training_data import one_thread, trained_run  # noqa: F401

from wsi2dmamba.errors import ConfigError
from wsi2dmamba.heatmaps import heatmap
from wsi2dmamba.grid import read_feature_grid
from wsi2dmamba.models import GridBatch
from wsi2dmamba.slide import open_slide
from wsi2dmamba.training import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory.getbasetemp())


def test_heatmap_png_and_geojson(run, tmp_path):
    run_dir, _, feats = run
    sid = "P004_S0"
    res = heatmap(run_dir, "abmil", sid, out_dir=tmp_path, thumbnail_px=1024)
    cfg = json.loads((run_dir / "train" / "abmil" / f"fold_{res.fold}" / "config.json").read_text())
    assert res.partition == "test" and sid in cfg["split"]["test"] and not res.notes

    grid = read_feature_grid(feats / f"{sid}.h5")
    model = load_checkpoint(run_dir / "train" / "abmil" / f"fold_{res.fold}" / "best.safetensors")
    with torch.no_grad():
        att = model(GridBatch.from_grids([grid])).attention[0].numpy()
    expected = att[grid.index[:, 0], grid.index[:, 1]]
    assert res.attention == pytest.approx(expected, abs=1e-6) and res.attention.sum() == pytest.approx(1.0, abs=1e-5)

    geo = json.loads(res.geojson.read_text())
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) == grid.n_tiles
    for i, f in enumerate(geo["features"]):
        ring = f["geometry"]["coordinates"][0]
        assert f["geometry"]["type"] == "Polygon" and ring[0] == ring[-1] and len(ring) == 5
        # The cell's level-0 box starts at the tile's level-0 coordinates and spans one tile.
        assert ring[0] == pytest.approx(grid.coords[i].tolist(), abs=0.51)
        assert ring[2][0] - ring[0][0] == pytest.approx(grid.tile_size_level0)
        props = f["properties"]
        assert props["objectType"] == "tile"
        assert props["measurements"]["attention"] == pytest.approx(expected[i], abs=1e-6)
        assert 0 <= props["measurements"]["attention_percentile"] <= 100
    top = int(np.argmax(expected))
    assert geo["features"][top]["properties"]["measurements"]["attention_percentile"] == 100.0

    with open_slide(grid.slide_path) as slide:
        thumb = slide.thumbnail(1024)
        w0 = slide.dimensions[0]
    img = np.asarray(Image.open(res.png).convert("RGB"))
    assert img.shape == thumb.shape
    ds = w0 / thumb.shape[1]
    inside = np.zeros(thumb.shape[:2], bool)
    for x, y in grid.coords:
        inside[int(np.ceil(y / ds)) + 1:int((y + grid.tile_size_level0) / ds) - 1,
               int(np.ceil(x / ds)) + 1:int((x + grid.tile_size_level0) / ds) - 1] = True
    changed = np.abs(img.astype(int) - thumb.astype(int)).max(axis=2) > 3
    assert changed[inside].mean() > 0.9            # every tile is coloured
    cover = np.zeros(thumb.shape[:2], bool)
    for x, y in grid.coords:
        cover[int(y // ds):int(np.ceil((y + grid.tile_size_level0) / ds)) + 1,
              int(x // ds):int(np.ceil((x + grid.tile_size_level0) / ds)) + 1] = True
    assert not changed[~cover].any()                # and nothing else


def test_heatmap_needs_an_attention_model_and_a_known_model(run, tmp_path):
    run_dir, _, _ = run
    with pytest.raises(ConfigError, match="no attention"):
        heatmap(run_dir, "meanpool", "P004_S0", out_dir=tmp_path)
    from wsi2dmamba.errors import StageInputError

    with pytest.raises(StageInputError, match="trained: abmil, meanpool"):
        heatmap(run_dir, "transmil", "P004_S0", out_dir=tmp_path)


def test_heatmap_cli(run):
    from typer.testing import CliRunner

    from wsi2dmamba.cli import app

    run_dir, _, _ = run
    result = CliRunner().invoke(app, ["heatmap", "--out", str(run_dir), "--model", "abmil", "--slide", "P007_S0",
                                      "--fold", "0", "--checkpoint", "last", "--size", "512"])
    assert result.exit_code == 0, result.output
    assert (run_dir / "heatmaps" / "abmil" / "P007_S0.png").is_file()
    assert Image.open(run_dir / "heatmaps" / "abmil" / "P007_S0.png").size[1] == 512
