"""The real-tissue arrangement cohort: its rule, its matched composition, its tile pool and grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi2dmamba.demo.arrangement import (
    BACKGROUND,
    GLASS,
    MARKED,
    ArrangementSpec,
    arrangement_grids,
    draw_arrangement,
    draw_arrangement_cohort,
    encode_tile_pool,
    has_straight_run,
    line_starts,
    marked_touch,
    mixed_crop,
    pool_crops,
    write_arrangement_cohort,
)
from wsi2dmamba.demo.mosaic import CELL_PX, load_asset


def test_hand_made_layouts_follow_the_rule_helpers():
    cells = np.ones((5, 6), np.int8)
    cells[2, 1:5] = MARKED
    assert has_straight_run(cells) and marked_touch(cells)
    cells[2, 3] = BACKGROUND  # a gap breaks the run
    assert not has_straight_run(cells)
    scattered = np.ones((5, 6), np.int8)
    scattered[0, 0] = scattered[2, 2] = scattered[4, 5] = MARKED
    assert not marked_touch(scattered) and not has_straight_run(scattered)
    scattered[1, 1] = MARKED  # diagonal neighbours touch
    assert marked_touch(scattered)
    tissue = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
    assert sorted(line_starts(tissue, 3, axis=1)) == [(0, 0), (1, 0), (1, 1)]
    assert line_starts(tissue, 3, axis=0) == []


def test_every_layout_follows_the_rule_and_the_spec():
    spec = ArrangementSpec()
    slides = draw_arrangement_cohort(ArrangementSpec(n_slides=400, seed=3))
    assert sum(s.label for s in slides) == 200
    for s in slides:
        rows, cols = s.cells.shape
        assert rows <= spec.side[1] and cols <= spec.side[1] and min(rows, cols) >= 10
        assert spec.marked[0] <= s.marked_cells <= spec.marked[1]
        assert s.cells[0].any() and s.cells[-1].any() and s.cells[:, 0].any() and s.cells[:, -1].any()  # cropped
        if s.label == 1:
            assert has_straight_run(s.cells)
        else:
            assert not marked_touch(s.cells) and not has_straight_run(s.cells)


def test_composition_and_size_say_nothing_about_the_label():
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import cross_val_predict

    slides = draw_arrangement_cohort(ArrangementSpec(n_slides=1200, seed=5))
    x = np.array([[*s.cells.shape, s.tissue_cells, s.marked_cells, s.tissue_cells - s.marked_cells]
                  for s in slides], float)
    y = np.array([s.label for s in slides])
    p = cross_val_predict(LogisticRegression(max_iter=2000), (x - x.mean(0)) / x.std(0), y, cv=5,
                          method="predict_proba")[:, 1]
    assert roc_auc_score(y, p) < 0.56
    # the marked-cell counts have the same distribution in both classes
    counts = [np.bincount([s.marked_cells for s in slides if s.label == k], minlength=9) for k in (0, 1)]
    assert np.abs(counts[0] - counts[1]).max() < 0.1 * len(slides) / 2


def test_layouts_are_seeded_and_stable_when_the_cohort_grows():
    a = draw_arrangement_cohort(ArrangementSpec(n_slides=10, seed=2))
    b = draw_arrangement_cohort(ArrangementSpec(n_slides=20, seed=2))
    assert all(x.label == y.label and np.array_equal(x.cells, y.cells) for x, y in zip(a, b[:10]))
    c = draw_arrangement(np.random.default_rng(0), 1)
    assert has_straight_run(c)


def test_pool_tiles_mix_real_tissue_and_remake_alone():
    spec = ArrangementSpec(seed=4)
    tiles = pool_crops(spec, MARKED, 0, 6)
    assert tiles.shape == (6, CELL_PX, CELL_PX, 3) and tiles.dtype == np.uint8
    np.testing.assert_array_equal(pool_crops(spec, MARKED, 4, 6), tiles[4:6])
    assert not np.array_equal(pool_crops(spec, BACKGROUND, 0, 1)[0], tiles[0])
    marked, background = load_asset(spec.marked_asset), load_asset(spec.background_asset)
    rng = np.random.default_rng(0)
    n = [mixed_crop(marked, background, 0.75, rng)[1] for _ in range(200)]
    assert 2.7 < np.mean(n) < 3.3  # 4 quadrants × 0.75


def test_real_pool_grids_and_grid_files(tmp_path):
    from wsi2dmamba.cohort import load_cohort
    from wsi2dmamba.grid import read_feature_grid

    spec = ArrangementSpec(n_slides=4, seed=0, pool_size=3)
    pool = encode_tile_pool(spec, device="cpu", progress=False)  # the real default encoder on real tiles
    assert pool.shape == (2, 3, 1280) and np.isfinite(pool).all() and pool.std() > 0
    slides = draw_arrangement_cohort(spec)
    grids = arrangement_grids(slides, pool, spec)
    for s in slides:
        g = grids[s.slide_id]
        g.validate()
        np.testing.assert_array_equal(g.mask, (s.cells != GLASS).astype(np.uint8))
        kinds = s.cells[g.index[:, 0], g.index[:, 1]]
        # every cell's vector is a pool vector of its own kind
        for kind in (BACKGROUND, MARKED):
            rows = g.features[kinds == kind].astype(np.float32)
            d = np.abs(rows[:, None, :] - pool[kind - 1][None].astype(np.float16).astype(np.float32)).max(-1)
            assert (d.min(1) == 0).all()
    manifest = write_arrangement_cohort(tmp_path, spec, pool, progress=False)
    cohort = load_cohort(manifest, require_path=False)
    assert [r.label for r in cohort] == [("scattered", "aligned")[s.label] for s in slides]
    back = read_feature_grid(tmp_path / "features" / "efficientnet-lite0" / f"{slides[1].slide_id}.h5")
    np.testing.assert_array_equal(back.features, grids[slides[1].slide_id].features)


@pytest.mark.parametrize("name", ["2dmambamil", "m2dmil"])
def test_input_norm_and_step_range(name):
    from wsi2dmamba.errors import ConfigError
    from wsi2dmamba.models import create
    from wsi2dmamba.models.batch import GridBatch

    torch.manual_seed(0)
    model = create(name, in_dim=32, n_classes=2, input_norm=True, dt_range=(0.05, 0.5)).eval()
    feats = np.random.default_rng(0).random((5, 6, 32)).astype(np.float32)
    mask = np.ones((5, 6), bool)
    mask[0, 0] = False
    out = model(GridBatch.from_arrays([(feats, mask)])).logits
    # a LayerNorm on the input: a cell's features scaled and shifted give the same output
    scale = np.random.default_rng(1).uniform(0.5, 3.0, (5, 6, 1)).astype(np.float32)
    out2 = model(GridBatch.from_arrays([(feats * scale + 2.0, mask)])).logits
    torch.testing.assert_close(out, out2, atol=1e-4, rtol=1e-4)
    biases = [m.bias for n, m in model.named_modules() if n.endswith(("dt_proj", "dt_proj_t", "dt_proj_l"))]
    assert biases
    for b in biases:
        dt = torch.nn.functional.softplus(b)
        assert float(dt.detach().min()) >= 0.05 - 1e-6 and float(dt.detach().max()) <= 0.5 + 1e-6
    with pytest.raises(ConfigError, match="dt_range"):
        create(name, in_dim=32, n_classes=2, dt_range=(0.5, 0.1))
