"""Bootstrap confidence intervals, computed for all resamples at once.

A bootstrap resample is represented by how many times each sample is drawn (a row of counts), so a
metric of the resample is a *weighted* metric of the original samples. Patients are resampled as
wholes: every slide of a drawn patient is drawn with it (a cluster bootstrap), so slide-level
intervals are not made too narrow by correlated slides.

The weighted metrics here equal scikit-learn's and scikit-survival's on the materialised resample
(``tests/test_metrics.py`` checks this); they exist only because they are hundreds of times faster.
"""

from __future__ import annotations

import math

import numpy as np


def bootstrap_counts(groups: np.ndarray, n_boot: int, seed: int = 0) -> np.ndarray:
    """(n_boot, N) draw counts of each sample, resampling the groups (patients) with replacement.

    Args:
        groups: (N,) group code of each sample (e.g. its patient).
        n_boot: number of resamples.
        seed: random seed.
    """
    _, codes = np.unique(np.asarray(groups), return_inverse=True)
    n_groups = int(codes.max()) + 1 if codes.size else 0
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_groups, size=(n_boot, n_groups))
    per_group = np.zeros((n_boot, n_groups), np.float64)
    rows = np.repeat(np.arange(n_boot), n_groups)
    np.add.at(per_group, (rows, draws.ravel()), 1.0)
    return per_group[:, codes]


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the finite resampled values; (nan, nan) when fewer than 10 are finite."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size < 10:
        return math.nan, math.nan
    lo, hi = np.quantile(v, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def weighted_binary_auc(positive: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(B,) AUC of ``score`` for ``positive`` under each row of (B, N) ``weights`` (ties count ½)."""
    positive = np.asarray(positive, bool)
    order = np.argsort(score, kind="mergesort")
    s = np.asarray(score)[order]
    w = weights[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    wp = np.add.reduceat(w * positive[order], starts, axis=1)
    wn = np.add.reduceat(w * ~positive[order], starts, axis=1)
    below = np.cumsum(wn, axis=1) - wn
    num = (wp * (below + 0.5 * wn)).sum(axis=1)
    den = wp.sum(axis=1) * wn.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def weighted_classification(y: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """(B,) auc, balanced_accuracy, accuracy and f1 (as :func:`~.metrics.classification_metrics`)."""
    y = np.asarray(y, np.int64)
    probs = np.asarray(probs, np.float64)
    k = probs.shape[1]
    pred = probs.argmax(axis=1)
    cell = np.zeros((y.size, k * k))
    cell[np.arange(y.size), y * k + pred] = 1.0
    cm = (weights @ cell).reshape(-1, k, k)          # (B, true, pred)
    total = cm.sum(axis=(1, 2))
    tp = np.einsum("bkk->bk", cm)
    true_n = cm.sum(axis=2)
    pred_n = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = tp.sum(axis=1) / total
        recall = np.where(true_n > 0, tp / true_n, np.nan)
        bal = np.nanmean(np.where(true_n > 0, recall, np.nan), axis=1)
        used = (true_n > 0) | (pred_n > 0)
        f1_k = np.where(used, 2 * tp / np.maximum(true_n + pred_n, 1e-300), np.nan)
        f1 = np.nanmean(f1_k, axis=1)
    present = true_n > 0
    if k == 2:
        auc = weighted_binary_auc(y == 1, probs[:, 1], weights)
    else:
        per_class = np.stack([weighted_binary_auc(y == c, probs[:, c], weights) for c in range(k)], axis=1)
        per_class = np.where(present, per_class, np.nan)
        with np.errstate(invalid="ignore"):
            auc = np.nanmean(per_class, axis=1)
    auc = np.where(present.sum(axis=1) >= 2, auc, np.nan)
    return {"auc": auc, "balanced_accuracy": bal, "accuracy": acc, "f1": f1}


def weighted_c_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray, weights: np.ndarray,
                     tied_tol: float = 1e-8, chunk: int = 2048) -> np.ndarray:
    """(B,) Harrell's C-index under each row of (B, N) ``weights``.

    Pairs are those of ``sksurv.metrics.concordance_index_censored``: i had the event, and j was
    followed longer (or censored at the same time); the pair is concordant when risk_i > risk_j and
    counts ½ when the risks tie within ``tied_tol``.
    """
    time = np.asarray(time, np.float64)
    event = np.asarray(event).astype(bool)
    risk = np.asarray(risk, np.float64)
    num = np.zeros(weights.shape[0])
    den = np.zeros(weights.shape[0])
    events = np.flatnonzero(event)
    for start in range(0, events.size, chunk):
        i = events[start:start + chunk]
        comparable = (time[None, :] > time[i, None]) | ((time[None, :] == time[i, None]) & ~event[None, :])
        diff = risk[i, None] - risk[None, :]
        score = np.where(np.abs(diff) <= tied_tol, 0.5, (diff > 0).astype(np.float64)) * comparable
        wi = weights[:, i]                              # (B, n_i)
        num += np.einsum("bi,bi->b", wi, weights @ score.T)
        den += np.einsum("bi,bi->b", wi, weights @ comparable.T.astype(np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)
