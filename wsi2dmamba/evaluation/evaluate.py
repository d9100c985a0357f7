"""Metrics of every model trained in a run: per fold, mean ± std over folds, and pooled, with bootstrap CIs.

For each model folder ``RUN/train/<name>/`` the complete folds' ``predictions.csv`` are read, and the
metrics are computed

* at two levels: per slide, and per patient (the mean of the patient's slide probabilities or risks);
* for both checkpoints: ``best`` (chosen on validation) and ``last`` (the last epoch), labelled;
* on the test partition (and on validation, for reference; it is optimistic for ``best``).

``pooled`` concatenates the test predictions of all folds (every patient once); its 95 % interval is a
patient-level bootstrap. Each fold's interval is a bootstrap of that fold's test partition.

A fold **failed** when its checkpoint is at chance on its own validation partition: patient-level AUC
(classification) or Harrell's C-index (survival) ≤ :data:`FAILED_FOLD_THRESHOLD`. Only validation decides
it, so counting failures looks at no test result. Splits without a test partition (published survival
splits) are summarised on validation instead, labelled so.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import run_layout as layout
from ..errors import StageInputError
from ..fileio import ensure_writable, write_json_atomic, write_text_atomic
from .bootstrap import bootstrap_counts, percentile_interval, weighted_c_index, weighted_classification
from .metrics import CLASSIFICATION_METRICS, SURVIVAL_METRICS, classification_metrics, survival_metrics

LEVELS = ("slide", "patient")
CHECKPOINTS = ("best", "last")
#: A fold whose validation AUC / C-index (patient level) is at most this is counted as failed.
FAILED_FOLD_THRESHOLD = 0.55
FAILED_FOLD_METRIC = {"classification": "auc", "survival": "c_index"}


def model_dirs(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Folders ``RUN/train/<name>`` that hold at least one complete fold."""
    root = layout.train_dir(run_dir)
    if not root.is_dir():
        return []
    done = f"{layout.fold_glob()}/{layout.FOLD_DONE}"
    return sorted(d for d in root.iterdir() if d.is_dir() and any(d.glob(done)))


def complete_folds(model_dir: Path) -> list[Path]:
    """``fold_<k>`` folders of a model with ``done.json``, in fold order."""
    folds = [d for d in model_dir.glob(layout.fold_glob())
             if layout.fold_index(d) is not None and layout.fold_file(d, layout.FOLD_DONE).is_file()]
    return sorted(folds, key=layout.fold_index)


def read_fold(fold_dir: Path) -> tuple[dict[str, Any], Any]:
    """(config.json, predictions DataFrame) of a complete fold.

    Raises:
        StageInputError: the fold's files do not belong together (from different jobs or configurations, or
            changed since training wrote them); the message names the fold and each file.
    """
    import pandas as pd

    from ..cohort.verify import fold_problems

    problems = fold_problems(fold_dir)
    if problems:
        k = layout.fold_index(fold_dir)
        raise StageInputError(
            f"{fold_dir.parent.name} fold {k} ({fold_dir}) is not one training run's output, so its metrics would "
            "mix runs: " + "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            + f". Retrain it (wsi2dmamba train … --name {fold_dir.parent.name} --fold {k} --force), or move the "
            "folder away to evaluate the other folds.")
    config = json.loads(layout.fold_file(fold_dir, layout.FOLD_CONFIG).read_text())
    preds = pd.read_csv(layout.fold_file(fold_dir, layout.FOLD_PREDICTIONS), dtype={"slide_id": str, "patient_id": str, "label": str})
    return config, preds


def aggregate_patients(df: Any, task: str) -> Any:
    """One row per (fold, checkpoint, partition, patient): mean probabilities / risk / survival."""
    keys = ["fold", "checkpoint", "partition", "patient_id"]
    value_cols = [c for c in df.columns if c.startswith(("prob_", "surv_")) or c == "risk"]
    first_cols = [c for c in ("time", "event", "bin", "label", "target", "epoch") if c in df.columns]
    agg = {**dict.fromkeys(value_cols, "mean"), **dict.fromkeys(first_cols, "first"), "slide_id": "count"}
    out = df.groupby(keys, sort=True, as_index=False).agg(agg).rename(columns={"slide_id": "n_slides"})
    if task == "classification":
        probs = out[[c for c in out.columns if c.startswith("prob_")]].to_numpy()
        out["pred"] = probs.argmax(axis=1)
    return out


def _prob_matrix(df: Any) -> np.ndarray:
    cols = sorted((c for c in df.columns if c.startswith("prob_")), key=lambda c: int(c.split("_")[1]))
    return df[cols].to_numpy(np.float64)


