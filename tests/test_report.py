"""evaluate and report: metrics recomputed from the predictions, the files, and the page in Chromium."""

import base64
import io
import json
import re
import subprocess

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score
from sksurv.metrics import concordance_index_censored, concordance_index_ipcw
from sksurv.util import Surv
from helpers import chromium as _chromium
from training_data import one_thread, trained_run  # noqa: F401

from wsi2dmamba.evaluation import evaluate_run, write_report

pytestmark = pytest.mark.usefixtures("one_thread")




def _run_chromium(tmp_path, html, *args):
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--enable-logging=stderr", "--v=0",
           *args, html.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def classification_run(tmp_path_factory):
    run, _, _ = trained_run(tmp_path_factory.getbasetemp())
    metrics = evaluate_run(run, n_boot=200)
    return run, metrics


def test_metrics_are_recomputed_from_the_predictions(classification_run):
    run, metrics = classification_run
    assert set(metrics["models"]) == {"abmil", "meanpool"}
    m = metrics["models"]["abmil"]
    frames = [pd.read_csv(run / "train" / "abmil" / f"fold_{k}" / "predictions.csv") for k in range(3)]
    preds = pd.concat(frames)
    test = preds[(preds["checkpoint"] == "best") & (preds["partition"] == "test")]
    # Slide level, per fold and pooled.
    for k, g in test.groupby("fold"):
        assert m["results"]["slide"]["best"]["test"]["folds"][k]["auc"] == pytest.approx(roc_auc_score(g["target"], g["prob_1"]))
    pooled = m["results"]["slide"]["best"]["test"]["pooled"]
    assert pooled["auc"] == pytest.approx(roc_auc_score(test["target"], test["prob_1"]))
    lo, hi = pooled["ci"]["auc"]
    assert 0 <= lo <= hi <= 1
    # Patient level: mean of the patient's slide probabilities.
    pat = test.groupby("patient_id").agg(prob_1=("prob_1", "mean"), target=("target", "first"))
    assert m["results"]["patient"]["best"]["test"]["pooled"]["auc"] == pytest.approx(roc_auc_score(pat["target"], pat["prob_1"]))
    assert m["results"]["patient"]["best"]["test"]["pooled"]["n"] == 30 and pooled["n"] == len(test)
    fold_aucs = [f["auc"] for f in m["results"]["slide"]["last"]["test"]["folds"]]
    assert m["results"]["slide"]["last"]["test"]["mean"]["auc"] == pytest.approx(np.mean(fold_aucs))
    assert m["results"]["slide"]["last"]["test"]["std"]["auc"] == pytest.approx(np.std(fold_aucs, ddof=1))
    clam = pd.read_csv(run / "train" / "abmil" / "summary.csv")
    assert list(clam.columns[:5]) == ["folds", "test_auc", "val_auc", "test_acc", "val_acc"] and len(clam) == 3


