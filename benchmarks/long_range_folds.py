"""A pipeline file's models, every fold side by side on one GPU: the long-range task at full size.

``wsi2dmamba run`` trains one model after another and one fold after another. The long-range task's
models are small (``d_model`` 32 on 13 × 13 grids), so one training leaves a GPU mostly idle; this script
trains every (model, fold) of the pipeline file at once, ``--jobs`` processes at a time, with the file's
own options, into the run folder that ``wsi2dmamba run`` would use. It then evaluates and writes the report.

    python benchmarks/long_range_folds.py pipelines/long-range-demo.toml --out runs/long-range --jobs 15
    python benchmarks/long_range_folds.py pipelines/long-range-demo.toml --out runs/dev --demo-seed 101 \\
        --models m2dmil,2dmambamil:4corners,m2dmil:noscan --restarts 1        # a development check

Steps: (1) the data stages (demo cohort, segment, tile, extract) through ``run_pipeline`` itself, with a
one-epoch mean-pooling model trained into ``RUN/prep`` as its training step; (2) each (model, fold) a
``train_cohort(..., folds_to_run=[k])`` call in a worker process; (3) ``evaluate_run`` and
``write_report`` on the run's training folder. Everything resumes: finished folds are kept, and an
unfinished training continues from its last epoch.

Every run ends by printing one line per (model, fold, restart) — epochs trained, chosen epoch, validation
AUC and test AUC of the chosen checkpoint, the restart each fold kept — and writes the same table to
``<training folder>/restarts-summary.csv``, so the figures survive when the checkpoints cannot be copied
off the machine. ``--summary`` prints it for a run as it stands, unfinished trainings included.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import os
import time
from pathlib import Path


def load(args: argparse.Namespace):
    """The pipeline file's configuration with the command line's changes (seed, models, restarts)."""
    from wsi2dmamba.pipeline import load_pipeline

    config = load_pipeline(args.pipeline)
    update: dict = {"run": config.run.model_copy(update={"out": args.out.resolve(), "workers": args.workers})}
    if args.demo_seed is not None:
        update["demo"] = config.demo.model_copy(update={"seed": args.demo_seed})
    if args.models:
        update["models"] = tuple(args.models.split(","))
    if args.restarts is not None:
        train = config.stage_options["train"].model_copy(update={"restarts": args.restarts})
        update["stage_options"] = {**config.stage_options, "train": train}
    return config.model_copy(update=update)


def prepare(config) -> float:
    """Run the data stages; return their seconds."""
    from wsi2dmamba.pipeline import run_pipeline

    train = config.stage_options["train"].model_copy(update={"epochs": 1, "restarts": 1, "input_axes": 0})
    prep = config.model_copy(update={"models": ("meanpool",), "model_options": {},
                                     "run": config.run.model_copy(update={"train_dir": "prep"}),
                                     "stage_options": {**config.stage_options, "train": train}})
    t0 = time.perf_counter()
    run_pipeline(prep, progress=False, echo=print)
    return time.perf_counter() - t0


def train_dir(config) -> Path:
    """The run's training folder, as ``run_pipeline`` places it."""
    return config.out / config.run.train_dir if config.run.train_dir else config.out


def train_one(config, model: str, fold: int) -> tuple[str, int, float]:
    """One fold of one model, with the pipeline file's options; (model, fold, seconds)."""
    from wsi2dmamba import run_layout as layout
    from wsi2dmamba.cohort import load_cohort
    from wsi2dmamba.features.extract import encoder_dirname
    from wsi2dmamba.pipeline.config import model_folder, split_model_entry
    from wsi2dmamba.training import train_cohort

    t0 = time.perf_counter()
    run_dir = config.out
    cohort = load_cohort(layout.cohort_manifest(layout.cohort_dir(run_dir)), require_path=False, check_files=False)
    features = layout.features_dir(run_dir, encoder_dirname(config.option("extract").encoder))
    name, preset = split_model_entry(model)
    train_cohort(cohort, features, train_dir(config), name, config.option("train"),
                 config.model_options.get(model) or None, preset=preset, name=model_folder(model),
                 folds_to_run=[fold], progress=False)
    return model, fold, time.perf_counter() - t0


def _auc(part) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(part["target"], part["prob_1"])) if part["target"].nunique() == 2 else float("nan")


