"""Figures of the report (matplotlib, drawn off-screen) returned as PNG bytes.

Each function takes per-model prediction tables (pandas DataFrames as written by training, already
reduced to the rows to plot) and returns the PNG of one figure.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def _figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (5.0, 4.2)):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
    return fig, axes


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")  # keeps text drawn outside the axes
    plt.close(fig)
    return buf.getvalue()


def _probs(df) -> np.ndarray:
    cols = sorted((c for c in df.columns if c.startswith("prob_")), key=lambda c: int(c.split("_")[1]))
    return df[cols].to_numpy(np.float64)


def _one_vs_rest(name: str, df, classes: Sequence[str], binary: bool) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(label, positive (N,) bool, score (N,)) per curve: the second class of a binary task, else each class
    against the rest; classes all or none of the patients have are left out (no curve exists)."""
    y, p = df["target"].to_numpy(), _probs(df)
    pairs = [(name, y == 1, p[:, 1])] if binary else [(c, y == k, p[:, k]) for k, c in enumerate(classes)]
    return [(label, pos, score) for label, pos, score in pairs if pos.any() and not pos.all()]


def roc_figure(tables: Mapping[str, Any], classes: Mapping[str, Sequence[str]]) -> bytes:
    """ROC curves of each model's pooled test predictions.

    Binary tasks share one panel (one curve per model); with more classes each model gets a panel with
    its one-vs-rest curve per class.
    """
    from sklearn.metrics import auc, roc_curve

    binary = all(len(c) == 2 for c in classes.values())
    names = list(tables)
    fig, axes = _figure(1 if binary else len(names))
    for i, name in enumerate(names):
        ax = axes[0, 0 if binary else i]
        for j, (label, pos, score) in enumerate(_one_vs_rest(name, tables[name], classes[name], binary)):
            fpr, tpr, _ = roc_curve(pos, score)
            colour = _COLOURS[(i if binary else j) % len(_COLOURS)]
            ax.plot(fpr, tpr, color=colour, lw=1.8, label=f"{label} (AUC {auc(fpr, tpr):.3f})")
        ax.plot([0, 1], [0, 1], color="#999999", lw=0.8, ls="--")
        ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01),
               title="ROC, pooled folds" if binary else f"{name}: one-vs-rest ROC")
        ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def confusion_figure(matrices: Mapping[str, np.ndarray], classes: Mapping[str, Sequence[str]]) -> bytes:
    """One confusion matrix (rows true, columns predicted; counts, shaded by row fraction) per model."""
    names = list(matrices)
    fig, axes = _figure(len(names), size=(4.2, 3.9))
    for i, name in enumerate(names):
        ax = axes[0, i]
        cm = np.asarray(matrices[name], np.float64)
        frac = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
        labels = list(classes[name])
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        for r in range(cm.shape[0]):
            for c in range(cm.shape[1]):
                ax.text(c, r, f"{int(cm[r, c])}", ha="center", va="center",
                        color="white" if frac[r, c] > 0.6 else "black", fontsize=9)
        ax.set(xlabel="predicted", ylabel="true", title=name)
    return _png(fig)


