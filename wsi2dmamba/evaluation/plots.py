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
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _probs(df) -> np.ndarray:
    cols = sorted((c for c in df.columns if c.startswith("prob_")), key=lambda c: int(c.split("_")[1]))
    return df[cols].to_numpy(np.float64)


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
        df = tables[name]
        y = df["target"].to_numpy()
        p = _probs(df)
        pairs = [(f"{name}", y == 1, p[:, 1])] if binary else \
            [(f"{c}", y == k, p[:, k]) for k, c in enumerate(classes[name])]
        for j, (label, pos, score) in enumerate(pairs):
            if pos.all() or not pos.any():
                continue
            fpr, tpr, _ = roc_curve(pos, score)
            colour = _COLOURS[(i if binary else j) % len(_COLOURS)]
            ax.plot(fpr, tpr, color=colour, lw=1.8, label=f"{label} (AUC {auc(fpr, tpr):.3f})")
        ax.plot([0, 1], [0, 1], color="#999999", lw=0.8, ls="--")
        ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01),
               title="ROC, pooled test folds" if binary else f"{name}: one-vs-rest ROC")
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
    fig, axes = _figure(len(names))
    pvalues: dict[str, float] = {}
    for i, name in enumerate(names):
        ax = axes[0, i]
        df = tables[name]
        high = np.zeros(len(df), bool)
        for _, idx in df.groupby("fold").groups.items():
            pos = df.index.get_indexer(idx)
            r = df["risk"].to_numpy()[pos]
            high[pos] = r > np.median(r)
        t = df["time"].to_numpy(np.float64)
        e = df["event"].to_numpy().astype(bool)
        for flag, label, colour in ((False, "low risk", _COLOURS[0]), (True, "high risk", _COLOURS[1])):
            sel = high == flag
            if sel.sum() == 0:
                continue
            x, s = kaplan_meier_estimator(e[sel], t[sel])
            ax.step(np.r_[0, x], np.r_[1, s], where="post", color=colour, lw=1.8, label=f"{label} (n={sel.sum()})")
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


def learning_figure(logs: Mapping[str, Sequence[Any]]) -> bytes:
    """Training and validation loss per epoch: one thin line per fold, the mean over folds bold."""
    names = list(logs)
    fig, axes = _figure(len(names))
    for i, name in enumerate(names):
        ax = axes[0, i]
        for col, colour in (("train_loss", _COLOURS[0]), ("val_loss", _COLOURS[3])):
            curves = [np.asarray(log[col], np.float64) for log in logs[name]]
            for log, c in zip(logs[name], curves):
                ax.plot(log["epoch"], c, color=colour, lw=0.7, alpha=0.45)
            n = min(len(c) for c in curves)
            ax.plot(np.arange(1, n + 1), np.mean([c[:n] for c in curves], axis=0), color=colour, lw=2.0,
                    label=col.replace("_", " "))
        for log in logs[name]:
            best = log[log["selected"].astype(bool)]["epoch"]
            if len(best):
                ax.axvline(int(best.iloc[-1]), color="#999999", lw=0.6, ls=":")
        ax.set(xlabel="epoch", ylabel="loss", title=f"{name} (dotted: epochs chosen on validation)")
        ax.legend(fontsize=8)
    return _png(fig)
