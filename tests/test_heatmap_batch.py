"""Heatmaps to publish: every test slide in one batch (resumed), smooth maps from overlapping tiles,
scaling and colour bar, the top/bottom tile montage with coordinates, per-class maps."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from training_data import TINY, make_cohort, one_thread  # noqa: F401
from typer.testing import CliRunner

from wsi2dmamba.cli import app
from wsi2dmamba.heatmaps import heatmap
from wsi2dmamba.heatmaps.attention import class_contributions
from wsi2dmamba.heatmaps.batch import heatmap_cohort, slides_tested_by_fold
from wsi2dmamba.heatmaps.figures import HeatmapStyle, blurred, scale_scores, score_map
from wsi2dmamba.grid import read_feature_grid

pytestmark = pytest.mark.usefixtures("one_thread")
PLAIN = HeatmapStyle(colorbar=False, top_k=0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small run: abmil trained on 9 patients, 3 folds (3 test slides each)."""
    from wsi2dmamba.cohort import load_cohort
    from wsi2dmamba.training import TrainConfig, train_cohort

    folder = tmp_path_factory.mktemp("heatmaps")
    manifest, feat_dir = make_cohort(folder, n_patients=9, seed=4)
    config = TrainConfig(folds=3, epochs=1, lr=5e-3, batch_size=2, seed=0, device="cpu")
    train_cohort(load_cohort(manifest, require_path=False), feat_dir, folder / "run", "abmil", config,
                 TINY["abmil"], progress=False)
    return folder / "run", manifest, feat_dir


def test_overlapping_tiles_are_averaged_and_blur_keeps_the_level():
    # Two tiles of 10 px overlapping by half (a stride of 5, CLAM's 50 % overlap).
    boxes = np.array([[0, 0, 10, 10], [5, 0, 15, 10]], float)
    mean, count = score_map((12, 20), boxes, np.array([0.2, 0.8]))
    assert count[3, 2] == 1 and count[3, 7] == 2 and count[3, 17] == 0
    assert mean[3, 2] == pytest.approx(0.2) and mean[3, 7] == pytest.approx(0.5) and mean[3, 12] == pytest.approx(0.8)
    # A constant map stays constant under the blur, up to the tissue's edge (normalised by coverage).
    flat, cov = score_map((40, 40), np.array([[5, 5, 35, 35]], float), np.array([0.7]))
    out = blurred(flat, cov > 0, 3.0)
    assert np.allclose(out[cov > 0], 0.7) and not out[cov == 0].any()


def test_scales():
    v = np.arange(101, dtype=float) ** 2
    unit, ends = scale_scores(v, HeatmapStyle(scale="percentile", clip=(5, 95)))
    assert ends == pytest.approx((np.percentile(v, 5), np.percentile(v, 95)))
    assert unit.min() == 0 and unit.max() == 1 and (unit == 0).sum() == 6
    unit, ends = scale_scores(v, HeatmapStyle(scale="rank"))
    assert ends == (0, 100) and unit == pytest.approx(np.arange(101) / 100)
    unit, ends = scale_scores(v, HeatmapStyle(scale="linear"))
    assert ends == (0, 10000) and unit[50] == pytest.approx(0.25)


def test_all_test_slides_in_one_batch_each_by_its_fold_and_resumed(run, tmp_path):
    run_dir, _, _ = run
    folds = slides_tested_by_fold(run_dir / "train" / "abmil")
    assert len(folds) == 9 and len(set(folds.values())) == 3
    s = heatmap_cohort(run_dir, "abmil", out_dir=tmp_path, thumbnail_px=96, style=PLAIN, progress=False)
    assert sorted(s.done) == sorted(folds) and not s.failed and not s.skipped
    for sid, k in folds.items():
        info = json.loads((tmp_path / f"{sid}.json").read_text())
        assert info["fold"] == k and info["partition"] == "test"
        assert (tmp_path / f"{sid}.geojson").is_file() and (tmp_path / f"{sid}.png").is_file()
    again = heatmap_cohort(run_dir, "abmil", out_dir=tmp_path, thumbnail_px=96, style=PLAIN, progress=False)
    assert sorted(again.skipped) == sorted(folds) and not again.done
    # Other parameters, or a lost file, redraw the slides concerned.
    sid = sorted(folds)[0]
    (tmp_path / f"{sid}.png").unlink()
    part = heatmap_cohort(run_dir, "abmil", out_dir=tmp_path, thumbnail_px=96, style=PLAIN, progress=False)
    assert part.done == [sid]
    blur = heatmap_cohort(run_dir, "abmil", [sid, "nope"], out_dir=tmp_path, thumbnail_px=96,
                          style=HeatmapStyle(colorbar=False, top_k=0, blur=1.0), progress=False)
    assert blur.done == [sid] and "nope" in blur.failed


