"""The real-tissue arrangement cohort (:mod:`wsi2dmamba.demo.arrangement`): build it, probe it, and
choose and check the 2D models' defaults on it.

    # encode the tile pool once (real encoder, real tiles) and measure how well one tile tells the kinds apart
    python benchmarks/arrangement_cohort.py pool --out runs/arrangement --seed 0
    python benchmarks/arrangement_cohort.py probe --pool runs/arrangement/pool_seed0.npy
    # how much of the label the features carry (a detector that is told the marked tissue's direction)
    python benchmarks/arrangement_cohort.py oracle --pool runs/arrangement/pool_seed0.npy
    # write the cohort as grid files + manifest (then `wsi2dmamba train` works on it as on any cohort)
    python benchmarks/arrangement_cohort.py write --pool runs/arrangement/pool_seed0.npy --out runs/arrangement
    # the settings study: tune on the tuning cohort (seed 1), freeze, check on the development cohort (seed 0)
    python benchmarks/arrangement_cohort.py study --work /tmp/study --out results/ --jobs 15 --device cuda
    # check a setting chosen elsewhere (the long-range development seed's batched recipe) with presets
    python benchmarks/arrangement_cohort.py study --chosen batched --models 2dmambamil:4corners,m2dmil:2blocks \
        --skip-published --work /tmp/study --out results/ --jobs 15 --device cuda

``study`` runs two stages in worker processes (one fold of one model per task):

1. **tune**: every setting of :data:`VARIANTS` for both 2D models on the tuning cohort (``--tune-seed``,
   ``--tune-folds`` folds). The setting with the highest mean *validation* AUC over both models and all
   folds is chosen (test folds are never looked at).
2. **check**: on the development cohort (``--seed``, 5 folds), the chosen setting and the published one
   for both 2D models, and ``cnn2d`` (when registered), ``abmil`` and ``meanpool`` with their defaults;
   and, if ``--demo`` is given, both 2D models with both settings on the demo's classification task.

It writes ``results.csv`` (one row per fold: validation and test AUC), ``curves.csv`` (every fold's
``log.csv``: training loss and validation AUC by epoch), ``selection.json`` and ``summary.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import sys
import time
from functools import lru_cache
from pathlib import Path

import numpy as np

# Every knob a setting of the study decides, spelled out in full, so that a setting does not depend on
# the library's defaults of the day. "published" is the 2D models' recipe before this study.
KNOBS = ("lr", "warmup_epochs", "batch_size", "input_norm", "dt_range", "pad_token_init", "dropout")
PUBLISHED = {"lr": 1e-4, "warmup_epochs": 0.0, "batch_size": 1, "input_norm": False, "dt_range": (0.001, 0.1),
             "pad_token_init": "uniform", "dropout": 0.25}
ALL = {"lr": 3e-4, "warmup_epochs": 1.0, "input_norm": True, "dt_range": (0.01, 1.0), "pad_token_init": "zeros",
       "dropout": 0.1}
VARIANTS = {
    "published": PUBLISHED,
    "lr3e-4": {**PUBLISHED, "lr": 3e-4, "warmup_epochs": 1.0},
    "input_norm": {**PUBLISHED, "input_norm": True},
    "dt_0.01-1": {**PUBLISHED, "dt_range": (0.01, 1.0)},
    "pad0_drop0.1": {**PUBLISHED, "pad_token_init": "zeros", "dropout": 0.1},
    "all": ALL,
    "all_lr1e-4": {**ALL, "lr": 1e-4, "warmup_epochs": 0.0},
    "all_lr1e-3": {**ALL, "lr": 1e-3},
    # the recipe chosen on the demo's long-range development seed (pipelines/long-range-demo.toml)
    "batched": {**PUBLISHED, "lr": 2e-3, "warmup_epochs": 4.0, "batch_size": 16},
}
SSM_MODELS = ("2dmambamil", "m2dmil")
SPLIT_FOLDS = 5
TRAIN_KNOBS = ("lr", "warmup_epochs", "batch_size")


def is_ssm(model_key: str) -> bool:
    """Whether a model key (preset included) names one of the 2D models, which take a setting's model knobs."""
    return model_key.partition(":")[0] in SSM_MODELS