def km_figure(tables: Mapping[str, Any]) -> tuple[bytes, dict[str, float]]:
    """Kaplan–Meier curves of predicted low- and high-risk groups, with the log-rank p-value per model.

    Each patient's group is set within its own fold: above that fold's median test risk is high risk
    (risks of different folds come from different models and are not compared with each other).

    Returns:
        The PNG, and model name → log-rank p-value.
    """
    from sksurv.compare import compare_survival
    from sksurv.nonparametric import kaplan_meier_estimator
    from sksurv.util import Surv

    names = list(tables)
    fig, axes = _figure(len(names), size=(5.0, 5.0))
    pvalues: dict[str, float] = {}
    for i, name in enumerate(names):
        ax = axes[0, i]
        df = tables[name]
        high = risk_groups(df)
        t = df["time"].to_numpy(np.float64)
        e = df["event"].to_numpy().astype(bool)
        for flag, label, colour in ((False, "low risk", _COLOURS[0]), (True, "high risk", _COLOURS[1])):
            sel = high == flag
            if sel.sum() == 0:
                continue
            x, s = kaplan_meier_estimator(e[sel], t[sel])
            ax.step(np.r_[0, x], np.r_[1, s], where="post", color=colour, lw=1.8, label=f"{label} (n={sel.sum()})")
        ticks = at_risk_times(t)
        ax.set_xticks(ticks)
        ax.set_xlim(0, ticks[-1] * 1.02 if ticks[-1] > 0 else 1)
        _at_risk_rows(ax, ticks, at_risk_table(t, high, ticks))
        p = float("nan")
        if 0 < high.sum() < len(high) and e.any():
            try:
                _, p = compare_survival(Surv.from_arrays(e, t), high.astype(int))
            except ValueError:
                pass
        pvalues[name] = float(p)
        ax.set(xlabel="time", ylabel="survival probability", ylim=(0, 1.02),
               title=f"{name}: log-rank p = {p:.3g}")
        ax.legend(loc="lower left", fontsize=8)
    return _png(fig), pvalues


def risk_groups(df: Any) -> np.ndarray:
    """(N,) True for patients above their own fold's median predicted risk (risks of different folds come
    from different models and are not compared with each other)."""
    high = np.zeros(len(df), bool)
    risk = df["risk"].to_numpy()
    for idx in df.groupby("fold").groups.values():
        pos = df.index.get_indexer(idx)
        high[pos] = risk[pos] > np.median(risk[pos])
    return high


def at_risk_times(time: np.ndarray, n: int = 5) -> np.ndarray:
    """``n`` evenly spaced times from 0 to the longest follow-up, rounded to a readable step."""
    t_max = float(np.max(time)) if len(time) else 1.0
    step = float(np.format_float_positional(t_max / (n - 1), precision=1, fractional=False)) or t_max / (n - 1)
    return np.arange(n) * step if step * (n - 1) <= t_max * 1.05 else np.linspace(0, t_max, n)


def at_risk_table(time: np.ndarray, high: np.ndarray, ticks: np.ndarray) -> dict[str, list[int]]:
    """Patients still at risk (follow-up ≥ t) at each tick, per predicted risk group.

    Args:
        time: (N,) observed times. high: (N,) bool risk group. ticks: (T,) times.

    Returns:
        ``{"low risk": [T counts], "high risk": [T counts]}``.
    """
    time = np.asarray(time, np.float64)
    return {label: [int(((time >= t) & (np.asarray(high) == flag)).sum()) for t in ticks]
            for flag, label in ((False, "low risk"), (True, "high risk"))}


def _at_risk_rows(ax, ticks: np.ndarray, table: dict[str, list[int]]) -> None:
    """The at-risk numbers under the axis, one row per group, aligned with the x ticks."""
    import matplotlib.transforms as mtransforms

    trans = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)
    ax.text(0.0, -0.2, "number at risk", transform=ax.transAxes, ha="left", va="center", fontsize=7,
            color="#555555")
    for row, (label, colour) in enumerate((("low risk", _COLOURS[0]), ("high risk", _COLOURS[1]))):
        y = -0.27 - 0.07 * row
        ax.text(-0.04, y, label.split()[0], transform=ax.transAxes, ha="right", va="center", fontsize=7,
                color=colour)
        for t, count in zip(ticks, table[label]):
            ax.text(t, y, str(count), transform=trans, ha="center", va="center", fontsize=8, color=colour)