def _check_page(tmp_path, html, n_images, must_contain):
    text = html.read_text()
    assert "<script" not in text and "http://" not in text and "https://" not in text  # self-contained
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(images) == n_images
    for data in images:
        img = Image.open(io.BytesIO(base64.b64decode(data)))
        img.verify()
        assert img.size[0] > 200 and img.size[1] > 200
    dom = _run_chromium(tmp_path, html, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    errors = [line for line in dom.stderr.splitlines()
              if re.search(r"Uncaught|CONSOLE\(\d+\).*(rror|arning)|Failed to load|net::ERR_|Not allowed to load", line)]
    assert not errors, errors
    for needle in must_contain:
        assert needle in dom.stdout, needle
    assert dom.stdout.count("<img") == n_images
    shot = tmp_path / "report.png"
    res = _run_chromium(tmp_path, html, f"--screenshot={shot}", "--window-size=1280,2000",
                        "--hide-scrollbars")
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape == (2000, 1280, 3)
    coloured = (pixels.max(axis=2) - pixels.min(axis=2)) > 60  # figure colours, not text or background
    dark = pixels.max(axis=2) < 100                              # text and table rules
    assert coloured.sum() > 2000 and dark.sum() > 2000
    return dom.stdout


def test_classification_report_renders_in_chromium(classification_run, tmp_path):
    run, metrics = classification_run
    html = write_report(run, metrics=metrics)
    assert html == run / "report" / "index.html"
    summary = pd.read_csv(run / "report" / "summary.csv")
    assert list(summary.columns[:5]) == ["folds", "test_auc", "val_auc", "test_acc", "val_acc"]
    assert set(summary["model"]) == {"abmil", "meanpool"} and set(summary["checkpoint"]) == {"best", "last"}
    assert len(summary) == 2 * 2 * 3
    saved = json.loads((run / "report" / "metrics.json").read_text())
    assert set(saved["models"]) == {"abmil", "meanpool"}
    # Figures: ROC, precision-recall, calibration, confusion matrices, training curves per fold.
    dom = _check_page(tmp_path, html, 5, ['class="summary"', "abmil", "meanpool", "chosen on validation",
                                          "last epoch", "ROC curves", "Precision–recall curves", "Calibration",
                                          "Confusion matrices", "Training curves per fold", "failed folds",
                                          'class="folds"', "mean ± sd", "pooled [95% CI]"])
    failed = metrics["models"]["abmil"]["failed_folds"]["best"]
    assert f'<td class="failed">{len(failed["folds"])} of 3</td>' in dom
    assert dom.count('<tr class="failed">') + dom.count('<tr class="ok">') == 2 * 3  # one row per model and fold


def test_survival_report_with_kaplan_meier_and_logrank(tmp_path_factory, tmp_path):
    run, manifest, _ = trained_run(tmp_path_factory.getbasetemp(), task="survival", models=("abmil",))
    metrics = evaluate_run(run, n_boot=200)
    res = metrics["models"]["abmil"]["results"]
    preds = pd.concat(pd.read_csv(run / "train" / "abmil" / f"fold_{k}" / "predictions.csv") for k in range(3))
    test = preds[(preds["checkpoint"] == "best") & (preds["partition"] == "test")]
    for k, g in test.groupby("fold"):
        expected = concordance_index_censored(g["event"].astype(bool), g["time"], g["risk"])[0]
        assert res["slide"]["best"]["test"]["folds"][k]["c_index"] == pytest.approx(expected)
    # IPCW C-index per fold: the censoring distribution of that fold's training patients alone.
    pat = test.groupby(["fold", "patient_id"]).agg(time=("time", "first"), event=("event", "first"),
                                                   risk=("risk", "mean"))
    for k, g in pat.groupby(level="fold"):
        ts = json.loads((run / "train" / "abmil" / f"fold_{k}" / "config.json").read_text())["train_survival"]
        tt, te = np.array(ts["time"]), np.array(ts["event"], bool)
        tau = tt[te].max()
        y_te = Surv.from_arrays(g["event"].astype(bool) & (g["time"] <= tau), np.minimum(g["time"], tau))
        expected = concordance_index_ipcw(Surv.from_arrays(te, tt), y_te, g["risk"].to_numpy(), tau=tau)[0]
        assert res["patient"]["best"]["test"]["folds"][k]["c_index_ipcw"] == pytest.approx(expected)
    pooled = res["patient"]["best"]["test"]["pooled"]
    assert pooled["c_index"] is not None and 0 < pooled["ibs"] < 0.5
    assert all(f["ibs"] is not None for f in res["slide"]["best"]["test"]["folds"])
    html = write_report(run, metrics=metrics)
    p = json.loads((run / "report" / "metrics.json").read_text())["models"]["abmil"]["logrank_p"]
    assert p is None or 0 <= p <= 1
    dom = _check_page(tmp_path, html, 3, ["C-index", "IPCW C-index", "Kaplan", "log-rank p", "number at risk",
                                          "Calibration", "Training curves per fold"])
    # The at-risk table under the Kaplan–Meier curves: patients followed at least t, per predicted risk half.
    rows = re.findall(r'<table class="at-risk">(.*?)</table>', dom)
    assert len(rows) == 1
    pat = test.groupby(["fold", "patient_id"]).agg(time=("time", "first"), risk=("risk", "mean")).reset_index()
    high = np.zeros(len(pat), bool)
    for _, g in pat.groupby("fold"):
        high[g.index] = g["risk"] > g["risk"].median()
    from wsi2dmamba.evaluation.plots import at_risk_times

    ticks = at_risk_times(pat["time"].to_numpy())
    assert len(ticks) == 5 and ticks[0] == 0 and ticks[-1] <= pat["time"].max() * 1.05
    for group, flag in (("low risk", False), ("high risk", True)):
        found = re.findall(rf'<td class="name">{group}</td>((?:<td>\d+</td>)+)', rows[0])[0]
        counts = [int(c) for c in re.findall(r"<td>(\d+)</td>", found)]
        assert counts == [int(((pat["time"] >= t) & (high == flag)).sum()) for t in ticks], group


def test_failed_folds_are_counted_on_validation_only(classification_run):
    from wsi2dmamba.evaluation.evaluate import (
        FAILED_FOLD_THRESHOLD,
        format_summary,
        summary_table,
    )

    run, metrics = classification_run
    preds = pd.concat(pd.read_csv(run / "train" / "abmil" / f"fold_{k}" / "predictions.csv") for k in range(3))
    val = preds[(preds["checkpoint"] == "best") & (preds["partition"] == "val")]
    pat = val.groupby(["fold", "patient_id"]).agg(prob_1=("prob_1", "mean"), target=("target", "first"))
    aucs = {k: roc_auc_score(g["target"], g["prob_1"]) for k, g in pat.groupby(level="fold")}
    failed = metrics["models"]["abmil"]["failed_folds"]["best"]
    assert failed["of"] == 3 and failed["metric"] == "auc" and failed["threshold"] == FAILED_FOLD_THRESHOLD == 0.55
    assert failed["folds"] == sorted(k for k, a in aucs.items() if a <= 0.55)
    # Changing a fold's validation figure past the threshold, and nothing else, makes it count.
    import copy

    changed = copy.deepcopy(metrics)
    fold0 = changed["models"]["abmil"]["results"]["patient"]["best"]["val"]["folds"][0]
    fold0["auc"] = 0.5
    from wsi2dmamba.evaluation.evaluate import failed_folds

    assert 0 in failed_folds(changed["models"]["abmil"]["results"], "classification")["folds"]
    row = next(r for r in summary_table(metrics) if r["model"] == "abmil" and r["checkpoint"] == "best")
    assert row["partition"] == "test" and row["failed"] == len(failed["folds"]) and row["failed_of"] == 3
    text = format_summary(metrics)
    assert f"3 folds, {len(failed['folds'])} failed" in text and "auc" in text and " ± " in text and "pooled" in text


def test_splits_without_a_test_partition_report_validation_labelled_as_such(tmp_path_factory, tmp_path):
    from training_data import TINY, make_cohort

    from wsi2dmamba.cohort import load_cohort
    from wsi2dmamba.evaluation.evaluate import format_summary, summary_table
    from wsi2dmamba.training import TrainConfig, train_cohort

    folder = tmp_path_factory.mktemp("valonly")
    manifest, feats = make_cohort(folder, n_patients=16, seed=3)
    cohort = load_cohort(manifest, require_path=False)
    ids = sorted(cohort.slide_ids)
    split_dir = folder / "published_splits"
    split_dir.mkdir()
    for k in range(2):  # as the published survival splits: train and val, no test column values
        val = ids[k::2][:8]
        train = [s for s in ids if s not in val]
        pd.DataFrame({"train": pd.Series(train), "val": pd.Series(val), "test": pd.Series([], dtype=object)}
                     ).to_csv(split_dir / f"splits_{k}.csv")
    config = TrainConfig(folds=2, epochs=2, lr=5e-3, batch_size=2, select_on="auc", device="cpu")
    res = train_cohort(cohort, feats, folder / "run", "meanpool", config, TINY["meanpool"], splits=split_dir,
                       progress=False)
    assert any("no test partition" in w for w in res.warnings)
    metrics = evaluate_run(folder / "run", n_boot=100)
    best = metrics["models"]["meanpool"]["results"]["patient"]["best"]
    assert "test" not in best and best["val"]["pooled"]["ci"]["auc"]  # validation, with its interval
    row = next(r for r in summary_table(metrics) if r["checkpoint"] == "best")
    assert row["partition"] == "val" and row["auc_pooled"] == best["val"]["pooled"]["auc"]
    assert "VALIDATION (no test partition)" in format_summary(metrics)
    html = write_report(folder / "run", metrics=metrics)
    dom = _check_page(tmp_path, html, 5, ["validation (no test partition; optimistic)", "ROC curves",
                                          "pooled VALIDATION predictions"])
    assert dom.count("validation (no test partition; optimistic)") == 4  # both checkpoints, both levels


def test_paper_rows_name_their_differences_from_the_published_recipe(classification_run):
    import copy

    from wsi2dmamba.evaluation.report import _models_html

    _, metrics = classification_run
    assert "differs from the published recipe" not in _models_html(metrics)
    paper = copy.deepcopy(metrics)
    paper["models"]["abmil"]["preset"] = "paper"
    text = _models_html(paper)
    assert 'data-model="abmil"' in text and 'data-model="meanpool"' not in text
    assert "clipped at 1.0 (published: no clipping)" in text and "earlier epoch (published: the later)" in text


def test_cohorts_without_patient_ids_are_warned_that_patient_level_is_slide_level(tmp_path_factory):
    from training_data import TINY, make_cohort

    from wsi2dmamba.cohort import load_cohort
    from wsi2dmamba.evaluation.evaluate import format_summary
    from wsi2dmamba.evaluation.report import write_report
    from wsi2dmamba.training import TrainConfig, train_cohort

    folder = tmp_path_factory.mktemp("nopatients")
    manifest, feats = make_cohort(folder, n_patients=12, seed=4)
    config = TrainConfig(folds=2, epochs=1, lr=5e-3, batch_size=4, device="cpu")
    # With patient ids (the generated cohort has some), no warning.
    res = train_cohort(load_cohort(manifest, require_path=False), feats, folder / "with", "meanpool", config,
                       TINY["meanpool"], progress=False)
    assert not any("own patient" in w for w in res.warnings)
    # As BRACS's manifest: patient_id = slide_id.
    table = pd.read_csv(manifest, dtype=str)
    table["patient_id"] = table["slide_id"]
    table.to_csv(folder / "bracs_like.csv", index=False)
    res = train_cohort(load_cohort(folder / "bracs_like.csv", require_path=False), feats, folder / "without",
                       "meanpool", config, TINY["meanpool"], progress=False)
    assert any("own patient" in w and "bracs.icar.cnr.it" in w for w in res.warnings)
    metrics = evaluate_run(folder / "without", n_boot=20)
    assert metrics["models"]["meanpool"]["notes"] and "slide-level" in metrics["models"]["meanpool"]["notes"][0]
    assert "warning (meanpool): every slide of the cohort is its own patient" in format_summary(metrics)
    page = write_report(folder / "without", metrics=metrics).read_text()
    assert page.count('class="warn cohort-note"') == 1 and "confidence intervals are slide-level" in page
    assert not evaluate_run(folder / "with", n_boot=20, write=False)["models"]["meanpool"]["notes"]