def test_heatmap_all_cli(run, tmp_path):
    run_dir, _, _ = run
    args = ["heatmap", "--out", str(run_dir), "--model", "abmil", "--all", "--size", "64", "--top-k", "0",
            "--no-colorbar", "-q", "--device", "cpu"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    n = len(slides_tested_by_fold(run_dir / "train" / "abmil"))
    assert f"{n} slide(s) drawn, 0 already done" in res.output
    assert f"0 slide(s) drawn, {n} already done" in CliRunner().invoke(app, args).output


def test_figure_with_colour_bar_and_tile_montage(run, tmp_path):
    run_dir, _, feats = run
    sid = sorted(slides_tested_by_fold(run_dir / "train" / "abmil"))[0]
    res = heatmap(run_dir, "abmil", sid, out_dir=tmp_path, thumbnail_px=256, device="cpu",
                  style=HeatmapStyle(top_k=3, scale="percentile"))
    names = sorted(p.name for p in res.files)
    assert names == sorted([f"{sid}.geojson", f"{sid}.png", f"{sid}_figure.png", f"{sid}_top3.png", f"{sid}_top3.csv"])
    overlay = Image.open(tmp_path / f"{sid}.png")
    figure = Image.open(tmp_path / f"{sid}_figure.png")
    assert figure.size[0] > overlay.size[0]  # the colour bar beside the map
    grid = read_feature_grid(feats / f"{sid}.h5")
    rows = list(csv.DictReader(open(tmp_path / f"{sid}_top3.csv")))
    assert [r["kind"] for r in rows] == ["top"] * 3 + ["bottom"] * 3
    att = res.attention
    assert float(rows[0]["attention"]) == pytest.approx(att.max(), rel=1e-5)
    assert float(rows[3]["attention"]) == pytest.approx(att.min(), rel=1e-5)
    for r in rows:  # the coordinates are the tiles' level-0 corners
        i = int(np.flatnonzero((grid.index[:, 0] == int(r["row"])) & (grid.index[:, 1] == int(r["col"])))[0])
        assert [int(r["x_level0"]), int(r["y_level0"])] == grid.coords[i].tolist()
    assert min(Image.open(tmp_path / f"{sid}_top3.png").size) > 200


def test_per_class_maps_of_a_multi_class_model(tmp_path):
    from wsi2dmamba.cohort import load_cohort
    from wsi2dmamba.models import GridBatch
    from wsi2dmamba.training import TrainConfig, load_checkpoint, train_cohort

    manifest, feat_dir = make_cohort(tmp_path, n_patients=12, seed=2, n_classes=3)
    config = TrainConfig(folds=2, epochs=1, lr=5e-3, batch_size=2, seed=0, device="cpu")
    train_cohort(load_cohort(manifest, require_path=False), feat_dir, tmp_path / "run", "abmil", config,
                 TINY["abmil"], progress=False)
    folds = slides_tested_by_fold(tmp_path / "run" / "train" / "abmil")
    sid, k = sorted(folds.items())[0]
    res = heatmap(tmp_path / "run", "abmil", sid, out_dir=tmp_path / "h", thumbnail_px=128, device="cpu",
                  style=HeatmapStyle(top_k=0))
    assert res.contributions is not None and res.contributions.shape[1] == 3
    classes = ["grade0", "grade1", "grade2"]
    for c in classes:
        assert (tmp_path / "h" / f"{sid}_class-{c}.png").is_file()
        assert (tmp_path / "h" / f"{sid}_class-{c}_figure.png").is_file()
    # The tiles' shares add up to the slide's logits (less the head's bias).
    grid = read_feature_grid(feat_dir / f"{sid}.h5")
    net = load_checkpoint(tmp_path / "run" / "train" / "abmil" / f"fold_{k}" / "best.safetensors")
    with torch.no_grad():
        logits = net(GridBatch.from_grids([grid])).logits[0].numpy()
    shares = class_contributions(net, grid)
    assert shares.sum(axis=0) + net.head.bias.detach().numpy() == pytest.approx(logits, abs=1e-4)
    geo = json.loads(res.geojson.read_text())
    m = geo["features"][0]["properties"]["measurements"]
    assert {f"share of {c}" for c in classes} <= set(m)


def test_tiles_of_a_real_overlapping_lattice_are_averaged(tmp_path, cmu_slide):
    """CMU tiled with 50 % overlap (CLAM's usual): where four tiles cover a pixel, two of each column
    parity, the map shows their mean."""
    from wsi2dmamba.cohort import Cohort
    from wsi2dmamba.heatmaps.attention import draw_scores, tile_boxes
    from wsi2dmamba.grid import read_tile_grid
    from wsi2dmamba.tiling import TileConfig, tile_cohort, tile_paths

    cohort = Cohort.from_paths([cmu_slide])
    assert tile_cohort(cohort, tmp_path, TileConfig(tile_px=128, overlap=64, mpp=2.0, segment_missing=True),
                       progress=False).ok
    grid = read_tile_grid(tile_paths(tmp_path, "CMU-1-Small-Region")["h5"])
    assert grid.stride_level0 == pytest.approx(grid.tile_size_level0 / 2, rel=0.02)
    downsample = grid.tile_size_level0 / 16  # 16 thumbnail pixels a tile
    w0, h0 = grid.level0_size
    thumb = np.zeros((int(np.ceil(h0 / downsample)), int(np.ceil(w0 / downsample)), 3), np.uint8)
    parity = (grid.index[:, 1] % 2).astype(float)
    img = draw_scores(thumb, downsample, grid, parity, HeatmapStyle(cmap="gray", alpha=1.0))[..., 0]
    _, count = score_map(thumb.shape[:2], tile_boxes(grid, clip=True) / downsample, parity)
    inner = count == 4
    assert inner.sum() > 100
    assert np.abs(img[inner].astype(int) - 128).max() <= 2  # the mean of 0 and 1, not a stripe of either