def split_knobs(setting: dict) -> tuple[dict, dict]:
    """(training options, model options) of a setting."""
    train = {k: setting[k] for k in TRAIN_KNOBS if k in setting}
    model = {k: (list(v) if isinstance(v, tuple) else v) for k, v in setting.items() if k not in TRAIN_KNOBS}
    return train, model


# ------------------------------------------------------------------------------------------ cohorts

@lru_cache(maxsize=4)
def arrangement_data(pool_path: str, seed: int, n_slides: int):
    """(cohort, grids) of the arrangement cohort of ``seed`` whose cells take features from the pool file."""
    from wsi2dmamba.cohort.manifest import Cohort, SlideRecord
    from wsi2dmamba.demo.arrangement import (
        LABEL_NAMES,
        ArrangementSpec,
        arrangement_grids,
        draw_arrangement_cohort,
    )

    pool = np.load(pool_path).astype(np.float32)
    spec = ArrangementSpec(n_slides=n_slides, seed=seed, pool_size=pool.shape[1])
    slides = draw_arrangement_cohort(spec)
    cohort = Cohort(tuple(SlideRecord(s.slide_id, None, s.slide_id, LABEL_NAMES[s.label]) for s in slides))
    return cohort, arrangement_grids(slides, pool, spec)


@lru_cache(maxsize=2)
def demo_data(run_dir: str):
    """(cohort, grids) of a demo run whose features were extracted by :func:`prepare_demo`."""
    from wsi2dmamba.cohort import load_cohort
    from wsi2dmamba.training import load_feature_grids

    cohort = load_cohort(Path(run_dir) / "cohort" / "manifest.csv")
    return cohort, load_feature_grids(cohort, Path(run_dir) / "features" / "efficientnet-lite0", progress=False)


def prepare_demo(run_dir: str, workers: int, slides: int | None = None) -> str:
    """Build the demo's classification cohort and run segment → tile → extract on it (no training)."""
    from wsi2dmamba.pipeline.demo import demo_pipelines
    from wsi2dmamba.features import extract_cohort
    from wsi2dmamba.pipeline.runner import _load_cohort
    from wsi2dmamba.tiling import tile_cohort
    from wsi2dmamba.tissue.stage import segment_cohort

    config = demo_pipelines(run_dir, tasks=("classification",), workers=workers, slides=slides)[0]
    out = Path(run_dir)
    cohort = _load_cohort(config, out, progress=False)
    segment_cohort(cohort, out, config.option("segment"), workers=workers, progress=False)
    tile_cohort(cohort, out, config.option("tile"), workers=workers, progress=False)
    extract_cohort(cohort, out, config.option("extract"), progress=False)
    return run_dir


# ------------------------------------------------------------------------------------------- one task

def fold_auc(fold_dir: Path, partition: str) -> float:
    """AUC of the best checkpoint on one partition of a finished fold."""
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    p = pd.read_csv(fold_dir / "predictions.csv")
    p = p[(p.checkpoint == "best") & (p.partition == partition)]
    return float(roc_auc_score(p.target, p.prob_1)) if p.target.nunique() == 2 else float("nan")


def run_task(task: dict) -> dict:
    """Train one fold of one (cohort, setting, model); returns its result row (never raises)."""
    import torch

    from wsi2dmamba.training import TrainConfig, make_splits, resolve_splits, train_fold

    row = {k: task[k] for k in ("stage", "cohort", "variant", "model", "fold")}
    if time.time() > task["deadline"]:
        return {**row, "status": "skipped (deadline)"}
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        if task["cohort"] == "demo":
            cohort, grids = demo_data(task["demo_dir"])
        else:
            cohort, grids = arrangement_data(task["pool"], task["seed"], task["n_slides"])
        config = TrainConfig(task="classification", folds=task["folds"], epochs=task["epochs"], device=task["device"],
                             seed=0, **task["train"])
        split = resolve_splits(make_splits(cohort, task["folds"], 0, "classification", config.val_fraction),
                               cohort)[0][task["fold"]]
        fold_dir = Path(task["work"]) / task["stage"] / task["cohort"] / task["variant"] / task["model"] / \
            f"fold_{task['fold']}"
        name, _, preset = task["model"].partition(":")
        res = train_fold(split, cohort, grids, fold_dir, name, config, model_overrides=task["model_options"],
                         preset=preset or None, progress=False)
        row.update(status="ok", best_epoch=res.best_epoch, val_auc=fold_auc(fold_dir, "val"),
                   test_auc=fold_auc(fold_dir, "test"), seconds=time.perf_counter() - t0, fold_dir=str(fold_dir))
    except Exception as exc:  # noqa: BLE001 - a study records a failed fold and goes on
        row.update(status=f"failed: {type(exc).__name__}: {exc}"[:300], seconds=time.perf_counter() - t0)
    return row


