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

from ..fileio import write_json_atomic, write_text_atomic
from . import plots
from .evaluate import (
    CHECKPOINTS,
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
    head = "".join(f"<th>{_LABELS[n]}<br>mean ± std</th><th>{_LABELS[n]}<br>pooled [95% CI]</th>" for n in names)
    body = []
    for r in rows:
        cells = []
        for n in names:
            cells.append(f"<td>{_fmt(r[f'{n}_mean'])} ± {_fmt(r[f'{n}_std'])}</td>")
            ci = (f" [{_fmt(r[f'{n}_ci_low'])}, {_fmt(r[f'{n}_ci_high'])}]" if r[f"{n}_ci_low"] is not None else "")
            cells.append(f"<td>{_fmt(r[f'{n}_pooled'])}{ci}</td>")
        label = "chosen on validation" if r["checkpoint"] == "best" else "last epoch"
        body.append(f'<tr class="{r["checkpoint"]}"><td class="name">{html.escape(r["model"])}</td>'
                    f'<td class="name">{label}</td><td>{r["folds"]}</td>{"".join(cells)}</tr>')
    return (f'<table class="summary" data-task="{task}" data-level="{level}"><thead><tr><th class="name">model</th>'
            f'<th class="name">checkpoint</th><th>folds</th>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>')


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
            f'</thead><tbody>{"".join(rows)}</tbody></table>')


def _load_tables(run_dir: Path) -> dict[str, dict[str, Any]]:
    import pandas as pd

    out = {}
    for d in model_dirs(run_dir):
        frames, logs, task = [], [], None
        for f in complete_folds(d):
            cfg, preds = read_fold(f)
            task = cfg["task"]
            frames.append(preds)
            log = pd.read_csv(f / "log.csv")
            logs.append(log)
        slides = pd.concat(frames, ignore_index=True)
        patients = aggregate_patients(slides, task).reset_index(drop=True)
        test = patients[(patients["checkpoint"] == "best") & (patients["partition"] == "test")].reset_index(drop=True)
        out[d.name] = {"task": task, "test": test, "logs": logs}
    return out


def write_report(run_dir: str | os.PathLike[str], n_boot: int = 1000, seed: int = 0,
                 metrics: dict[str, Any] | None = None) -> Path:
    """Evaluate the run (unless ``metrics`` is given) and write ``RUN/report/index.html``,
    ``summary.csv`` and ``metrics.json``. Returns the HTML file."""
    import pandas as pd

    run_dir = Path(run_dir)
    from ..predict.external import is_external_run, write_external_report

    if is_external_run(run_dir) and not model_dirs(run_dir):  # a folder of `predict`: external validation
        return write_external_report(run_dir, n_boot=n_boot, seed=seed, metrics=metrics)
    if metrics is None:
        metrics = evaluate_run(run_dir, n_boot=n_boot, seed=seed)
    tables = _load_tables(run_dir)
    out_dir = run_dir / "report"
    parts = [f"<h1>wsi2dmamba report</h1><p class=\"note\">Run <code>{html.escape(str(run_dir.resolve()))}</code>, "
             f"written {time.strftime('%Y-%m-%d %H:%M')}. Test metrics are of the held-out partition of each fold; "
             "“chosen on validation” is the checkpoint with the best validation "
             "score, “last epoch” the final one. Mean ± std is over folds; pooled joins the test predictions "
             f"of all folds (each patient once), with a patient-level bootstrap 95% interval ({metrics['n_boot']} "
             "resamples).</p>", "<h2>Models</h2>", _models_html(metrics)]
    for task in ("classification", "survival"):
        names = [n for n, t in tables.items() if t["task"] == task]
        if not names:
            continue
        parts.append(f"<h2>Summary: {task} (patient level)</h2>")
        parts.append(_summary_html(metrics, task, "patient"))
        parts.append(f"<h2>Summary: {task} (slide level)</h2>")
        parts.append(_summary_html(metrics, task, "slide"))
        test_tables = {n: tables[n]["test"] for n in names if len(tables[n]["test"])}
        if task == "classification" and test_tables:
            classes = {n: metrics["models"][n]["classes"] for n in test_tables}
            parts.append("<h2>ROC curves</h2>")
            # Models with the same number of classes can share panels; draw each group separately.
            by_k: dict[int, list[str]] = {}
            for n in test_tables:
                by_k.setdefault(len(classes[n]), []).append(n)
            for group in by_k.values():
                parts.append(_img(plots.roc_figure({n: test_tables[n] for n in group}, classes), "ROC curves",
                                  "Patient level, pooled test predictions of the checkpoints chosen on validation."))
            parts.append("<h2>Confusion matrices</h2>")
            matrices = {n: np.asarray(metrics["models"][n]["results"]["patient"]["best"]["test"]["pooled"]["confusion"])
                        for n in test_tables}
            parts.append(_img(plots.confusion_figure(matrices, classes), "confusion matrices",
                              "Patient level, pooled test predictions (checkpoint chosen on validation); rows are "
                              "true classes, columns predictions, shading the fraction of the row."))
        if task == "survival" and test_tables:
            png, pvalues = plots.km_figure(test_tables)
            parts.append("<h2>Kaplan–Meier curves of predicted risk groups</h2>")
            parts.append(_img(png, "Kaplan-Meier curves",
                              "Patients above their fold's median predicted test risk (high risk) against the rest; "
                              "log-rank p-values: " + ", ".join(f"{n} {p:.3g}" for n, p in pvalues.items()) + "."))
            for n, p in pvalues.items():
                metrics["models"][n]["logrank_p"] = None if not math.isfinite(p) else p
        parts.append(f"<h2>Learning curves ({task})</h2>")
        parts.append(_img(plots.learning_figure({n: tables[n]["logs"] for n in names}), "learning curves",
                          "Training and validation loss per epoch, one thin line per fold, bold the mean."))
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>wsi2dmamba report</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_STYLE}</style></head>'
            f'<body>{"".join(parts)}</body></html>\n')
    rows = []
    for name, m in metrics["models"].items():
        for ckpt in CHECKPOINTS:
            for r in clam_summary_rows(m, ckpt):
                rows.append({**r, "model": name, "checkpoint": ckpt})
    clam_first = ["folds", "test_auc", "val_auc", "test_acc", "val_acc"]
    summary = pd.DataFrame(rows)
    summary = summary[[c for c in clam_first if c in summary.columns]
                      + [c for c in summary.columns if c not in clam_first]]
    write_text_atomic(out_dir / "summary.csv", summary.to_csv(index=False))
    write_json_atomic(out_dir / "metrics.json", metrics)
    write_text_atomic(out_dir / "index.html", page)
    return out_dir / "index.html"
