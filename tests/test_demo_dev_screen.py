"""The development screen's feature reduction (``benchmarks/demo_dev_screen.py --pca``)."""

import numpy as np
from training_data import benchmark_module


def test_principal_axes_keep_the_kinds_apart_and_whiten():
    """Four kinds whose means differ along 3 of 64 directions, under heavy noise along 61 others: 8
    whitened principal axes keep the kinds apart (nearest mean is exact) and have unit variance each."""
    screen = benchmark_module("demo_dev_screen")
    rng = np.random.default_rng(0)
    means = np.zeros((4, 64))
    means[1:, :3] = 6 * np.eye(3)
    noise_scale = np.r_[np.full(3, 0.5), np.full(61, 2.0)]
    pool = {k + 1: means[k] + noise_scale * rng.standard_normal((200, 64)) for k in range(4)}
    reduced = screen.principal_axes(pool, 8)
    feats = np.concatenate([reduced[k] for k in sorted(reduced)])
    assert feats.shape == (800, 8) and feats.dtype == np.float32
    np.testing.assert_allclose(feats.std(axis=0), 1.0, atol=1e-3)
    np.testing.assert_allclose(feats.mean(axis=0), 0.0, atol=1e-4)
    centres = np.stack([reduced[k].mean(axis=0) for k in sorted(reduced)])
    nearest = np.argmin(((feats[:, None] - centres[None]) ** 2).sum(-1), axis=1)
    assert (nearest == np.repeat(np.arange(4), 200)).mean() > 0.99


def test_cell_weighted_axes_equal_a_fit_on_the_cells_as_the_slides_hold_them():
    """Weighting kinds by their share of the cells is the fit on a pool where each kind appears that often
    (as ``train --input-axes`` fits on a fold's cells): same axes up to sign, unit variance under the weights."""
    screen = benchmark_module("demo_dev_screen")
    rng = np.random.default_rng(1)
    scale = np.geomspace(0.2, 5.0, 16)  # distinct variances: the axes are unique up to sign
    pool = {k: 3 * k * rng.standard_normal(16) + rng.standard_normal((100, 16)) * scale for k in range(1, 5)}
    shares = {1: 0.5, 2: 1 / 6, 3: 1 / 6, 4: 1 / 6}
    weighted = screen.principal_axes(pool, 4, shares)
    repeated = screen.principal_axes({1: np.concatenate([pool[1]] * 3), 2: pool[2], 3: pool[3], 4: pool[4]}, 4)
    signs = np.sign(weighted[2][0]) * np.sign(repeated[2][0])
    np.testing.assert_allclose(weighted[2], repeated[2] * signs, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(weighted[1], repeated[1][:100] * signs, rtol=1e-4, atol=1e-4)
    assert not np.allclose(np.abs(weighted[2]), np.abs(screen.principal_axes(pool, 4)[2]), atol=1e-2)