def _surv_matrix(df: Any) -> np.ndarray:
    cols = sorted((c for c in df.columns if c.startswith("surv_")), key=lambda c: int(c.split("_")[1]))
    return df[cols].to_numpy(np.float64)


def _point_metrics(df: Any, task: str, fold_cfgs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    if task == "classification":
        return classification_metrics(df["target"].to_numpy(), _prob_matrix(df))
    folds = df["fold"].to_numpy()
    ends = np.stack([np.asarray(fold_cfgs[int(f)]["bin_ends"], np.float64) for f in folds]) if len(df) else None
    train_t, train_e = training_survival([fold_cfgs[int(k)] for k in np.unique(folds)])
    return survival_metrics(df["time"].to_numpy(), df["event"].to_numpy(), df["risk"].to_numpy(),
                            surv=_surv_matrix(df), bin_ends=ends, train_time=train_t, train_event=train_e)


def training_survival(fold_cfgs: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """(time, event) of the training patients of the given folds, each patient once: the data of the
    censoring estimate. For one fold, its training partition; pooled over folds, every patient that some
    fold trained on (runs that recorded no patient ids give each fold's list as it is)."""
    time: dict[Any, float] = {}
    event: dict[Any, int] = {}
    for i, cfg in enumerate(fold_cfgs):
        ts = cfg["train_survival"]
        ids = ts.get("patient_id") or [(i, j) for j in range(len(ts["time"]))]
        for pid, t, e in zip(ids, ts["time"], ts["event"]):
            time.setdefault(pid, float(t))
            event.setdefault(pid, int(e))
    return np.fromiter(time.values(), np.float64, len(time)), np.fromiter(event.values(), np.int64, len(event))


def _intervals(df: Any, task: str, n_boot: int, seed: int) -> dict[str, list[float]]:
    if n_boot <= 0 or len(df) < 2:
        return {}
    counts = bootstrap_counts(df["patient_id"].to_numpy(), n_boot, seed)
    if task == "classification":
        reps = weighted_classification(df["target"].to_numpy(), _prob_matrix(df), counts)
    else:
        reps = {"c_index": weighted_c_index(df["time"].to_numpy(), df["event"].to_numpy(),
                                            df["risk"].to_numpy(), counts)}
    return {m: list(percentile_interval(v)) for m, v in reps.items()}


def _clean(value: Any) -> Any:
    """JSON-able: NaN → None, numpy scalars → Python."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _partition_entry(sub: Any, task: str, configs: dict[int, dict[str, Any]], with_ci: bool, n_boot: int,
                     seed: int) -> dict[str, Any]:
    """``folds`` (per-fold metrics, with CIs when ``with_ci``), ``mean`` and ``std`` over folds, and ``pooled``."""
    names = SURVIVAL_METRICS if task == "survival" else CLASSIFICATION_METRICS
    per_fold = []
    for k, g in sub.groupby("fold", sort=True):
        m = _point_metrics(g, task, configs)
        if with_ci:
            m["ci"] = _intervals(g, task, n_boot, seed + int(k))
        per_fold.append({"fold": int(k), "epoch": int(g["epoch"].iloc[0]), **m})
    values = {n: np.array([f[n] for f in per_fold], np.float64) for n in names}
    pooled = _point_metrics(sub, task, configs)
    if with_ci:
        pooled["ci"] = _intervals(sub, task, n_boot, seed)
    return {
        "folds": per_fold,
        "mean": {n: float(np.nanmean(v)) if np.isfinite(v).any() else math.nan for n, v in values.items()},
        "std": {n: float(np.nanstd(v, ddof=1)) if np.isfinite(v).sum() > 1 else math.nan for n, v in values.items()},
        "pooled": pooled,
    }


def evaluate_model(model_dir: str | os.PathLike[str], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Metrics of one model folder (see the module docstring for what is computed).

    Returns:
        ``{"name", "task", "model", "classes", "select_on", "folds", "incomplete_folds", "results"}`` where
        ``results[level][checkpoint][partition]`` holds ``folds`` (per-fold metrics and CIs), ``mean``,
        ``std`` and ``pooled`` (metrics and ``ci``).
    """
    import pandas as pd

    model_dir = Path(model_dir)
    folds = complete_folds(model_dir)
    if not folds:
        raise StageInputError(f"{model_dir} has no complete fold; run `wsi2dmamba train` first.")
    configs, frames = {}, []
    for d in folds:
        cfg, preds = read_fold(d)
        configs[int(cfg["fold"])] = cfg
        frames.append(preds)
    all_folds = sorted(k for d in model_dir.glob(layout.fold_glob()) if (k := layout.fold_index(d)) is not None)
    first = configs[min(configs)]
    task = first["task"]
    slides = pd.concat(frames, ignore_index=True)
    results: dict[str, Any] = {}
    has_test = bool((slides["partition"] == "test").any())
    for level in LEVELS:
        table = slides if level == "slide" else aggregate_patients(slides, task)
        results[level] = {}
        for ckpt in CHECKPOINTS:
            results[level][ckpt] = {}
            for part in ("test", "val"):
                sub = table[(table["checkpoint"] == ckpt) & (table["partition"] == part)]
                if not sub.empty:
                    # Intervals for the partition the run is summarised on: test, or validation without one.
                    with_ci = part == "test" or not has_test
                    results[level][ckpt][part] = _partition_entry(sub, task, configs, with_ci, n_boot, seed)
    return _clean({
        "name": model_dir.name, "task": task, "model": first["model"].get("model", first.get("model_name")),
        "preset": first.get("preset"), "classes": first.get("classes"), "select_on": first["train"]["select_on"],
        "folds": sorted(configs), "incomplete_folds": sorted(set(all_folds) - set(configs)),
        "n_parameters": first.get("n_parameters"), "train": first["train"], "results": results,
        "failed_folds": {ckpt: failed_folds(results, task, ckpt) for ckpt in CHECKPOINTS},
        "notes": _cohort_notes(slides),
        "restarts": read_restarts(folds),
    })


def _cohort_notes(slides: Any) -> list[str]:
    """Warnings about what the figures mean for this cohort."""
    from ..cohort.manifest import SLIDE_LEVEL_PATIENTS, slide_level_patients

    pairs = dict(zip(slides["slide_id"].astype(str), slides["patient_id"].astype(str)))
    return [SLIDE_LEVEL_PATIENTS] if slide_level_patients(pairs) else []


def failed_folds(results: dict[str, Any], task: str, checkpoint: str = "best") -> dict[str, Any]:
    """The folds at chance on their validation partition (see the module docstring).

    Returns:
        ``{"metric", "threshold", "level", "partition", "folds" (failed), "undefined" (metric not defined,
        e.g. one class in validation), "of" (folds with a validation partition)}``.
    """
    metric = FAILED_FOLD_METRIC[task]
    val = results.get("patient", {}).get(checkpoint, {}).get("val")
    per_fold = val["folds"] if val else []
    values = {int(f["fold"]): f.get(metric) for f in per_fold}
    defined = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}
    return {"metric": metric, "threshold": FAILED_FOLD_THRESHOLD, "level": "patient", "partition": "val",
            "folds": sorted(k for k, v in defined.items() if v <= FAILED_FOLD_THRESHOLD),
            "undefined": sorted(set(values) - set(defined)), "of": len(values)}


def read_restarts(folds: list[Path]) -> dict[str, Any]:
    """fold → ``{"chosen", "restarts"}`` (each restart's seed, chosen epoch and validation figures) for the
    folds trained with ``--restarts``; empty when none was."""
    out = {}
    for d in folds:
        done = json.loads(layout.fold_file(d, layout.FOLD_DONE).read_text())
        if "restarts" in done:
            out[str(layout.fold_index(d))] = {"chosen": done["chosen_restart"], "restarts": done["restarts"]}
    return out


def clam_summary_rows(metrics: dict[str, Any], checkpoint: str = "best") -> list[dict[str, Any]]:
    """Rows of CLAM's ``summary.csv`` (folds, test_auc, val_auc, test_acc, val_acc) for one model,
    slide level, plus the balanced accuracy, F1 and C-index where the task has them."""
    res = metrics["results"]["slide"][checkpoint]
    test = {f["fold"]: f for f in res.get("test", {}).get("folds", [])}
    val = {f["fold"]: f for f in res.get("val", {}).get("folds", [])}
    rows = []
    for k in sorted(set(test) | set(val)):
        t, v = test.get(k, {}), val.get(k, {})
        row: dict[str, Any] = {"folds": k}
        if metrics["task"] == "survival":
            row.update(test_c_index=t.get("c_index"), val_c_index=v.get("c_index"),
                       test_c_index_ipcw=t.get("c_index_ipcw"), test_ibs=t.get("ibs"))
        else:
            row.update(test_auc=t.get("auc"), val_auc=v.get("auc"), test_acc=t.get("accuracy"),
                       val_acc=v.get("accuracy"), test_balanced_acc=t.get("balanced_accuracy"),
                       test_f1=t.get("f1"))
        rows.append(row)
    return rows


def evaluate_run(run_dir: str | os.PathLike[str], n_boot: int = 1000, seed: int = 0,
                 write: bool = True) -> dict[str, Any]:
    """Evaluate every model trained in ``run_dir``.

    Writes ``RUN/eval/metrics.json`` and, per model, CLAM's ``RUN/train/<name>/summary.csv`` (test
    metrics of the checkpoint chosen on validation) when ``write`` is True.

    Raises:
        StageInputError: no model of the run has a complete fold.
    """
    import pandas as pd

    run_dir = Path(run_dir)
    dirs = model_dirs(run_dir)
    from .external import evaluate_external, is_external_run

    if not dirs and is_external_run(run_dir):  # a folder of `predict`: external validation
        return evaluate_external(run_dir, n_boot=n_boot, seed=seed, write=write)
    if not dirs:
        raise StageInputError(f"No trained model in {layout.train_dir(run_dir)}; run `wsi2dmamba train --out {run_dir}` first.")
    if write:
        ensure_writable(layout.eval_dir(run_dir))
    out = {"run": str(run_dir.resolve()), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "n_boot": n_boot,
           "models": {d.name: evaluate_model(d, n_boot, seed) for d in dirs}}
    if write:
        write_json_atomic(layout.eval_metrics(run_dir), out)
        for d in dirs:
            rows = clam_summary_rows(out["models"][d.name])
            write_text_atomic(layout.model_summary(d), pd.DataFrame(rows).to_csv(index=False))
    return out


def summary_partition(model_metrics: dict[str, Any], level: str, checkpoint: str) -> str | None:
    """The partition a model's results are summarised on: ``test``, or ``val`` for splits without a test
    partition (optimistic for the checkpoint chosen on it); None when there is neither."""
    res = model_metrics["results"][level][checkpoint]
    return "test" if "test" in res else ("val" if "val" in res else None)


def summary_table(metrics: dict[str, Any], level: str = "patient") -> list[dict[str, Any]]:
    """One row per (model, checkpoint): test metrics (validation metrics where the splits have no test
    partition; ``partition`` says which) as mean ± std over folds and pooled [95 % CI], and the number of
    failed folds (``failed``, of ``folds``)."""
    rows = []
    for name, m in metrics["models"].items():
        names = SURVIVAL_METRICS if m["task"] == "survival" else CLASSIFICATION_METRICS
        for ckpt in CHECKPOINTS:
            part = summary_partition(m, level, ckpt)
            if part is None:
                continue
            res = m["results"][level][ckpt][part]
            failed = m.get("failed_folds", {}).get(ckpt, {})
            row: dict[str, Any] = {"model": name, "task": m["task"], "checkpoint": ckpt, "partition": part,
                                   "folds": len(res["folds"]), "level": level,
                                   "failed": len(failed.get("folds", [])), "failed_of": failed.get("of")}
            for n in names:
                row[f"{n}_mean"] = res["mean"].get(n)
                row[f"{n}_std"] = res["std"].get(n)
                row[f"{n}_pooled"] = res["pooled"].get(n)
                ci = res["pooled"].get("ci", {}).get(n)
                row[f"{n}_ci_low"], row[f"{n}_ci_high"] = (ci if ci else (None, None))
            row["notes"] = list(res["pooled"].get("notes") or [])
            rows.append(row)
    return rows


def format_summary(metrics: dict[str, Any], level: str = "patient") -> str:
    """Plain-text table of :func:`summary_table` for the terminal."""
    if metrics.get("kind") == "external":
        from .external import format_external

        return format_external(metrics)
    lines = []
    for row in summary_table(metrics, level):
        names = SURVIVAL_METRICS if row["task"] == "survival" else CLASSIFICATION_METRICS
        parts = []
        for n in names:
            mean, std, pooled = row[f"{n}_mean"], row[f"{n}_std"], row[f"{n}_pooled"]
            lo, hi = row[f"{n}_ci_low"], row[f"{n}_ci_high"]
            if mean is None:
                why = [note.split(": ", 1)[-1] for note in row.get("notes", []) if note.lower().startswith(n)]
                parts.append(f"{n} undefined" + (f" ({why[0]})" if why else " (not computable on these folds)"))
                continue
            text = f"{n} {mean:.3f}" + (f" ± {std:.3f}" if std is not None else "")
            if pooled is not None and lo is not None:
                text += f" (pooled {pooled:.3f} [{lo:.3f}, {hi:.3f}])"
            parts.append(text)
        where = "" if row["partition"] == "test" else "VALIDATION (no test partition)  "
        lines.append(f"{row['model']:<20} {row['checkpoint']:<5} {row['folds']} folds, {row['failed']} failed  "
                     + where + "; ".join(parts))
    lines.append(f"A fold failed when its patient-level validation AUC / C-index ≤ {FAILED_FOLD_THRESHOLD}.")
    for name, m in metrics["models"].items():
        lines += [f"warning ({name}): {note}" for note in m.get("notes", [])]
    return "\n".join(lines)
