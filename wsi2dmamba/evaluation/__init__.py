"""Metrics, bootstrap intervals, the run report and attention heatmaps.

>>> from wsi2dmamba.evaluation import evaluate_run, write_report, heatmap
>>> metrics = evaluate_run("runs/x")            # per fold, mean ± std, pooled with 95 % CIs
>>> write_report("runs/x")                       # runs/x/report/index.html
>>> heatmap("runs/x", "abmil", "slide_42")      # runs/x/heatmaps/abmil/slide_42.png and .geojson
"""

from .evaluate import evaluate_model, evaluate_run, format_summary, summary_table
from .heatmap import heatmap
from .metrics import auc_score, classification_metrics, survival_metrics
from .report import write_report

__all__ = [
    "auc_score",
    "classification_metrics",
    "evaluate_model",
    "evaluate_run",
    "format_summary",
    "heatmap",
    "summary_table",
    "survival_metrics",
    "write_report",
]
