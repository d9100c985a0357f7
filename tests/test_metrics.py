"""Every metric against scikit-learn / scikit-survival on known inputs, and the fast bootstrap against
the same libraries on materialised resamples."""

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, roc_auc_score
from sksurv.datasets import load_veterans_lung_cancer
from sksurv.metrics import (
    concordance_index_censored,
    concordance_index_ipcw,
    cumulative_dynamic_auc,
    integrated_brier_score,
)
from sksurv.util import Surv

from wsi2dmamba.evaluation.bootstrap import (
    bootstrap_counts,
    percentile_interval,
    weighted_c_index,
    weighted_classification,
)
from wsi2dmamba.evaluation.metrics import classification_metrics, survival_function_at, survival_metrics


def _probs(rng, n, k):
    z = rng.normal(size=(n, k))
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def test_binary_metrics_equal_sklearn():
    y = np.array([0, 0, 1, 1, 1, 0, 1, 0])
    p1 = np.array([0.1, 0.4, 0.35, 0.8, 0.7, 0.6, 0.9, 0.2])
    probs = np.stack([1 - p1, p1], axis=1)
    m = classification_metrics(y, probs)
    pred = (p1 > 0.5).astype(int)
    assert m["auc"] == pytest.approx(roc_auc_score(y, p1)) and m["auc"] == pytest.approx(14 / 16)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred)) == 0.75
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["confusion"] == confusion_matrix(y, pred).tolist() == [[3, 1], [1, 3]]


def test_multiclass_metrics_equal_sklearn_macro_ovr():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, size=60)
    probs = _probs(rng, 60, 4)
    probs[np.arange(60), y] += 0.3  # some skill
    probs /= probs.sum(axis=1, keepdims=True)
    m = classification_metrics(y, probs)
    pred = probs.argmax(axis=1)
    assert m["auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert np.array_equal(m["confusion"], confusion_matrix(y, pred, labels=[0, 1, 2, 3]))


def test_auc_with_absent_classes():
    y = np.array([0, 0, 1, 1, 0, 1])
    probs = _probs(np.random.default_rng(1), 6, 3)
    m = classification_metrics(y, probs)  # class 2 absent: macro over classes 0 and 1
    expected = np.mean([roc_auc_score(y == 0, probs[:, 0]), roc_auc_score(y == 1, probs[:, 1])])
    assert m["auc"] == pytest.approx(expected) and m["notes"]
    assert math.isnan(classification_metrics(np.zeros(4, int), _probs(np.random.default_rng(2), 4, 2))["auc"])


@pytest.fixture(scope="module")
def veterans():
    x, y = load_veterans_lung_cancer()
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(y))
    train, test = idx[:90], idx[90:]
    t = y["Survival_in_days"].astype(float)
    e = y["Status"].astype(bool)
    risk = -x["Karnofsky_score"].to_numpy(float) + rng.normal(0, 5, len(y))
    return t, e, risk, train, test


def test_survival_metrics_equal_scikit_survival(veterans):
    t, e, risk, train, test = veterans
    n_bins = 4
    ends = np.array([50.0, 120.0, 250.0, t[train].max()])
    surv = np.cumprod(1 - 1 / (1 + np.exp(-(risk[test, None] / 40 + np.arange(n_bins) * 0.1))), axis=1)
    m = survival_metrics(t[test], e[test], risk[test], surv=surv, bin_ends=ends, train_time=t[train],
                         train_event=e[train])
    tau = t[train][e[train]].max()
    # The censoring distribution of the training patients alone; evaluated follow-up cut at τ.
    y_tr = Surv.from_arrays(e[train], t[train])
    y_te = Surv.from_arrays(e[test] & (t[test] <= tau), np.minimum(t[test], tau))
    assert m["c_index"] == pytest.approx(concordance_index_censored(e[test], t[test], risk[test])[0])
    assert m["c_index_ipcw"] == pytest.approx(concordance_index_ipcw(y_tr, y_te, risk[test], tau=tau)[0])
    tt, ee = t[test], e[test]
    ev = tt[ee & (tt > tt.min()) & (tt < min(tt.max(), tau))]
    times = np.unique(np.quantile(ev, [0.25, 0.5, 0.75]))
    assert m["td_auc"] == pytest.approx(cumulative_dynamic_auc(y_tr, y_te, risk[test], times)[1])
    grid = np.unique(np.quantile(ev, np.linspace(0.1, 0.9, 9)))
    est = survival_function_at(surv, ends, grid)
    assert m["ibs"] == pytest.approx(integrated_brier_score(y_tr, y_te, est, grid))
    assert 0.5 < m["c_index"] < 1 and 0 < m["ibs"] < 0.5 and m["events"] == int(e[test].sum())