def make_tasks(stage: str, cohort: str, variant: str, models, folds: int, args, setting: dict | None,
               epochs: int, deadline: float, train: dict | None = None) -> list[dict]:
    """Tasks of ``models`` × the first ``folds`` folds of 5-fold splits, fold-major (with a deadline, every
    model gets its first folds)."""
    train_opts, model_options = split_knobs(setting) if setting else ({}, {})
    train = train_opts if train is None else train
    return [{"stage": stage, "cohort": cohort, "variant": variant, "model": m, "fold": k, "folds": SPLIT_FOLDS,
             "epochs": epochs, "train": train, "model_options": model_options if is_ssm(m) else {},
             "seed": args.tune_seed if stage == "tune" else args.seed, "n_slides": args.slides, "pool": args.pool,
             "demo_dir": str(Path(args.work) / "demo"), "work": args.work, "device": args.device,
             "deadline": deadline}
            for k in range(folds) for m in models]


# ------------------------------------------------------------------------------------------ the study

def choose(rows: list[dict]) -> tuple[str, dict]:
    """The tuning setting with the highest mean validation AUC over both 2D models and their folds."""
    means = {}
    for v in VARIANTS:
        vals = [r["val_auc"] for r in rows if r["variant"] == v and r.get("status") == "ok"]
        if vals:
            means[v] = float(np.nanmean(vals))
    if not means:  # no tuning fold finished: keep the published setting
        return "published", means
    best = max(means, key=lambda v: (means[v], -list(VARIANTS).index(v)))
    return best, means


def group_line(key: tuple, g) -> str:
    """One row of the summary table: a (stage, cohort, setting, model) group of folds."""
    g = g.sort_values("fold")
    sd = g.test_auc.std(ddof=1) if len(g) > 1 else 0.0
    per_fold = " ".join(f"{v:.2f}" for v in g.test_auc)
    return f"| {' | '.join(key)} | {len(g)} | {g.val_auc.mean():.3f} | {g.test_auc.mean():.3f} ± {sd:.3f} | {per_fold} |"


def summary_md(rows: list[dict], selection: dict) -> str:
    import pandas as pd

    df = pd.DataFrame([r for r in rows if r.get("status") == "ok"])
    lines = [f"chosen setting: {selection.get('chosen')} = {json.dumps(selection.get('setting'))}", "",
             "| stage | cohort | setting | model | folds | val AUC mean | test AUC mean ± sd | per fold |",
             "|---|---|---|---|---|---|---|---|"]
    if len(df):
        lines += [group_line(k, g) for k, g in df.groupby(["stage", "cohort", "variant", "model"], sort=False)]
    bad = [f"- {r['stage']} {r['cohort']} {r['variant']} {r['model']} fold {r['fold']}: {r['status']}"
           for r in rows if r.get("status") != "ok"]
    return "\n".join(lines + ([""] + [f"{len(bad)} task(s) not done:"] + bad if bad else [])) + "\n"


def write_outputs(out: Path, rows: list[dict], selection: dict) -> None:
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out / "results.csv", index=False)
    curves = []
    for r in rows:
        log = Path(r.get("fold_dir", "")) / "log.csv"
        if r.get("status") == "ok" and log.is_file():
            c = pd.read_csv(log)
            for k in ("stage", "cohort", "variant", "model", "fold"):
                c.insert(0, k, r[k])
            curves.append(c)
    if curves:
        pd.concat(curves).to_csv(out / "curves.csv", index=False)
    (out / "selection.json").write_text(json.dumps(selection, indent=1))
    (out / "summary.md").write_text(summary_md(rows, selection))