def calibration_bins(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reliability curve on quantile bins of the predicted probability.

    Args:
        y: (N,) 1 where the event (class) happened. p: (N,) predicted probability. n_bins: at most this
            many bins, each with at least 5 patients.

    Returns:
        (mean predicted, observed fraction, count) per bin.
    """
    y = np.asarray(y, np.float64)
    p = np.asarray(p, np.float64)
    k = int(max(1, min(n_bins, len(p) // 5)))
    order = np.argsort(p, kind="mergesort")
    chunks = [c for c in np.array_split(order, k) if len(c)]
    return (np.array([p[c].mean() for c in chunks]), np.array([y[c].mean() for c in chunks]),
            np.array([len(c) for c in chunks]))


def expected_calibration_error(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> float:
    """Count-weighted mean |observed − predicted| over :func:`calibration_bins`."""
    pred, obs, n = calibration_bins(y, p, n_bins)
    return float(np.sum(n * np.abs(obs - pred)) / max(1, n.sum()))


def _calibration_points(df, binary: bool) -> tuple[np.ndarray, np.ndarray]:
    """(outcome, probability): P(class 1) for binary tasks, else the confidence of the predicted class."""
    p = _probs(df)
    y = df["target"].to_numpy()
    if binary:
        return (y == 1).astype(float), p[:, 1]
    pred = p.argmax(axis=1)
    return (y == pred).astype(float), p.max(axis=1)


def calibration_figure(tables: Mapping[str, Any], classes: Mapping[str, Sequence[str]]) -> bytes:
    """Reliability diagrams: observed frequency against predicted probability on quantile bins, one curve
    per model (binary: P(class 1); more classes: the confidence of the predicted class against accuracy)."""
    fig, axes = _figure(1, size=(5.5, 4.6))
    ax = axes[0, 0]
    binary = all(len(c) == 2 for c in classes.values())
    for i, (name, df) in enumerate(tables.items()):
        y, p = _calibration_points(df, binary)
        pred, obs, _ = calibration_bins(y, p)
        ece = expected_calibration_error(y, p)
        ax.plot(pred, obs, marker="o", ms=4, lw=1.5, color=_COLOURS[i % len(_COLOURS)],
                label=f"{name} (ECE {ece:.3f})")
    ax.plot([0, 1], [0, 1], color="#999999", lw=0.8, ls="--")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="predicted probability" if binary else "confidence",
           ylabel="observed frequency" if binary else "accuracy", title="calibration")
    ax.legend(loc="upper left", fontsize=8)
    return _png(fig)


def pr_figure(tables: Mapping[str, Any], classes: Mapping[str, Sequence[str]]) -> bytes:
    """Precision–recall curves (binary: the positive class, one curve per model; more classes: one panel
    per model, one-vs-rest per class), each with its average precision and its chance level (prevalence)."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    binary = all(len(c) == 2 for c in classes.values())
    names = list(tables)
    fig, axes = _figure(1 if binary else len(names))
    for i, name in enumerate(names):
        ax = axes[0, 0 if binary else i]
        for j, (label, pos, score) in enumerate(_one_vs_rest(name, tables[name], classes[name], binary)):
            precision, recall, _ = precision_recall_curve(pos, score)
            colour = _COLOURS[(i if binary else j) % len(_COLOURS)]
            ax.step(recall, precision, where="post", color=colour, lw=1.6,
                    label=f"{label} (AP {average_precision_score(pos, score):.3f}, prevalence {pos.mean():.2f})")
            ax.axhline(pos.mean(), color=colour, lw=0.7, ls=":")
        ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
               title="precision–recall (dotted: chance)" if binary else f"{name}: one-vs-rest precision–recall")
        ax.legend(loc="lower left", fontsize=7)
    return _png(fig)


