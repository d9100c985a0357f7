"""The run report: one self-contained HTML page comparing every model trained in a run.

``RUN/report/index.html`` embeds its figures as PNG data URIs and its style inline (no script, nothing
fetched), so it can be mailed or archived as one file. Beside it: ``summary.csv`` (CLAM's columns
``folds, test_auc, val_auc, test_acc, val_acc`` first, one row per model, checkpoint and fold) and
``metrics.json`` (everything :func:`~wsi2dmamba.evaluation.evaluate_run` computed).
"""

from __future__ import annotations

import base64
import html
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import run_layout as layout
from ..fileio import write_json_atomic, write_text_atomic
from . import plots
from .evaluate import (
    CHECKPOINTS,
    FAILED_FOLD_METRIC,
    FAILED_FOLD_THRESHOLD,
    aggregate_patients,
    clam_summary_rows,
    complete_folds,
    evaluate_run,
    model_dirs,
    read_fold,
    summary_table,
)
from .metrics import CLASSIFICATION_METRICS, SURVIVAL_METRICS

_LABELS = {"auc": "AUC", "balanced_accuracy": "balanced acc.", "accuracy": "accuracy", "f1": "macro F1",
           "c_index": "C-index", "c_index_ipcw": "IPCW C-index", "td_auc": "time-dep. AUC",
           "ibs": "integrated Brier"}