def run_all(pool, tasks: list[dict], rows: list[dict], out: Path, selection: dict) -> None:
    """Run ``tasks`` on ``pool`` in order, appending each result to ``rows`` and rewriting the outputs as
    each one finishes (a study stopped from outside keeps what it finished)."""
    for row in pool.imap_unordered(run_task, tasks, chunksize=1):
        rows.append(row)
        print(f"{row['stage']} {row['cohort']} {row['variant']} {row['model']} fold {row['fold']}: "
              f"{row.get('status')} val {row.get('val_auc', float('nan')):.3f} test {row.get('test_auc', float('nan')):.3f} "
              f"({row.get('seconds', 0):.0f} s)", flush=True)
        write_outputs(out, rows, selection)


def check_tasks(chosen: str, baselines: list[str], args, deadline: float) -> list[dict]:
    """The check stage's tasks on the arrangement cohort, in order of need: the chosen setting, the CNN it
    must match, the published setting, the composition-only baselines. The baselines train with the chosen
    training options (learning rate, warm-up) and their own model defaults: one recipe for every model."""
    chosen_train = split_knobs(VARIANTS[chosen])[0]
    models = tuple(args.models.split(",")) if args.models else SSM_MODELS
    tasks = make_tasks("check", "arrangement", chosen, models, 5, args, VARIANTS[chosen], args.epochs, deadline)
    tasks += make_tasks("check", "arrangement", "defaults", [m for m in baselines if m == "cnn2d"], 5, args, None,
                        args.epochs, deadline, train=chosen_train)
    if chosen != "published" and not args.skip_published:
        tasks += make_tasks("check", "arrangement", "published", SSM_MODELS, 5, args, PUBLISHED, args.epochs, deadline)
    tasks += make_tasks("check", "arrangement", "defaults", [m for m in baselines if m != "cnn2d"], 5, args, None,
                        args.epochs, deadline, train=chosen_train)
    return tasks


def tune_stage(pool, args, rows: list[dict], deadline: float) -> dict:
    """Run the tuning stage (unless ``--chosen`` names a setting) and return the selection."""
    if args.chosen:
        return {"rule": "given (--chosen)", "chosen": args.chosen, "setting": VARIANTS[args.chosen]}
    variants = {v: VARIANTS[v] for v in (args.variants.split(",") if args.variants else VARIANTS)}
    tasks = [t for v, s in variants.items()
             for t in make_tasks("tune", "arrangement", v, SSM_MODELS, args.tune_folds, args, s, args.epochs, deadline)]
    tasks.sort(key=lambda t: t["fold"])  # fold 0 of every setting first
    selection: dict = {"rule": "highest mean validation AUC over both 2D models and the tuning folds"}
    run_all(pool, tasks, rows, Path(args.out), selection)
    chosen, means = choose(rows)
    selection.update(chosen=chosen, setting=VARIANTS[chosen], mean_val_auc=means)
    return selection


def study(args) -> None:
    from wsi2dmamba.models import list_models

    t_start = time.time()
    deadline = t_start + args.budget_s
    ctx = mp.get_context("spawn")
    baselines = [m for m in ("cnn2d", "abmil", "meanpool") if m in list_models()]
    rows: list[dict] = []
    # segment, tile and extract start worker processes of their own: not from a (daemonic) pool worker
    demo_job = ctx.Process(target=prepare_demo, args=(str(Path(args.work) / "demo"), 4, args.demo_slides)) \
        if args.demo else None
    if demo_job is not None:
        demo_job.start()
    with ctx.Pool(args.jobs) as pool:
        selection = tune_stage(pool, args, rows, t_start + args.tune_budget_s)
        chosen = selection["chosen"]
        print(f"chosen: {selection}", flush=True)
        check = check_tasks(chosen, baselines, args, deadline)
        if demo_job is not None:
            demo_job.join(timeout=max(1.0, deadline - time.time()))
            print(f"demo preparation exit code: {demo_job.exitcode}", flush=True)
            if demo_job.exitcode == 0:
                check += [t for v in dict.fromkeys((chosen, "published"))
                          for t in make_tasks("check", "demo", v, SSM_MODELS, 5, args, VARIANTS[v], args.demo_epochs,
                                              deadline)]
        run_all(pool, check, rows, Path(args.out), selection)
    selection["seconds"] = time.time() - t_start
    write_outputs(Path(args.out), rows, selection)
    print(summary_md(rows, selection), flush=True)


