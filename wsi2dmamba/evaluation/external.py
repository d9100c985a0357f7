"""External validation: metrics and report of a run folder that ``predict`` wrote (RUN2).

For every model applied (``RUN2/predict.json``), when the cohort has labels or survival times:

* metrics at patient level (and slide level) of the ensemble, with patient-level bootstrap 95% CIs;
* classification: ROC and calibration (reliability curve, Brier score, expected calibration error);
* survival: C-index, and Kaplan–Meier curves of the risk groups split at the cut-off recorded in the
  bundle, which comes from the training cohort's cross-validated risks, never from this cohort;
* the cross-validated figures of the training cohort (recorded in the bundle) beside the external ones.

``evaluate_external`` writes ``RUN2/eval/metrics.json``; ``write_external_report`` writes
``RUN2/report/index.html`` (one self-contained page) with ``RUN2/report/metrics.json``.
"""

from __future__ import annotations

import html
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import run_layout as layout
from ..errors import StageInputError
from ..fileio import write_json_atomic, write_text_atomic


CALIBRATION_BINS = 10


def is_external_run(run_dir: str | os.PathLike[str]) -> bool:
    """Whether ``run_dir`` is a folder of predictions made by ``wsi2dmamba predict``."""
    return layout.predict_record(run_dir).is_file()


def _read_record(run_dir: Path) -> dict[str, Any]:
    try:
        record = json.loads(layout.predict_record(run_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StageInputError(f"{layout.predict_record(run_dir)} cannot be read ({exc}); rerun `wsi2dmamba predict`.") from None
    if not isinstance(record, dict) or not isinstance(record.get("models"), dict) or not record["models"]:
        raise StageInputError(f"{layout.predict_record(run_dir)} names no model; rerun `wsi2dmamba predict`.")
    return record


def _tables(run_dir: Path, name: str) -> tuple[Any, Any]:
    import pandas as pd

    base = layout.predictions_dir(run_dir)
    slides_csv, patients_csv = layout.prediction_tables(run_dir, name)
    dtypes = {"slide_id": str, "patient_id": str, "label": str}
    try:
        return pd.read_csv(slides_csv, dtype=dtypes), pd.read_csv(patients_csv, dtype=dtypes)
    except (OSError, ValueError) as exc:
        raise StageInputError(f"The predictions of {name!r} in {base} cannot be read ({exc}); rerun "
                              "`wsi2dmamba predict`.") from None


def _probs(df: Any) -> np.ndarray:
    cols = sorted((c for c in df.columns if c.startswith("prob_")), key=lambda c: int(c.split("_")[1]))
    return df[cols].to_numpy(np.float64)


def calibration(y: np.ndarray, probs: np.ndarray, bins: int = CALIBRATION_BINS) -> dict[str, Any]:
    """Reliability of predicted probabilities.

    Binary tasks use the class-1 probability against the class-1 frequency; more classes use the
    predicted class's probability (confidence) against accuracy.

    Returns:
        brier (mean squared error of the probability vector, summed over classes), ece (expected
        calibration error over ``bins`` equal-width bins), and the curve: per non-empty bin its mean
        prediction, observed frequency and count.
    """
    y = np.asarray(y, np.int64)
    k = probs.shape[1]
    onehot = np.eye(k)[y]
    brier = float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))
    if k == 2:
        score, hit = probs[:, 1], (y == 1).astype(float)
    else:
        score, hit = probs.max(axis=1), (probs.argmax(axis=1) == y).astype(float)
    which = np.minimum((score * bins).astype(int), bins - 1)
    curve = {"predicted": [], "observed": [], "count": []}
    ece = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            curve["predicted"].append(float(score[sel].mean()))
            curve["observed"].append(float(hit[sel].mean()))
            curve["count"].append(int(sel.sum()))
            ece += sel.mean() * abs(score[sel].mean() - hit[sel].mean())
    return {"brier": brier, "ece": float(ece), "curve": curve,
            "kind": "class-1 probability" if k == 2 else "confidence of the predicted class"}


