"""Classification and survival metrics, computed with scikit-learn and scikit-survival.

Every function returns a flat dict of floats (NaN where a metric is not defined for the data, e.g. an
AUC with one class present), plus a ``notes`` list saying why a metric is missing.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

CLASSIFICATION_METRICS = ("auc", "balanced_accuracy", "accuracy", "f1")
SURVIVAL_METRICS = ("c_index", "c_index_ipcw", "td_auc", "ibs")


def auc_score(y: np.ndarray, probs: np.ndarray) -> float:
    """Binary AUC of the class-1 probability; macro one-vs-rest AUC for more classes.

    With more than two classes, classes that are absent from ``y`` (or are its only class) are left out
    of the macro average; with every class present this equals
    ``roc_auc_score(y, probs, multi_class="ovr", average="macro")``.
    NaN when fewer than two classes are present.

    >>> auc_score(np.array([0, 0, 1, 1]), np.array([[0.9, 0.1], [0.6, 0.4], [0.65, 0.35], [0.2, 0.8]]))
    0.75
    """
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y, np.int64)
    probs = np.asarray(probs, np.float64)
    k = probs.shape[1]
    present = np.unique(y)
    if present.size < 2:
        return math.nan
    if k == 2:
        return float(roc_auc_score(y, probs[:, 1]))
    if present.size == k:
        # sklearn wants rows that sum to 1 exactly up to its tolerance; softmax in float32 may not.
        return float(roc_auc_score(y, probs / probs.sum(axis=1, keepdims=True), multi_class="ovr",
                                   average="macro", labels=list(range(k))))
    return float(np.mean([roc_auc_score(y == c, probs[:, c]) for c in present]))


def classification_metrics(y: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """Metrics of class probabilities against true class indices.

    Args:
        y: (N,) int true class index.
        probs: (N, K) predicted class probabilities (rows sum to 1).

    Returns:
        auc, balanced_accuracy, accuracy, f1 (macro over the classes in ``y`` or the predictions, as
        scikit-learn does), n, confusion ((K, K) list, rows = true class, columns = predicted), notes.
    """
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score

    y = np.asarray(y, np.int64)
    probs = np.asarray(probs, np.float64)
    k = probs.shape[1]
    pred = probs.argmax(axis=1)
    notes = []
    if np.unique(y).size < 2:
        notes.append("AUC undefined: only one class present")
    elif k > 2 and np.unique(y).size < k:
        notes.append(f"AUC macro over the {np.unique(y).size} of {k} classes present")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns about classes absent from y_pred
        out: dict[str, Any] = {
            "auc": auc_score(y, probs),
            "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
            "accuracy": float(accuracy_score(y, pred)),
            "f1": float(f1_score(y, pred, average="macro")),
        }
        out["confusion"] = confusion_matrix(y, pred, labels=list(range(k))).tolist()
    out["n"] = int(y.size)
    out["notes"] = notes
    return out


def _surv_array(time: np.ndarray, event: np.ndarray) -> np.ndarray:
    from sksurv.util import Surv

    return Surv.from_arrays(event=np.asarray(event).astype(bool), time=np.asarray(time, np.float64))


def survival_function_at(surv: np.ndarray, bin_ends: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Survival probabilities at ``times`` from discrete-time survival ``S_k``.

    ``S_k`` is the probability of surviving past interval k, whose end is ``bin_ends[k]``; S(0) = 1.
    Between interval ends S(t) is interpolated linearly; after the last end it stays at ``S_{K−1}``.

    Args:
        surv: (N, K) S_k per patient.
        bin_ends: (K,) increasing end time of each interval, or (N, K) when patients come from models
            with different intervals (e.g. pooled cross-validation folds).
        times: (T,) where to evaluate.

    Returns:
        (N, T) S(t).
    """
    surv = np.asarray(surv, np.float64)
    ends = np.broadcast_to(np.asarray(bin_ends, np.float64), surv.shape)
    out = np.empty((surv.shape[0], len(times)))
    for i, row in enumerate(surv):
        out[i] = np.interp(times, np.r_[0.0, ends[i]], np.r_[1.0, row])
    return out