def survival_calibration_figure(tables: Mapping[str, Any], horizon: float, n_groups: int = 3) -> bytes:
    """Predicted against observed survival at ``horizon``: patients in groups of predicted S(horizon)
    (within each fold), the mean prediction against the group's Kaplan–Meier estimate.

    Each table needs ``time``, ``event``, ``fold`` and ``pred_surv`` (the patient's predicted S(horizon)).
    """
    from sksurv.nonparametric import kaplan_meier_estimator

    fig, axes = _figure(1, size=(5.5, 4.6))
    ax = axes[0, 0]
    for i, (name, df) in enumerate(tables.items()):
        group = np.zeros(len(df), np.int64)
        pred = df["pred_surv"].to_numpy(np.float64)
        for idx in df.groupby("fold").groups.values():
            pos = df.index.get_indexer(idx)
            order = np.argsort(pred[pos], kind="mergesort")
            for g, chunk in enumerate(np.array_split(order, n_groups)):
                group[pos[chunk]] = g
        t, e = df["time"].to_numpy(np.float64), df["event"].to_numpy().astype(bool)
        xs, ys = [], []
        for g in range(n_groups):
            sel = group == g
            if sel.sum() < 2:
                continue
            x, s = kaplan_meier_estimator(e[sel], t[sel])
            ys.append(float(s[x <= horizon][-1]) if (x <= horizon).any() else 1.0)
            xs.append(float(pred[sel].mean()))
        ax.plot(xs, ys, marker="o", ms=5, lw=1.5, color=_COLOURS[i % len(_COLOURS)], label=name)
    ax.plot([0, 1], [0, 1], color="#999999", lw=0.8, ls="--")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel=f"predicted survival at t = {horizon:.3g}",
           ylabel="observed (Kaplan–Meier)", title=f"calibration at t = {horizon:.3g}")
    ax.legend(loc="upper left", fontsize=8)
    return _png(fig)


def _fold_curves(loss_ax, metric_ax, log, col: str, colour: str, label: str, bad: bool,
                 others: Sequence[Any]) -> None:
    """One fold's lines in both panels of :func:`training_curves_figure`."""
    loss_ax.plot(log["epoch"], log["train_loss"], color=colour, lw=1.4, label=label)
    loss_ax.plot(log["epoch"], log["val_loss"], color=colour, lw=1.0, ls="--")
    if col not in log:
        return
    metric_ax.plot(log["epoch"], log[col], color=colour, lw=1.4, ls="--" if bad else "-", label=label)
    for other in others:
        if col in other:
            metric_ax.plot(other["epoch"], other[col], color=colour, lw=0.6, alpha=0.5)
    chosen = log[log["selected"].astype(bool)]["epoch"]
    if len(chosen):  # the last epoch that improved on validation is the one kept
        epoch = int(chosen.iloc[-1])
        metric_ax.plot([epoch], log.loc[log["epoch"] == epoch, col], marker="o", color=colour, ms=6)


def training_curves_figure(logs: Mapping[str, Mapping[int, Any]], metric: Mapping[str, str],
                           failed: Mapping[str, Sequence[int]],
                           other_restarts: Mapping[str, Mapping[int, Sequence[Any]]] | None = None) -> bytes:
    """Per model (one row) and fold (one colour): training and validation loss by epoch (left), and the
    validation metric by epoch (right), with the epoch chosen on validation marked.

    Args:
        logs: model → fold → its ``log.csv`` (DataFrame).
        metric: model → the log column of the right panel (e.g. ``val_auc``).
        failed: model → folds counted as failed (drawn dashed, named in the legend).
        other_restarts: model → fold → the logs of the restarts validation did not choose (thin lines).
    """
    from matplotlib.ticker import MaxNLocator

    other_restarts = other_restarts or {}
    names = list(logs)
    fig, axes = _figure(2, len(names), size=(5.2, 3.6))
    for row, name in enumerate(names):
        loss_ax, metric_ax = axes[row, 0], axes[row, 1]
        col = metric[name]
        for j, (fold, log) in enumerate(sorted(logs[name].items())):
            bad = fold in failed.get(name, ())
            _fold_curves(loss_ax, metric_ax, log, col, _COLOURS[j % len(_COLOURS)],
                         f"fold {fold}" + (" (failed)" if bad else ""), bad, other_restarts.get(name, {}).get(fold, ()))
        for ax in (loss_ax, metric_ax):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend(fontsize=7)
        loss_ax.set(xlabel="epoch", ylabel="loss", title=f"{name}: loss (solid training, dashed validation)")
        metric_ax.axhline(0.5, color="#999999", lw=0.8, ls=":")
        # The training log scores validation per slide, as the checkpoint choice does.
        metric_ax.set(xlabel="epoch", ylabel=f"{col.replace('_', ' ')} (per slide)",
                      title=f"{name}: {col.replace('_', ' ')} (dot: chosen epoch)")
    return _png(fig)