def test_censoring_is_estimated_from_training_patients_only(veterans):
    t, e, risk, train, test = veterans
    t, e = t.copy(), e.copy()
    # Evaluated patients censored far more often than training ones: an estimate that mixed them in
    # would weight the events very differently.
    e[test[::2]] = False
    m = survival_metrics(t[test], e[test], risk[test], train_time=t[train], train_event=e[train])
    tau = t[train][e[train]].max()
    y_tr = Surv.from_arrays(e[train], t[train])
    y_te = Surv.from_arrays(e[test] & (t[test] <= tau), np.minimum(t[test], tau))
    assert m["c_index_ipcw"] == pytest.approx(concordance_index_ipcw(y_tr, y_te, risk[test], tau=tau)[0])
    both = np.r_[train, test]
    mixed = concordance_index_ipcw(Surv.from_arrays(e[both], t[both]), Surv.from_arrays(e[test], t[test]),
                                   risk[test], tau=tau)[0]
    assert abs(m["c_index_ipcw"] - mixed) > 1e-4
    # Only the training patients' censoring matters: censoring more of them changes the weights …
    e2 = e.copy()
    e2[train[::3]] = False
    m2 = survival_metrics(t[test], e[test], risk[test], train_time=t[train], train_event=e2[train])
    assert m2["c_index_ipcw"] != pytest.approx(m["c_index_ipcw"], abs=1e-6)
    # … and evaluated follow-up past the training follow-up is accepted (cut at τ, not refused).
    far = t[test].copy()
    far[0] = t[train].max() * 3
    m3 = survival_metrics(far, e[test], risk[test], train_time=t[train], train_event=e[train])
    assert math.isfinite(m3["c_index_ipcw"]) and math.isfinite(m3["td_auc"])


def test_survival_metrics_without_events_or_training_data():
    m = survival_metrics(np.array([1.0, 2.0, 3.0]), np.zeros(3), np.array([0.1, 0.2, 0.3]))
    assert math.isnan(m["c_index"]) and "no event" in m["notes"][0]
    m = survival_metrics(np.array([1.0, 2.0, 3.0]), np.array([1, 1, 0]), np.array([0.3, 0.2, 0.1]))
    assert m["c_index"] == 1.0 and math.isnan(m["c_index_ipcw"])


def test_discrete_survival_function_interpolates_between_interval_ends():
    surv = np.array([[0.8, 0.5, 0.2]])
    ends = np.array([10.0, 20.0, 40.0])
    got = survival_function_at(surv, ends, np.array([0.0, 5.0, 10.0, 15.0, 30.0, 40.0, 100.0]))
    assert got[0].tolist() == pytest.approx([1.0, 0.9, 0.8, 0.65, 0.35, 0.2, 0.2])
    two = survival_function_at(np.array([[0.8, 0.5, 0.2], [0.5, 0.5, 0.5]]),
                               np.array([[10.0, 20.0, 40.0], [20.0, 30.0, 50.0]]), np.array([10.0]))
    assert two[:, 0].tolist() == pytest.approx([0.8, 0.75])


def _materialise(counts_row):
    return np.repeat(np.arange(counts_row.size), counts_row.astype(int))


@pytest.mark.parametrize("k", [2, 3])
def test_weighted_classification_equals_sklearn_on_each_resample(k):
    rng = np.random.default_rng(k)
    n = 40
    y = rng.integers(0, k, size=n)
    probs = _probs(rng, n, k)
    probs[:5] = probs[5:10]  # tied scores
    groups = np.repeat(np.arange(20), 2)  # two slides per patient
    counts = bootstrap_counts(groups, 6, seed=1)
    assert counts.sum(axis=1).tolist() == [n] * 6
    assert np.all(counts[:, ::2] == counts[:, 1::2])  # a patient's slides are drawn together
    reps = weighted_classification(y, probs, counts)
    for b in range(6):
        idx = _materialise(counts[b])
        yb, pb = y[idx], probs[idx]
        pred = pb.argmax(axis=1)
        assert reps["accuracy"][b] == pytest.approx(accuracy_score(yb, pred))
        assert reps["balanced_accuracy"][b] == pytest.approx(balanced_accuracy_score(yb, pred))
        assert reps["f1"][b] == pytest.approx(f1_score(yb, pred, average="macro"))
        if np.unique(yb).size == k:
            expected = roc_auc_score(yb, pb[:, 1]) if k == 2 else roc_auc_score(yb, pb, multi_class="ovr")
            assert reps["auc"][b] == pytest.approx(expected)


def test_weighted_c_index_equals_scikit_survival_on_each_resample(veterans):
    t, e, risk, _, _ = veterans
    t = np.round(t / 20) * 20  # tied times
    r = np.round(risk / 10)    # tied risks
    counts = bootstrap_counts(np.arange(t.size), 5, seed=0)
    reps = weighted_c_index(t, e, r, counts, chunk=16)
    for b in range(5):
        idx = _materialise(counts[b])
        assert reps[b] == pytest.approx(concordance_index_censored(e[idx], t[idx], r[idx])[0], rel=1e-12)


def test_percentile_interval():
    v = np.r_[np.arange(1000) / 999.0, np.nan]
    lo, hi = percentile_interval(v)
    assert lo == pytest.approx(0.025, abs=1e-3) and hi == pytest.approx(0.975, abs=1e-3)
    assert all(math.isnan(x) for x in percentile_interval(np.array([0.5, np.nan])))


def test_calibration_bins_and_error():
    from wsi2dmamba.evaluation.plots import calibration_bins, expected_calibration_error

    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 20000)
    y = rng.uniform(0, 1, p.size) < p                     # calibrated by construction
    pred, obs, n = calibration_bins(y, p)
    assert n.sum() == p.size and len(n) == 10 and np.all(np.diff(pred) > 0)
    assert np.abs(obs - pred).max() < 0.03 and expected_calibration_error(y, p) < 0.02
    assert expected_calibration_error(np.ones(50), np.full(50, 0.2)) == pytest.approx(0.8)
    assert len(calibration_bins(np.ones(12), np.linspace(0, 1, 12))[0]) == 2  # at least 5 patients a bin