def _classification(df: Any, n_boot: int, seed: int) -> dict[str, Any] | None:
    from .bootstrap import (
        bootstrap_counts,
        percentile_interval,
        weighted_classification,
    )
    from .metrics import classification_metrics

    if "target" not in df.columns:
        return None
    df = df[df["target"].notna() & (df["target"].astype(str) != "")]
    if df.empty:
        return None
    y, probs = df["target"].astype(int).to_numpy(), _probs(df)
    out = classification_metrics(y, probs)
    out["calibration"] = calibration(y, probs)
    if n_boot > 0 and len(df) > 1:
        reps = weighted_classification(y, probs, bootstrap_counts(df["patient_id"].to_numpy(), n_boot, seed))
        out["ci"] = {m: list(percentile_interval(v)) for m, v in reps.items()}
    return out


def _survival(df: Any, cutoff: float | None, n_boot: int, seed: int) -> dict[str, Any] | None:
    from .bootstrap import (
        bootstrap_counts,
        percentile_interval,
        weighted_c_index,
    )
    from .metrics import survival_metrics

    if "time" not in df.columns or "event" not in df.columns:
        return None
    df = df[df["time"].notna() & df["event"].notna()]
    if df.empty:
        return None
    t, e, r = df["time"].to_numpy(np.float64), df["event"].to_numpy().astype(int), df["risk"].to_numpy(np.float64)
    out = survival_metrics(t, e, r)
    if n_boot > 0 and len(df) > 1:
        reps = weighted_c_index(t, e, r, bootstrap_counts(df["patient_id"].to_numpy(), n_boot, seed))
        out["ci"] = {"c_index": list(percentile_interval(reps))}
    if cutoff is not None:
        high = r > cutoff
        out["risk_groups"] = {"cutoff": cutoff, "cutoff_from": "training cohort (median cross-validated risk)",
                              "high": int(high.sum()), "low": int((~high).sum()), "logrank_p": _logrank(t, e, high)}
    return out


def _logrank(t: np.ndarray, e: np.ndarray, high: np.ndarray) -> float:
    if not (0 < high.sum() < len(high)) or not e.any():
        return math.nan
    from sksurv.compare import compare_survival
    from sksurv.util import Surv

    try:
        return float(compare_survival(Surv.from_arrays(e.astype(bool), t), high.astype(int))[1])
    except ValueError:
        return math.nan


def _within(value: Any, ci: Any) -> bool | None:
    if value is None or not ci or ci[0] is None or not all(np.isfinite([value, *ci])):
        return None
    return bool(ci[0] <= value <= ci[1])


def _fold_metric(df: Any, task: str, metric: str, folds: list[int]) -> list[float]:
    """``metric`` of each fold's model alone on the labelled patients of ``df``."""
    from .metrics import classification_metrics, survival_metrics

    values = []
    for k in folds:
        if task == "survival":
            sub = df[df["time"].notna() & df["event"].notna()]
            values.append(survival_metrics(sub["time"].to_numpy(np.float64), sub["event"].to_numpy().astype(int),
                                           sub[f"fold{k}_risk"].to_numpy(np.float64))[metric])
        else:
            sub = df[df["target"].notna() & (df["target"].astype(str) != "")]
            cols = sorted((c for c in sub.columns if c.startswith(f"fold{k}_prob_")),
                          key=lambda c: int(c.rsplit("_", 1)[1]))
            values.append(classification_metrics(sub["target"].astype(int).to_numpy(),
                                                 sub[cols].to_numpy(np.float64))[metric])
    return [float(v) for v in values]