def training_row(folder: Path) -> dict:
    """One training (a restart folder, or a fold trained once): epochs logged, and the chosen checkpoint's
    epoch, validation AUC and test AUC once its predictions exist (NaN before)."""
    import pandas as pd

    from wsi2dmamba import run_layout as layout

    log_path, pred_path = layout.fold_file(folder, layout.FOLD_LOG), layout.fold_file(folder, layout.FOLD_PREDICTIONS)
    log = pd.read_csv(log_path) if log_path.is_file() else pd.DataFrame({"epoch": []})
    row = {"epochs": int(log["epoch"].max()) if len(log) else 0, "best_epoch": float("nan"),
           "val_auc": float("nan"), "test_auc": float("nan")}
    if pred_path.is_file():
        pred = pd.read_csv(pred_path)
        pred = pred[pred["checkpoint"] == "best"]
        row.update(best_epoch=int(pred["epoch"].iloc[0]), val_auc=_auc(pred[pred["partition"] == "val"]),
                   test_auc=_auc(pred[pred["partition"] == "test"]))
    return row


def restart_table(train_root: Path):
    """Every training below ``train_root``: one row per (model, fold, restart), ``kept`` marking the restart
    a finished fold chose (a fold trained once is restart 0, kept)."""
    import json

    import pandas as pd

    from wsi2dmamba import run_layout as layout

    rows = []
    for fold_dir in sorted(layout.train_dir(train_root).glob(f"*/{layout.fold_glob()}")):
        fold = layout.fold_index(fold_dir)
        if fold is None:
            continue
        done = layout.fold_file(fold_dir, layout.FOLD_DONE)
        chosen = json.loads(done.read_text()).get("chosen_restart", 0) if done.is_file() else None
        restarts = sorted(fold_dir.glob(layout.restart_glob()), key=lambda d: int(d.name.split("_")[-1]))
        for r, folder in enumerate(restarts or [fold_dir]):
            rows.append({"model": fold_dir.parent.name, "fold": fold, "restart": r, "kept": chosen == r,
                         **training_row(folder)})
    return pd.DataFrame(rows)


def print_summary(train_root: Path) -> None:
    """Print the restart table and each model's kept folds (mean ± sd of test AUC); save it as CSV."""
    from wsi2dmamba.evaluation.evaluate import FAILED_FOLD_THRESHOLD

    table = restart_table(train_root)
    if table.empty:
        print("no trainings yet", flush=True)
        return
    table.to_csv(train_root / "restarts-summary.csv", index=False)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"), flush=True)
    for model, trainings in table.groupby("model"):
        rows = trainings[trainings["kept"]]
        aucs = rows["test_auc"]
        print(f"{model}: folds finished {len(rows)}/{trainings['fold'].nunique()}, test AUC {aucs.mean():.3f} ± {aucs.std(ddof=1):.3f}, "
              f"failed (validation AUC ≤ {FAILED_FOLD_THRESHOLD}) {int((rows['val_auc'] <= FAILED_FOLD_THRESHOLD).sum())}",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pipeline", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="run folder")
    ap.add_argument("--demo-seed", type=int, help="draw the demo cohort with this seed (development: 101)")
    ap.add_argument("--models", default="", help="comma-separated model keys (default: the file's)")
    ap.add_argument("--restarts", type=int, help="restarts per fold (default: the file's)")
    ap.add_argument("--jobs", type=int, default=15, help="trainings at once")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes of the slide stages")
    ap.add_argument("--skip-prepare", action="store_true", help="the data stages are done")
    ap.add_argument("--prepare-only", action="store_true", help="only the data stages")
    ap.add_argument("--summary", action="store_true", help="only print the run's table of trainings")
    args = ap.parse_args()
    config = load(args)
    if args.summary:
        print_summary(train_dir(config))
        return
    if not args.skip_prepare:
        print(f"data stages: {prepare(config):.0f} s", flush=True)
    if args.prepare_only:
        return
    folds = config.option("train").folds
    t0 = time.perf_counter()
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
        futures = [pool.submit(train_one, config, m, k) for m in config.models for k in range(folds)]
        for fut in cf.as_completed(futures):
            try:
                model, fold, seconds = fut.result()
                print(f"trained {model} fold {fold} in {seconds:.0f} s", flush=True)
            except Exception as exc:  # noqa: BLE001 - report every failure, then go on with the others
                print(f"FAILED: {type(exc).__name__}: {exc}", flush=True)
    print(f"training: {time.perf_counter() - t0:.0f} s for {len(futures)} folds, {args.jobs} at a time", flush=True)

    from wsi2dmamba.evaluation import evaluate_run, write_report

    ev = config.option("evaluate")
    folder = train_dir(config)
    metrics = evaluate_run(folder, n_boot=ev.n_boot, seed=ev.seed)
    print(f"report: {write_report(folder, n_boot=ev.n_boot, seed=ev.seed, metrics=metrics)}", flush=True)
    print_summary(folder)


if __name__ == "__main__":
    main()
