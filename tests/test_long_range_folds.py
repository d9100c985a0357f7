"""The table of trainings that ``benchmarks/long_range_folds.py`` prints and saves: one row per (model,
fold, restart), the kept restart marked, unfinished trainings included."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score
from training_data import TINY, benchmark_module, make_cohort

from wsi2dmamba.cohort import load_cohort
from wsi2dmamba.training import TrainConfig, train_cohort


def test_restart_table_marks_the_kept_restart_and_keeps_unfinished_ones(tmp_path, capsys):
    folds = benchmark_module("long_range_folds")
    manifest, feats = make_cohort(tmp_path / "data", n_patients=14, seed=5)
    cohort = load_cohort(manifest, require_path=False)
    run = tmp_path / "run"
    config = TrainConfig(folds=2, epochs=2, lr=5e-3, batch_size=2, seed=3, device="cpu")
    train_cohort(cohort, feats, run, "abmil", config.model_copy(update={"restarts": 2}), TINY["abmil"],
                 folds_to_run=[0], progress=False)
    train_cohort(cohort, feats, run, "meanpool", config, TINY["meanpool"], folds_to_run=[0], progress=False)
    # A fold stopped inside its second restart: that restart has a log and no predictions yet.
    stopped = run / "train" / "abmil" / "fold_1"
    shutil.copytree(run / "train" / "abmil" / "fold_0" / "restart_0", stopped / "restart_0")
    (stopped / "restart_1").mkdir()
    pd.read_csv(stopped / "restart_0" / "log.csv").head(1).to_csv(stopped / "restart_1" / "log.csv", index=False)

    table = folds.restart_table(run).set_index(["model", "fold", "restart"])
    chosen = json.loads((run / "train" / "abmil" / "fold_0" / "done.json").read_text())["chosen_restart"]
    assert table.loc[("abmil", 0), "kept"].tolist() == [r == chosen for r in range(2)]
    assert table.loc[("meanpool", 0, 0), "kept"]                      # trained once: restart 0, kept
    assert not table.loc[("abmil", 1), "kept"].any()                  # no fold result yet: nothing kept
    row = table.loc[("abmil", 1, 1)]
    assert row["epochs"] == 1 and np.isnan(row["test_auc"]) and np.isnan(row["val_auc"])

    pred = pd.read_csv(run / "train" / "abmil" / "fold_0" / f"restart_{chosen}" / "predictions.csv")
    test = pred[(pred["checkpoint"] == "best") & (pred["partition"] == "test")]
    assert table.loc[("abmil", 0, chosen), "test_auc"] == roc_auc_score(test["target"], test["prob_1"])
    assert table.loc[("abmil", 0, chosen), "epochs"] == 2

    folds.print_summary(run)
    out = capsys.readouterr().out
    assert "abmil: folds finished 1/2" in out and "meanpool: folds finished 1/1" in out
    saved = pd.read_csv(run / "restarts-summary.csv")
    assert len(saved) == len(table) == 5