_STYLE = """
body { font-family: system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.88em; margin: 0.8em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f3f3f3; } td.name, th.name { text-align: left; }
tr.last td { color: #555; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; }
.note { font-size: 0.85em; color: #555; }
.warn { color: #a33; font-weight: 600; }
table.at-risk { font-size: 0.8em; margin-top: -0.4em; }
tr.failed td { background: #fbeaea; }
"""


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def _img(png: bytes, alt: str, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _summary_html(metrics: dict[str, Any], task: str, level: str) -> str:
    names = SURVIVAL_METRICS if task == "survival" else CLASSIFICATION_METRICS
    rows = [r for r in summary_table(metrics, level) if r["task"] == task]
    if not rows:
        return ""
    head = "".join(f"<th>{_LABELS[n]}<br>mean ± sd</th><th>{_LABELS[n]}<br>pooled [95% CI]</th>" for n in names)
    body = [_summary_row(r, names) for r in rows]
    return (f'<table class="summary" data-task="{task}" data-level="{level}"><thead><tr><th class="name">model</th>'
            f'<th class="name">checkpoint</th><th class="name">evaluated on</th><th>folds</th>'
            f'<th>failed folds</th>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>')


def _summary_row(r: dict[str, Any], names: tuple[str, ...]) -> str:
    cells = []
    for n in names:
        cells.append(f"<td>{_fmt(r[f'{n}_mean'])} ± {_fmt(r[f'{n}_std'])}</td>")
        ci = (f" [{_fmt(r[f'{n}_ci_low'])}, {_fmt(r[f'{n}_ci_high'])}]" if r[f"{n}_ci_low"] is not None else "")
        cells.append(f"<td>{_fmt(r[f'{n}_pooled'])}{ci}</td>")
    label = "chosen on validation" if r["checkpoint"] == "best" else "last epoch"
    part = ("test" if r["partition"] == "test"
            else '<span class="warn">validation (no test partition; optimistic)</span>')
    failed = f'{r["failed"]} of {r["failed_of"]}' if r["failed_of"] is not None else "–"
    return (f'<tr class="{r["checkpoint"]}"><td class="name">{html.escape(r["model"])}</td>'
            f'<td class="name">{label}</td><td class="name partition">{part}</td><td>{r["folds"]}</td>'
            f'<td class="failed">{failed}</td>{"".join(cells)}</tr>')


def _restart_text(m: dict[str, Any], fold: int) -> str:
    info = m.get("restarts", {}).get(str(fold))
    if not info:
        return "–"
    values = ", ".join(_fmt(r.get("best_value")) for r in info["restarts"])
    return f'{info["chosen"] + 1} of {len(info["restarts"])} ({m["select_on"]}: {values})'


def _fold_rows(name: str, m: dict[str, Any], names: tuple[str, ...]) -> list[str]:
    res = m["results"]["patient"]["best"]
    failed = m.get("failed_folds", {}).get("best", {})
    key = failed.get("metric", names[0])
    val = {f["fold"]: f for f in res.get("val", {}).get("folds", [])}
    test = {f["fold"]: f for f in res.get("test", {}).get("folds", [])}
    rows = []
    for k in sorted(set(val) | set(test)):
        t = test.get(k, {})
        bad = k in failed.get("folds", [])
        cells = "".join(f"<td>{_fmt(t.get(n))}</td>" for n in names)
        epoch = (t or val.get(k, {})).get("epoch")
        rows.append(f'<tr class="{"failed" if bad else "ok"}"><td class="name">{html.escape(name)}</td>'
                    f'<td>{k}</td><td>{epoch if epoch is not None else "–"}</td>'
                    f'<td class="name">{_restart_text(m, k)}</td><td>{_fmt(val.get(k, {}).get(key))}</td>'
                    f'<td class="name">{"failed" if bad else ""}</td>{cells}</tr>')
    return rows


def _folds_html(metrics: dict[str, Any], task: str) -> str:
    """Per model and fold: chosen epoch and restart, the validation figure that decides failure, and the
    test metrics of the checkpoint chosen on validation (patient level)."""
    names = SURVIVAL_METRICS if task == "survival" else CLASSIFICATION_METRICS
    body = [row for name, m in metrics["models"].items() if m["task"] == task for row in _fold_rows(name, m, names)]
    if not body:
        return ""
    key_label = _LABELS[FAILED_FOLD_METRIC[task]]
    head = "".join(f"<th>test {_LABELS[n]}</th>" for n in names)
    return (f'<table class="folds" data-task="{task}"><thead><tr><th class="name">model</th><th>fold</th>'
            f'<th>chosen epoch</th><th class="name">restart chosen</th><th>validation {key_label}</th>'
            f'<th class="name">at chance</th>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>')


def _models_html(metrics: dict[str, Any]) -> str:
    rows = []
    for name, m in metrics["models"].items():
        incomplete = ", ".join(map(str, m["incomplete_folds"])) or "none"
        classes = ", ".join(m["classes"]) if m.get("classes") else "–"
        rows.append(f'<tr><td class="name">{html.escape(name)}</td><td class="name">{html.escape(str(m["model"]))}</td>'
                    f'<td class="name">{html.escape(str(m.get("preset") or "default"))}</td>'
                    f'<td class="name">{m["task"]}</td><td class="name">{html.escape(classes)}</td>'
                    f'<td>{m.get("n_parameters") or "–"}</td><td class="name">{m["select_on"]}</td>'
                    f'<td>{len(m["folds"])}</td><td class="name">{incomplete}</td></tr>')
    return ('<table class="models"><thead><tr><th class="name">name</th><th class="name">architecture</th>'
            '<th class="name">preset</th><th class="name">task</th><th class="name">classes</th><th>parameters</th>'
            '<th class="name">selected on</th><th>complete folds</th><th class="name">unfinished folds</th></tr>'
            f'</thead><tbody>{"".join(rows)}</tbody></table>') + _recipe_html(metrics)


def _recipe_html(metrics: dict[str, Any]) -> str:
    """For models with the ``paper`` preset: every way their training departs from the published recipe."""
    from .recipe import paper_recipe_differences

    items = []
    for name, m in metrics["models"].items():
        if m.get("preset") != "paper" or "train" not in m:
            continue
        diffs = "".join(f"<li>{html.escape(d)}</li>" for d in paper_recipe_differences(m["train"]))
        items.append(f'<div class="recipe" data-model="{html.escape(name)}"><p class="note"><strong>'
                     f'{html.escape(name)}</strong> is the published architecture; its training differs from the '
                     f"published recipe in:</p><ul class=\"note\">{diffs}</ul></div>")
    return "".join(items)


def _load_tables(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Per model: its task, the patient-level predictions of the checkpoint chosen on validation on the
    partition the run is summarised on (``eval``; test, or validation without one, ``partition`` says
    which), each fold's training log and survival interval ends."""
    import pandas as pd

    out = {}
    for d in model_dirs(run_dir):
        frames, logs, others, ends, task = [], {}, {}, {}, None
        for f in complete_folds(d):
            cfg, preds = read_fold(f)
            task = cfg["task"]
            frames.append(preds)
            logs[int(cfg["fold"])] = pd.read_csv(layout.fold_file(f, layout.FOLD_LOG))
            ends[int(cfg["fold"])] = cfg.get("bin_ends")
            chosen = cfg.get("chosen_restart")
            others[int(cfg["fold"])] = [pd.read_csv(layout.fold_file(r, layout.FOLD_LOG))
                                        for r in sorted(f.glob(layout.restart_glob()))
                                        if r != layout.restart_dir(f, chosen)
                                        and layout.fold_file(r, layout.FOLD_LOG).is_file()]
        slides = pd.concat(frames, ignore_index=True)
        patients = aggregate_patients(slides, task).reset_index(drop=True)
        part = "test" if (patients["partition"] == "test").any() else "val"
        chosen = patients[(patients["checkpoint"] == "best") & (patients["partition"] == part)].reset_index(drop=True)
        out[d.name] = {"task": task, "eval": chosen, "partition": part, "logs": logs, "bin_ends": ends,
                       "other_restarts": others}
    return out


def _which(tables: dict[str, dict[str, Any]], names: list[str]) -> str:
    """How a caption names the predictions it plots."""
    val = [n for n in names if tables[n]["partition"] == "val"]
    if not val:
        return "pooled test predictions"
    if len(val) == len(names):
        return "pooled VALIDATION predictions (the splits have no test partition; optimistic)"
    return f"pooled test predictions (VALIDATION for {', '.join(val)}: no test partition)"


def _classification_curves(which: str) -> tuple[tuple[str, Any, str, str], ...]:
    """(heading, figure function, alt text, caption) of the figures drawn per group of models."""
    return (
        ("ROC curves", plots.roc_figure, "ROC curves",
         f"Patient level, {which} of the checkpoints chosen on validation."),
        ("Precision–recall curves", plots.pr_figure, "precision-recall curves",
         (f"Patient level, {which}. With imbalanced classes read these beside the ROC: the dotted line is the "
          "chance level (the class's prevalence), AP the average precision.")),
        ("Calibration", plots.calibration_figure, "calibration",
         (f"Patient level, {which}: observed frequency against predicted probability on bins of equal size "
          "(binary: the second class; more classes: confidence of the predicted class against accuracy); ECE "
          "the count-weighted mean gap. The diagonal is perfect calibration.")),
    )


def _classification_figures(metrics: dict[str, Any], tables: dict[str, dict[str, Any]], names: list[str]) -> list[str]:
    evals = {n: tables[n]["eval"] for n in names if len(tables[n]["eval"])}
    if not evals:
        return []
    which = _which(tables, list(evals))
    classes = {n: metrics["models"][n]["classes"] for n in evals}
    # Models with the same number of classes can share panels; draw each group separately.
    by_k: dict[int, list[str]] = {}
    for n in evals:
        by_k.setdefault(len(classes[n]), []).append(n)
    parts = []
    for heading, figure, alt, caption in _classification_curves(which):
        parts.append(f"<h2>{heading}</h2>")
        parts += [_img(figure({n: evals[n] for n in group}, classes), alt, caption) for group in by_k.values()]
    matrices = {n: np.asarray(metrics["models"][n]["results"]["patient"]["best"][tables[n]["partition"]]
                              ["pooled"]["confusion"]) for n in evals}
    parts.append("<h2>Confusion matrices</h2>")
    parts.append(_img(plots.confusion_figure(matrices, classes), "confusion matrices",
                      f"Patient level, {which} (checkpoint chosen on validation); rows are true classes, columns "
                      "predictions, shading the fraction of the row."))
    return parts


def _survival_tables(tables: dict[str, dict[str, Any]], names: list[str]) -> tuple[dict[str, Any], float]:
    """The survival models' evaluated patients with ``pred_surv``, each patient's predicted survival at
    the horizon (the median observed event time of the patients shown)."""
    from .metrics import survival_function_at

    evals = {n: tables[n]["eval"].copy() for n in names if len(tables[n]["eval"])}
    events = np.concatenate([df["time"].to_numpy(np.float64)[df["event"].to_numpy().astype(bool)]
                             for df in evals.values()]) if evals else np.array([])
    horizon = float(np.median(events)) if events.size else math.nan
    for n, df in evals.items():
        surv_cols = sorted((c for c in df.columns if c.startswith("surv_")), key=lambda c: int(c.split("_")[1]))
        ends = np.stack([np.asarray(tables[n]["bin_ends"][int(k)], np.float64) for k in df["fold"]])
        df["pred_surv"] = survival_function_at(df[surv_cols].to_numpy(np.float64), ends, np.array([horizon]))[:, 0]
    return evals, horizon


def _at_risk_html(evals: dict[str, Any]) -> str:
    rows = []
    for n, df in evals.items():
        t = df["time"].to_numpy(np.float64)
        ticks = plots.at_risk_times(t)
        table = plots.at_risk_table(t, plots.risk_groups(df), ticks)
        head = "".join(f"<th>{_fmt(float(x), 0 if float(x).is_integer() else 2)}</th>" for x in ticks)
        body = "".join(f'<tr><td class="name">{html.escape(n)}</td><td class="name">{g}</td>'
                       + "".join(f"<td>{c}</td>" for c in counts) + "</tr>" for g, counts in table.items())
        rows.append(f'<table class="at-risk"><thead><tr><th class="name">model</th><th class="name">number at risk'
                    f'</th>{head}</tr></thead><tbody>{body}</tbody></table>')
    return "".join(rows)


def _survival_figures(metrics: dict[str, Any], tables: dict[str, dict[str, Any]], names: list[str]) -> list[str]:
    evals, horizon = _survival_tables(tables, names)
    if not evals:
        return []
    which = _which(tables, list(evals))
    png, pvalues = plots.km_figure(evals)
    for n, p in pvalues.items():
        metrics["models"][n]["logrank_p"] = None if not math.isfinite(p) else p
    parts = ["<h2>Kaplan–Meier curves of predicted risk groups</h2>",
             _img(png, "Kaplan-Meier curves",
                  f"{which.capitalize()}: patients above their fold's median predicted risk (high risk) against "
                  "the rest, with the number at risk under the axis; log-rank p-values: "
                  + ", ".join(f"{n} {p:.3g}" for n, p in pvalues.items()) + "."),
             _at_risk_html(evals)]
    if math.isfinite(horizon):
        parts += ["<h2>Calibration</h2>",
                  _img(plots.survival_calibration_figure(evals, horizon), "survival calibration",
                       f"{which.capitalize()}: predicted survival at t = {horizon:.3g} (the median event time) "
                       "against the Kaplan–Meier estimate, in thirds of predicted survival within each fold. "
                       "The diagonal is perfect calibration.")]
    return parts


def _training_figure(metrics: dict[str, Any], tables: dict[str, dict[str, Any]], names: list[str], task: str) -> str:
    curves = {}
    for n in names:
        m = metrics["models"][n]
        curves[n] = f"val_{m['select_on']}" if m["select_on"] != "loss" else f"val_{FAILED_FOLD_METRIC[task]}"
    failed = {n: metrics["models"][n].get("failed_folds", {}).get("best", {}).get("folds", []) for n in names}
    return _img(plots.training_curves_figure({n: tables[n]["logs"] for n in names}, curves, failed,
                                             {n: tables[n]["other_restarts"] for n in names}),
                "training curves per fold",
                "Per fold (one colour): training loss (solid) and validation loss (dashed) by epoch, and the "
                "validation metric by epoch (right) with the epoch chosen on validation marked; thin lines of "
                "the fold's colour are the restarts that validation did not choose (--restarts). A training "
                "loss falling while the validation loss rises is a fold memorising its training slides; folds "
                "at chance on validation are marked failed and drawn dashed.")


def write_report(run_dir: str | os.PathLike[str], n_boot: int = 1000, seed: int = 0,
                 metrics: dict[str, Any] | None = None) -> Path:
    """Evaluate the run (unless ``metrics`` is given) and write ``RUN/report/index.html``,
    ``summary.csv`` and ``metrics.json``. Returns the HTML file."""
    run_dir = Path(run_dir)
    from .external import is_external_run, write_external_report

    if is_external_run(run_dir) and not model_dirs(run_dir):  # a folder of `predict`: external validation
        return write_external_report(run_dir, n_boot=n_boot, seed=seed, metrics=metrics)
    if metrics is None:
        metrics = evaluate_run(run_dir, n_boot=n_boot, seed=seed)
    tables = _load_tables(run_dir)
    out_dir = layout.report_dir(run_dir)
    files = layout.report_files(out_dir)
    parts = [f"<h1>wsi2dmamba report</h1><p class=\"note\">Run <code>{html.escape(str(run_dir.resolve()))}</code>, "
             f"written {time.strftime('%Y-%m-%d %H:%M')}. Test metrics are of the held-out partition of each fold; "
             "“chosen on validation” is the checkpoint with the best validation "
             "score, “last epoch” the final one. Mean ± sd is over folds; pooled joins the test predictions "
             f"of all folds (each patient once), with a patient-level bootstrap 95% interval ({metrics['n_boot']} "
             "resamples). A fold <em>failed</em> when its checkpoint is at chance on its own validation "
             f"partition: patient-level AUC (classification) or C-index (survival) ≤ {FAILED_FOLD_THRESHOLD}; "
             "only validation decides it. Where the splits have no test partition, every figure is of the "
             "validation partition and says so.</p>", "<h2>Models</h2>", _models_html(metrics)]
    for task in ("classification", "survival"):
        names = [n for n, t in tables.items() if t["task"] == task]
        if not names:
            continue
        parts.append(f"<h2>Summary: {task} (patient level)</h2>")
        notes = dict.fromkeys(n for name in names for n in metrics["models"][name].get("notes", []))
        parts += [f'<p class="warn cohort-note">Warning: {html.escape(n)}</p>' for n in notes]
        parts.append(_summary_html(metrics, task, "patient"))
        parts.append(f"<h2>Summary: {task} (slide level)</h2>")
        parts.append(_summary_html(metrics, task, "slide"))
        parts.append(f"<h2>Per fold: {task} (patient level, checkpoint chosen on validation)</h2>")
        parts.append(_folds_html(metrics, task))
        figures = _classification_figures if task == "classification" else _survival_figures
        parts += figures(metrics, tables, names)
        parts.append(f"<h2>Training curves per fold ({task})</h2>")
        parts.append(_training_figure(metrics, tables, names, task))
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>wsi2dmamba report</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_STYLE}</style></head>'
            f'<body>{"".join(parts)}</body></html>\n')
    write_text_atomic(files["summary"], _summary_csv(metrics))
    write_json_atomic(files["metrics"], metrics)
    write_text_atomic(files["page"], page)
    return files["page"]


def _summary_csv(metrics: dict[str, Any]) -> str:
    """CLAM's columns ``folds, test_auc, val_auc, test_acc, val_acc`` first; one row per model, checkpoint
    and fold."""
    import pandas as pd

    rows = []
    for name, m in metrics["models"].items():
        for ckpt in CHECKPOINTS:
            for r in clam_summary_rows(m, ckpt):
                rows.append({**r, "model": name, "checkpoint": ckpt})
    clam_first = ["folds", "test_auc", "val_auc", "test_acc", "val_acc"]
    summary = pd.DataFrame(rows)
    summary = summary[[c for c in clam_first if c in summary.columns]
                      + [c for c in summary.columns if c not in clam_first]]
    return summary.to_csv(index=False)