# ------------------------------------------------------------------------------------ other commands

def cmd_pool(args) -> None:
    from wsi2dmamba.demo.arrangement import ArrangementSpec, encode_tile_pool

    spec = ArrangementSpec(seed=args.seed, pool_size=args.pool_size)
    pool = encode_tile_pool(spec, device=args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / f"pool_seed{args.seed}.npy", pool.astype(np.float16))
    (out / f"pool_seed{args.seed}.json").write_text(json.dumps(spec.to_dict(), indent=1))


def cmd_probe(args) -> None:
    """5-fold cross-validated AUC of a logistic model telling one marked tile from one background tile."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import cross_val_predict

    pool = np.load(args.pool).astype(np.float32)
    x = pool.reshape(-1, pool.shape[-1])
    y = np.repeat([0, 1], pool.shape[1])
    p = cross_val_predict(LogisticRegression(C=1e-3, max_iter=3000), x, y, cv=5, method="predict_proba")[:, 1]
    print(json.dumps({"tiles_per_kind": int(pool.shape[1]), "probe_auc": round(float(roc_auc_score(y, p)), 4)}))


def cmd_oracle(args) -> None:
    """How much of the label the features carry: AUC of a detector that knows the marked tissue's direction.

    Each cell is scored by its feature vector's projection on the difference of the pool's two kind means
    (z-scored within the slide); a slide's score is the best sum over a straight run of ``marked[0]`` cells.
    No trained model should be expected to beat it; a model of composition only (the slide's mean score)
    stays at chance.
    """
    from sklearn.metrics import roc_auc_score

    from wsi2dmamba.demo.arrangement import (
        ArrangementSpec,
        arrangement_grids,
        draw_arrangement_cohort,
    )

    pool = np.load(args.pool).astype(np.float32)
    spec = ArrangementSpec(n_slides=args.slides, seed=args.seed, pool_size=pool.shape[1])
    w = pool[1].mean(0) - pool[0].mean(0)
    slides = draw_arrangement_cohort(spec)
    grids = arrangement_grids(slides, pool, spec)
    n = spec.marked[0]
    labels, runs, means = [], [], []
    for s in slides:
        f, m = grids[s.slide_id].dense()
        score = np.full(m.shape, np.nan)
        score[m] = f[m].astype(np.float32) @ w
        z = np.nan_to_num((score - np.nanmean(score)) / np.nanstd(score), nan=-5.0)
        view = np.lib.stride_tricks.sliding_window_view
        runs.append(max(view(z, n, axis=1).sum(-1).max(), view(z, n, axis=0).sum(-1).max()))
        means.append(np.nanmean(score))
        labels.append(s.label)
    kinds = np.concatenate([s.cells[s.cells != 0] for s in slides])
    cells = np.concatenate([grids[s.slide_id].features.astype(np.float32) @ w for s in slides])
    print(json.dumps({"cell_auc": round(float(roc_auc_score(kinds == 2, cells)), 3),
                      f"best_run_of_{n}_auc": round(float(roc_auc_score(labels, runs)), 3),
                      "slide_mean_auc": round(float(roc_auc_score(labels, means)), 3)}))


def cmd_scan_gain(args) -> None:
    """At initialisation, the size of the 2DMamba scan's C·h term against the skip term D·u on cohort slides,
    and how much C·h follows the number of tissue cells above-left of a cell, for several step ranges."""
    import torch

    from wsi2dmamba import ops
    from wsi2dmamba.demo.arrangement import (
        ArrangementSpec,
        arrangement_grids,
        draw_arrangement_cohort,
    )
    from wsi2dmamba.models import create
    from wsi2dmamba.models.batch import GridBatch
    from wsi2dmamba.models.grid_layout import GridLayout

    pool = np.load(args.pool).astype(np.float32)
    spec = ArrangementSpec(n_slides=args.slides, seed=args.seed, pool_size=pool.shape[1])
    slides = draw_arrangement_cohort(spec)
    grids = arrangement_grids(slides, pool, spec)
    batch = GridBatch.from_grids([grids[s.slide_id] for s in slides])
    tissue = batch.tissue
    above_left = tissue.float().cumsum(1).cumsum(2)[tissue].numpy()
    for dt_range in ((0.001, 0.1), (0.01, 1.0), (0.1, 1.0)):
        torch.manual_seed(0)
        model = create("2dmambamil", in_dim=pool.shape[-1], n_classes=2, dt_range=dt_range).eval()
        with torch.no_grad():
            layout = GridLayout.from_batch(batch)
            x = model.blocks[0].norm(model.cells(batch))
            block, params = model.blocks[0].mixer, model.blocks[0].mixer.scans[0]
            u = block._scan_input(x, layout, slice(None))
            dt_low, b, c = params.project(u).split([params.dt_rank, params.d_state, params.d_state], 1)
            dt = torch.einsum("er,brhw->behw", params.dt_proj.weight, dt_low)
            y = ops.selective_scan_2d(u, dt, -torch.exp(params.A_log), b, c, None, None, params.dt_proj.bias,
                                      backend="torch")
        ch, du = y.pow(2).mean(1)[tissue].sqrt().numpy(), u.pow(2).mean(1)[tissue].sqrt().numpy()
        print(json.dumps({"dt_range": dt_range, "rms_ch_over_rms_du": round(float(ch.mean() / du.mean()), 3),
                          "corr_ch_tissue_above_left": round(float(np.corrcoef(ch, above_left)[0, 1]), 2)}))


def cmd_write(args) -> None:
    from wsi2dmamba.demo.arrangement import ArrangementSpec, write_arrangement_cohort

    pool = np.load(args.pool).astype(np.float32)
    spec = ArrangementSpec(n_slides=args.slides, seed=args.seed, pool_size=pool.shape[1])
    print(write_arrangement_cohort(args.out, spec, pool))


def cmd_check_pixels(args) -> None:
    """Render a few slides from the pool tiles, run segment → tile → extract on them, and compare the
    extracted features with the ones the cohort gives their cells."""
    from wsi2dmamba.cohort import load_cohort
    from wsi2dmamba.demo.arrangement import (
        ArrangementSpec,
        draw_arrangement_cohort,
        render_arrangement,
        slide_feature_grid,
    )
    from wsi2dmamba.demo.mosaic import MOSAIC_MPP, write_pyramidal_tiff
    from wsi2dmamba.pipeline.demo import demo_pipelines
    from wsi2dmamba.features import extract_cohort
    from wsi2dmamba.grid import read_feature_grid
    from wsi2dmamba.tiling import tile_cohort
    from wsi2dmamba.tissue.stage import segment_cohort

    pool = np.load(args.pool).astype(np.float32)
    spec = ArrangementSpec(n_slides=args.slides, seed=args.seed, side=(args.side, args.side), marked=(3, 4),
                           pool_size=pool.shape[1])
    out = Path(args.out)
    (out / "slides").mkdir(parents=True, exist_ok=True)
    slides = draw_arrangement_cohort(spec)
    lines = ["slide_id,path,label"]
    for i, s in enumerate(slides):
        write_pyramidal_tiff(out / "slides" / f"{s.slide_id}.tiff", render_arrangement(s, i, spec), MOSAIC_MPP,
                             quality=args.quality)
        lines.append(f"{s.slide_id},slides/{s.slide_id}.tiff,{s.label}")
    (out / "manifest.csv").write_text("\n".join(lines) + "\n")
    cohort = load_cohort(out / "manifest.csv")
    config = demo_pipelines(out, tasks=("classification",), workers=args.workers)[0]
    segment_cohort(cohort, out, config.option("segment"), workers=args.workers, progress=False)
    tile_cohort(cohort, out, config.option("tile"), workers=args.workers, progress=False)
    extract_cohort(cohort, out, config.option("extract").model_copy(update={"device": args.device}), progress=False)
    report = []
    for i, s in enumerate(slides):
        made = slide_feature_grid(s, i, pool, spec)
        got = read_feature_grid(out / "features" / "efficientnet-lite0" / f"{s.slide_id}.h5")
        same_cells = np.array_equal(made.mask, got.mask)
        a, b = made.features.astype(np.float32), got.features.astype(np.float32)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)) if same_cells else np.array([])
        report.append({"slide_id": s.slide_id, "grid": list(got.shape), "same_tissue_cells": same_cells,
                       "cells": len(a), "cosine_min": float(cos.min()) if cos.size else None,
                       "cosine_mean": float(cos.mean()) if cos.size else None,
                       "relative_l2_mean": float((np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)).mean())
                       if same_cells else None})
    print(json.dumps(report, indent=1))


def cmd_curves(args) -> None:
    """Per-fold training loss and validation AUC of each model of a run (its ``log.csv`` files), one column each;
    a fold trained with restarts draws each restart (dashed after the first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    models = args.models.split(",")
    fig, axes = plt.subplots(2, len(models), figsize=(3.6 * len(models), 5.6), squeeze=False, sharex=True)
    for col, model in enumerate(models):
        for fold_dir in sorted((Path(args.run) / "train" / model).glob("fold_*")):
            # A fold trained with restarts: every restart's curve, solid for the first seed, dashed after.
            logs = sorted(fold_dir.glob("restart_*/log.csv")) or [fold_dir / "log.csv"]
            colour = f"C{int(fold_dir.name.split('_')[1]) % 10}"
            for r, log in enumerate(p for p in logs if p.is_file()):
                table = pd.read_csv(log)
                label = fold_dir.name.replace("_", " ") if r == 0 else None
                style = {"color": colour, "lw": 1, "ls": "-" if r == 0 else (0, (3, 1 + r))}
                axes[0, col].plot(table.epoch, table.train_loss, label=label, **style)
                axes[1, col].plot(table.epoch, table.val_auc, **style)
        axes[0, col].set_title(model, fontsize=9)
        axes[0, col].axhline(math.log(2), color="grey", lw=0.8, ls="--")
        axes[1, col].axhline(0.5, color="grey", lw=0.8, ls="--")
        axes[1, col].set_xlabel("epoch")
    axes[0, 0].set_ylabel("training loss")
    axes[1, 0].set_ylabel("validation AUC")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pool")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pool-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p = sub.add_parser("probe")
    p.add_argument("--pool", required=True)
    p = sub.add_parser("oracle")
    p.add_argument("--pool", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slides", type=int, default=240)
    p = sub.add_parser("scan-gain")
    p.add_argument("--pool", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slides", type=int, default=4)
    p = sub.add_parser("write")
    p.add_argument("--pool", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slides", type=int, default=240)
    p = sub.add_parser("check-pixels")
    p.add_argument("--pool", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slides", type=int, default=2)
    p.add_argument("--side", type=int, default=8, help="grid side before cropping to the tissue")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of the rendered slides")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--device", default="auto")
    p = sub.add_parser("study")
    p.add_argument("--pool", required=True, help="pool file (the pool of the cohorts' seed 0 serves both cohorts)")
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0, help="development cohort (checked)")
    p.add_argument("--tune-seed", type=int, default=1, help="tuning cohort (settings chosen on it)")
    p.add_argument("--tune-folds", type=int, default=3)
    p.add_argument("--slides", type=int, default=240)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--demo-epochs", type=int, default=30)
    p.add_argument("--demo", action="store_true", help="also check on the demo's classification task")
    p.add_argument("--demo-slides", type=int, default=None, help="demo slides (default: the demo's)")
    p.add_argument("--chosen", default="", help="skip tuning and check this setting")
    p.add_argument("--variants", default="", help="comma-separated settings to tune over (default: all)")
    p.add_argument("--models", default="", help="2D model keys the check stage runs with the chosen setting "
                   "(default: 2dmambamil,m2dmil; presets allowed, e.g. 2dmambamil:4corners)")
    p.add_argument("--skip-published", action="store_true", help="check stage: leave out the published setting")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--budget-s", type=float, default=3600.0)
    p.add_argument("--tune-budget-s", type=float, default=1800.0)
    p = sub.add_parser("curves")
    p.add_argument("--run", required=True, help="run folder whose RUN/train/<model>/fold_*/log.csv are drawn")
    p.add_argument("--models", required=True, help="comma-separated model folders")
    p.add_argument("--out", required=True, help="PNG file")
    args = ap.parse_args(argv)
    {"curves": cmd_curves, "pool": cmd_pool, "probe": cmd_probe, "write": cmd_write, "oracle": cmd_oracle, "scan-gain": cmd_scan_gain, "check-pixels": cmd_check_pixels,
     "study": study}[args.cmd](args)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