def survival_metrics(time: np.ndarray, event: np.ndarray, risk: np.ndarray, *, surv: np.ndarray | None = None,
                     bin_ends: np.ndarray | None = None, train_time: np.ndarray | None = None,
                     train_event: np.ndarray | None = None) -> dict[str, Any]:
    """Survival metrics of a risk score (higher = earlier event).

    Args:
        time, event: (N,) observed time and event flag (1 = event) of the evaluated patients.
        risk: (N,) predicted risk.
        surv: (N, K) discrete survival ``S_k`` (for the integrated Brier score).
        bin_ends: (K,) end time of each interval (for the integrated Brier score).
        train_time, train_event: the training partition, one entry per patient. It alone gives the
            censoring distribution of the IPCW C-index, the time-dependent AUC and the Brier score (as
            scikit-survival intends), and its last event time τ truncates them: an evaluated patient
            followed past τ counts as censored at τ, which changes none of the three at times before τ.

    Returns:
        c_index (Harrell's, ``concordance_index_censored``), c_index_ipcw (Uno's, truncated at the
        largest training time), td_auc (mean cumulative/dynamic AUC at the 25/50/75 % quantiles of the
        event times), ibs (integrated Brier score over the 10–90 % range of event times), n, events,
        notes. Metrics the data do not allow are NaN with a note.
    """
    from sksurv.metrics import (
        concordance_index_censored,
        concordance_index_ipcw,
        cumulative_dynamic_auc,
        integrated_brier_score,
    )

    time = np.asarray(time, np.float64)
    event = np.asarray(event).astype(bool)
    risk = np.asarray(risk, np.float64)
    notes: list[str] = []
    out: dict[str, Any] = {"n": int(time.size), "events": int(event.sum())}
    out.update(dict.fromkeys(SURVIVAL_METRICS, math.nan))
    if event.sum() == 0:
        notes.append("C-index undefined: no event")
        out["notes"] = notes
        return out
    try:
        out["c_index"] = float(concordance_index_censored(event, time, risk)[0])
    except (ValueError, ZeroDivisionError) as exc:
        notes.append(f"C-index undefined: {exc}")
    if train_time is None or train_event is None:
        notes.append("IPCW C-index, time-dependent AUC and Brier score need the training partition")
        out["notes"] = notes
        return out
    train_time = np.asarray(train_time, np.float64)
    train_event = np.asarray(train_event).astype(bool)
    if not train_event.any():
        notes.append("IPCW C-index, time-dependent AUC and Brier score need an event in the training partition")
        out["notes"] = notes
        return out
    # The censoring distribution comes from the training patients only. Their last event time τ bounds
    # where it is positive, so evaluated follow-up past τ is cut there (scikit-survival refuses times past
    # the training follow-up); every evaluation time below lies before τ.
    t_max = float(train_time[train_event].max())
    y_train = _surv_array(train_time, train_event)
    y_test = _surv_array(np.minimum(time, t_max), event & (time <= t_max))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out["c_index_ipcw"] = float(concordance_index_ipcw(y_train, y_test, risk, tau=t_max)[0])
        except (ValueError, ZeroDivisionError) as exc:
            notes.append(f"IPCW C-index undefined: {exc}")
        # Evaluation times must lie inside the test follow-up and where the censoring estimate is > 0.
        lo, hi = time.min(), min(time.max(), t_max)
        ev_t = time[event & (time > lo) & (time < hi)]
        if ev_t.size >= 3:
            times = np.unique(np.quantile(ev_t, [0.25, 0.5, 0.75]))
            try:
                out["td_auc"] = float(cumulative_dynamic_auc(y_train, y_test, risk, times)[1])
            except (ValueError, ZeroDivisionError) as exc:
                notes.append(f"time-dependent AUC undefined: {exc}")
            if surv is not None and bin_ends is not None:
                grid = np.unique(np.quantile(ev_t, np.linspace(0.1, 0.9, 9)))
                if grid.size >= 2:
                    try:
                        est = survival_function_at(surv, bin_ends, grid)
                        out["ibs"] = float(integrated_brier_score(y_train, y_test, est, grid))
                    except (ValueError, ZeroDivisionError) as exc:
                        notes.append(f"integrated Brier score undefined: {exc}")
        else:
            notes.append("time-dependent AUC and Brier score need at least 3 events inside the follow-up")
    out["notes"] = notes
    return out
