"""Metrics, bootstrap intervals and the run report (no torch: they read the files that training writes).

>>> from wsi2dmamba.evaluation import evaluate_run, write_report
>>> metrics = evaluate_run("runs/x")            # per fold, mean ± std, pooled with 95 % CIs  # doctest: +SKIP
>>> write_report("runs/x")                       # runs/x/report/index.html  # doctest: +SKIP
"""

from .evaluate import evaluate_model, evaluate_run, format_summary, summary_table
from .metrics import auc_score, classification_metrics, survival_metrics
from .report import write_report

__all__ = [
    "auc_score",
    "classification_metrics",
    "evaluate_model",
    "evaluate_run",
    "format_summary",
    "summary_table",
    "survival_metrics",
    "write_report",
]