def evaluate_model_external(run_dir: Path, name: str, manifest: dict[str, Any], n_boot: int = 1000,
                            seed: int = 0) -> dict[str, Any]:
    """External metrics of one applied bundle (see the module docstring)."""
    from .evaluate import _clean

    slides, patients = _tables(run_dir, name)
    task = manifest["task"]["kind"]
    results: dict[str, Any] = {}
    for level, df in (("patient", patients), ("slide", slides)):
        if task == "survival":
            results[level] = _survival(df, manifest.get("risk_cutoff"), n_boot, seed)
        else:
            results[level] = _classification(df, n_boot, seed)
    main = "c_index" if task == "survival" else "auc"
    cv = manifest.get("cv_metrics", {})
    ext = results.get("patient") or {}
    comparison = {"metric": main, "cv": cv.get("pooled", {}).get(main),
                  "cv_ci": cv.get("pooled", {}).get("ci", {}).get(main), "cv_mean": cv.get("mean", {}).get(main),
                  "cv_std": cv.get("std", {}).get(main), "external": ext.get(main),
                  "external_ci": ext.get("ci", {}).get(main)}
    comparison["external_within_cv_ci"] = _within(comparison["external"], comparison["cv_ci"])
    if ext:
        # Each fold's model alone on the external cohort: the like-for-like counterpart of the
        # cross-validated mean ± std (the ensemble, above, is usually better than any one fold).
        folds = _fold_metric(patients, task, main, [f["fold"] for f in manifest["folds"]])
        comparison.update(external_folds=folds, external_fold_mean=float(np.nanmean(folds)),
                          external_fold_std=float(np.nanstd(folds, ddof=1)) if len(folds) > 1 else math.nan)
    return _clean({"name": name, "task": task, "classes": manifest["task"].get("classes"),
                   "n_slides": len(slides), "n_patients": len(patients),
                   "labelled": results.get("patient") is not None, "results": results, "comparison": comparison,
                   "cv": cv, "training_cohort": manifest.get("training_cohort", {}),
                   "encoder": manifest.get("encoder"), "tiling": manifest.get("tiling")})


def evaluate_external(run_dir: str | os.PathLike[str], n_boot: int = 1000, seed: int = 0,
                      write: bool = True) -> dict[str, Any]:
    """External-validation metrics of every bundle applied in ``run_dir``; written to ``eval/metrics.json``."""
    run_dir = Path(run_dir)
    record = _read_record(run_dir)
    out = {"kind": "external", "run": str(run_dir.resolve()), "cohort": record.get("cohort"),
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "n_boot": n_boot,
           "models": {name: evaluate_model_external(run_dir, name, entry["manifest"], n_boot, seed)
                      for name, entry in sorted(record["models"].items())}}
    if write:
        write_json_atomic(layout.eval_metrics(run_dir), out)
    return out


def _ci_text(value: Any, ci: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and ci[0] is not None else "")


def format_external(metrics: dict[str, Any]) -> str:
    """Plain-text table for the terminal: cross-validated (training cohort) and external, per model."""
    lines = []
    for name, m in metrics["models"].items():
        c = m["comparison"]
        if not m["labelled"]:
            lines.append(f"{name:<20} {m['n_patients']} patients, no labels or survival: predictions only")
            continue
        within = {True: "within", False: "outside", None: "–"}[c["external_within_cv_ci"]]
        folds = "" if c.get("external_fold_mean") is None else \
            f"; each fold's model {c['external_fold_mean']:.3f} ± {c.get('external_fold_std') or 0:.3f}"
        lines.append(f"{name:<20} {c['metric']} cross-validated {_ci_text(c['cv'], c['cv_ci'])}, folds "
                     f"{c['cv_mean'] or math.nan:.3f} ± {c['cv_std'] or 0:.3f}; external ensemble "
                     f"{_ci_text(c['external'], c['external_ci'])} ({within} the CV interval){folds}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ report

def _point(ax: Any, value: float, ci: Any, y: float, colour: str, label: str | None) -> None:
    err = None if not ci or ci[0] is None else [[value - ci[0]], [ci[1] - value]]
    ax.errorbar(value, y, xerr=err, fmt="o", color=colour, capsize=3, label=label)


def _forest_figure(metrics: dict[str, Any]) -> bytes | None:
    """The main metric of each model, cross-validated and external, with 95% intervals, side by side."""
    from .plots import _COLOURS, _figure, _png

    rows = [(n, m["comparison"]) for n, m in metrics["models"].items() if m["labelled"]]
    if not rows:
        return None
    fig, axes = _figure(size=(6.0, 1.8 + 0.6 * len(rows)))
    ax = axes[0, 0]
    for i, (_, c) in enumerate(rows):
        for j, (key, label) in enumerate((("cv", "cross-validated (training cohort)"), ("external", "external"))):
            if c[key] is not None:
                _point(ax, c[key], c[f"{key}_ci"], -i + 0.15 - 0.3 * j, _COLOURS[j], label if i == 0 else None)
    ax.axvline(0.5, color="#999999", lw=0.8, ls="--")
    ax.set_yticks([-i for i in range(len(rows))], [n for n, _ in rows])
    ax.set_ylim(-len(rows) + 0.3, 0.9)
    ax.set(xlabel=f"{rows[0][1]['metric']} (patient level, 95% CI)", xlim=(0, 1.02),
           title="cross-validated vs external")
    ax.legend(fontsize=8, loc="upper left")
    return _png(fig)


def _calibration_figure(metrics: dict[str, Any]) -> bytes:
    from .plots import _COLOURS, _figure, _png

    fig, axes = _figure()
    ax = axes[0, 0]
    for i, (name, m) in enumerate(metrics.items()):
        cal = m["results"]["patient"]["calibration"]
        curve = cal["curve"]
        ax.plot(curve["predicted"], curve["observed"], "o-", color=_COLOURS[i % len(_COLOURS)], lw=1.5,
                label=f"{name} (Brier {cal['brier']:.3f}, ECE {cal['ece']:.3f})")
    ax.plot([0, 1], [0, 1], color="#999999", lw=0.8, ls="--")
    ax.set(xlabel="predicted probability", ylabel="observed frequency", xlim=(0, 1), ylim=(0, 1.02),
           title="calibration, external cohort (patients)")
    ax.legend(fontsize=8, loc="upper left")
    return _png(fig)


def _km_figure(tables: dict[str, Any], cutoffs: dict[str, float]) -> bytes:
    """Kaplan–Meier curves of the risk groups split at the training cohort's cut-off."""
    from sksurv.nonparametric import kaplan_meier_estimator

    from .plots import _COLOURS, _figure, _png

    fig, axes = _figure(len(tables))
    for i, (name, df) in enumerate(tables.items()):
        ax = axes[0, i]
        t, e = df["time"].to_numpy(np.float64), df["event"].to_numpy().astype(bool)
        high = df["risk"].to_numpy(np.float64) > cutoffs[name]
        for flag, label, colour in ((False, "low risk", _COLOURS[0]), (True, "high risk", _COLOURS[1])):
            if (high == flag).any():
                x, s = kaplan_meier_estimator(e[high == flag], t[high == flag])
                ax.step(np.r_[0, x], np.r_[1, s], where="post", color=colour, lw=1.8,
                        label=f"{label} (n={(high == flag).sum()})")
        ax.set(xlabel="time", ylabel="survival probability", ylim=(0, 1.02),
               title=f"{name}: log-rank p = {_logrank(t, e, high):.3g}")
        ax.legend(loc="lower left", fontsize=8)
    return _png(fig)


def _table_html(metrics: dict[str, Any]) -> str:
    rows = []
    for name, m in metrics["models"].items():
        c = m["comparison"]
        within = {True: "yes", False: "no", None: "–"}[c["external_within_cv_ci"]]
        cv_mean = "–" if c["cv_mean"] is None else f"{c['cv_mean']:.3f} ± {c['cv_std'] or 0:.3f}"
        ext_mean = "–" if c.get("external_fold_mean") is None else \
            f"{c['external_fold_mean']:.3f} ± {c.get('external_fold_std') or 0:.3f}"
        tc = m["training_cohort"]
        rows.append(f"<tr><td class='name'>{html.escape(name)}</td><td>{c['metric']}</td>"
                    f"<td>{tc.get('n_patients', '–')}</td><td>{_ci_text(c['cv'], c['cv_ci'])}</td><td>{cv_mean}</td>"
                    f"<td>{m['n_patients']}</td><td>{_ci_text(c['external'], c['external_ci'])}</td><td>{ext_mean}</td>"
                    f"<td>{within}</td></tr>")
    return ("<table><tr><th class='name'>model</th><th>metric</th><th>training patients</th>"
            "<th>cross-validated, pooled [95% CI]</th><th>cross-validated, mean ± std over folds</th>"
            "<th>external patients</th><th>external, ensemble [95% CI]</th><th>external, each fold's model: mean ± "
            "std</th><th>ensemble within CV interval</th></tr>"
            + "".join(rows) + "</table>")


def _figures_html(run_dir: Path, metrics: dict[str, Any]) -> str:
    from .report import _img

    labelled = {n: m for n, m in metrics["models"].items() if m["labelled"]}
    parts = []
    forest = _forest_figure(metrics)
    if forest is not None:
        parts.append(_img(forest, "forest", "Cross-validated (training cohort, pooled test folds) and external "
                          "metric per model, patient level, with 95% bootstrap intervals."))
    parts += _classification_figures(run_dir, {n: m for n, m in labelled.items() if m["task"] == "classification"})
    parts += _survival_figures(run_dir, {n: m for n, m in labelled.items() if m["task"] == "survival"
                                         and (m["results"]["patient"] or {}).get("risk_groups")})
    return "".join(parts)


def _classification_figures(run_dir: Path, clf: dict[str, Any]) -> list[str]:
    from .plots import roc_figure
    from .report import _img

    if not clf:
        return []
    tables = {}
    for n in clf:
        df = _tables(run_dir, n)[1]
        tables[n] = df[df["target"].notna() & (df["target"].astype(str) != "")].assign(
            target=lambda d: d["target"].astype(int))
    return [_img(roc_figure(tables, {n: m["classes"] for n, m in clf.items()}), "ROC",
                 "ROC of the ensemble on the external cohort (patients)."),
            _img(_calibration_figure(clf), "calibration", "Observed frequency against predicted "
                 f"probability, {CALIBRATION_BINS} equal-width bins (empty bins left out).")]


def _survival_figures(run_dir: Path, surv: dict[str, Any]) -> list[str]:
    from .report import _img

    if not surv:
        return []
    tables = {n: _tables(run_dir, n)[1].dropna(subset=["time", "event"]) for n in surv}
    cut = {n: m["results"]["patient"]["risk_groups"]["cutoff"] for n, m in surv.items()}
    return [_img(_km_figure(tables, cut), "Kaplan-Meier", "Kaplan–Meier curves of the external patients split at "
                 "each model's cut-off from the training cohort (median cross-validated risk).")]


def write_external_report(run_dir: str | os.PathLike[str], n_boot: int = 1000, seed: int = 0,
                          metrics: dict[str, Any] | None = None) -> Path:
    """``RUN2/report/index.html``: the external validation of every bundle applied in ``run_dir``."""
    from .report import _STYLE

    run_dir = Path(run_dir)
    metrics = metrics if metrics is not None else evaluate_external(run_dir, n_boot, seed)
    labelled = any(m["labelled"] for m in metrics["models"].values())
    body = [f"<h1>External validation: {html.escape(run_dir.resolve().name)}</h1>",
            (f"<p class='note'>Cohort {html.escape(str(metrics.get('cohort')))}; {metrics['n_boot']} patient-level "
            f"bootstrap resamples; created {metrics['created']}.</p>")]
    if labelled:
        body += ["<h2>Cross-validated and external</h2>", _table_html(metrics), _figures_html(run_dir, metrics)]
    else:
        body.append("<p>The cohort has neither labels nor survival times: the predictions are in "
                    f"<code>{layout.PREDICTIONS_DIR}/&lt;model&gt;.csv</code>, there is nothing to validate.</p>")
    body.append("<h2>Models applied</h2><table><tr><th class='name'>model</th><th>task</th><th>encoder</th>"
                "<th>tiles</th><th>training cohort</th></tr>")
    for name, m in metrics["models"].items():
        enc, til = m.get("encoder") or {}, m.get("tiling") or {}
        body.append(f"<tr><td class='name'>{html.escape(name)}</td><td>{m['task']}</td>"
                    f"<td>{html.escape(str(enc.get('name')))} ({enc.get('feature_dim')}-d)</td>"
                    f"<td>{til.get('tile_px')} px at {til.get('mpp')} µm/px</td>"
                    f"<td class='name'>{html.escape(json.dumps(m['training_cohort']))}</td></tr>")
    body.append("</table>")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>External validation</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(body)}</body></html>")
    files = layout.report_files(layout.report_dir(run_dir))
    out = files["page"]
    write_text_atomic(out, page)
    write_json_atomic(files["metrics"], metrics)
    return out
