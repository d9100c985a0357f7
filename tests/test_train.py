"""Cross-validated training on small real grids: outputs, resume, checkpoints, failures, CLI."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from training_data import TINY, base_grid, make_cohort, one_thread, trained_run  # noqa: F401

from wsi2dmamba.cohort import load_cohort
from wsi2dmamba.errors import ConfigError, StageInputError, TrainingError
from wsi2dmamba.grid import read_feature_grid, write_feature_grid
from wsi2dmamba.models import GridBatch, create
from wsi2dmamba.training import (
    TrainConfig,
    load_checkpoint,
    read_checkpoint_config,
    save_checkpoint,
    survival_bin_edges,
    train_cohort,
)
from wsi2dmamba.training.loop import lr_factor

PACKAGE = Path(__file__).resolve().parents[1] / "wsi2dmamba"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    folder = tmp_path_factory.mktemp("small")
    manifest, feats = make_cohort(folder, n_patients=14, seed=5)
    return folder, load_cohort(manifest, require_path=False), feats


def test_fold_outputs_predictions_and_shared_splits(tmp_path_factory):
    run, manifest, _ = trained_run(tmp_path_factory.getbasetemp())
    cohort = load_cohort(manifest, require_path=False)
    patient = {r.slide_id: r.patient_id for r in cohort}
    assert sorted(p.name for p in (run / "train" / "splits").glob("splits_?.csv")) == \
        ["splits_0.csv", "splits_1.csv", "splits_2.csv"]
    tested = []
    for k in range(3):
        fold = run / "train" / "abmil" / f"fold_{k}"
        for name in ("config.json", "log.csv", "best.safetensors", "best.json", "last.safetensors",
                     "predictions.csv", "done.json"):
            assert (fold / name).is_file(), name
        assert not (fold / "resume.safetensors").exists()
        cfg = json.loads((fold / "config.json").read_text())
        assert cfg["classes"] == ["high", "low"] and cfg["model"]["model"] == "abmil"
        other = json.loads((run / "train" / "meanpool" / f"fold_{k}" / "config.json").read_text())
        assert other["split"] == cfg["split"]  # every model of the run uses the same splits
        log = pd.read_csv(fold / "log.csv")
        assert log["epoch"].tolist() == [1, 2, 3, 4] and np.isfinite(log["train_loss"]).all()
        preds = pd.read_csv(fold / "predictions.csv")
        assert set(map(tuple, preds[["checkpoint", "partition"]].drop_duplicates().to_numpy())) == \
            {("best", "val"), ("best", "test"), ("last", "val"), ("last", "test")}
        assert np.allclose(preds[["prob_0", "prob_1"]].sum(axis=1), 1.0, atol=1e-5)
        best_epoch = json.loads((fold / "done.json").read_text())["best_epoch"]
        assert (preds[preds["checkpoint"] == "best"]["epoch"] == best_epoch).all()
        assert log.loc[log["epoch"] == best_epoch, "val_auc"].item() == log["val_auc"].max()
        last = preds[preds["checkpoint"] == "last"]
        parts = {p: {patient[s] for s in last[last["partition"] == p]["slide_id"]} for p in ("val", "test")}
        train_p = {patient[s] for s in cfg["split"]["train"]}
        assert not (parts["val"] & parts["test"]) and not (train_p & (parts["val"] | parts["test"]))
        tested += sorted(parts["test"])
    assert sorted(tested) == sorted({r.patient_id for r in cohort})


def test_resumed_run_equals_uninterrupted_run(small, tmp_path):
    folder, cohort, feats = small
    config = TrainConfig(folds=2, epochs=3, lr=5e-3, batch_size=2, seed=7, device="cpu")
    train_cohort(cohort, feats, tmp_path / "a", "abmil", config, TINY["abmil"], progress=False)

    def stop(row):
        if row["fold"] == 1 and row["epoch"] == 2:
            raise KeyboardInterrupt  # as if the job were killed after epoch 2 of fold 1

    with pytest.raises(KeyboardInterrupt):
        train_cohort(cohort, feats, tmp_path / "b", "abmil", config, TINY["abmil"], callbacks=[stop], progress=False)
    fold_b = tmp_path / "b" / "train" / "abmil" / "fold_1"
    assert (fold_b / "resume.safetensors").is_file() and not (fold_b / "done.json").exists()
    res = train_cohort(cohort, feats, tmp_path / "b", "abmil", config, TINY["abmil"], progress=False)
    assert [f.skipped for f in res.folds] == [True, False]
    for k in (0, 1):
        a = tmp_path / "a" / "train" / "abmil" / f"fold_{k}"
        b = tmp_path / "b" / "train" / "abmil" / f"fold_{k}"
        pd.testing.assert_frame_equal(pd.read_csv(a / "predictions.csv"), pd.read_csv(b / "predictions.csv"))
        la, lb = pd.read_csv(a / "log.csv"), pd.read_csv(b / "log.csv")
        pd.testing.assert_frame_equal(la.drop(columns="seconds"), lb.drop(columns="seconds"))
        for name in ("best.safetensors", "last.safetensors"):
            ta, tb = load_file(a / name), load_file(b / name)
            assert ta.keys() == tb.keys() and all(torch.equal(ta[n], tb[n]) for n in ta)


def test_changed_configuration_is_refused_unless_forced(small, tmp_path):
    folder, cohort, feats = small
    config = TrainConfig(folds=2, epochs=1, lr=5e-3, seed=1, device="cpu")
    train_cohort(cohort, feats, tmp_path, "meanpool", config, TINY["meanpool"], folds_to_run=[0], progress=False)
    other = config.model_copy(update={"lr": 1e-3})
    with pytest.raises(ConfigError, match="another configuration"):
        train_cohort(cohort, feats, tmp_path, "meanpool", other, TINY["meanpool"], folds_to_run=[0], progress=False)
    res = train_cohort(cohort, feats, tmp_path, "meanpool", other, TINY["meanpool"], folds_to_run=[0],
                       force=True, progress=False)
    assert not res.folds[0].skipped
    cfg = json.loads((tmp_path / "train" / "meanpool" / "fold_0" / "config.json").read_text())
    assert cfg["train"]["lr"] == 1e-3


def test_checkpoint_round_trips_exactly_without_pickle(tmp_path):
    torch.manual_seed(3)
    model = create("abmil", in_dim=16, n_classes=3, hidden=24, attn_dim=8).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # not the initial values
    save_checkpoint(tmp_path / "m.safetensors", model, {"epoch": 5})
    assert read_checkpoint_config(tmp_path / "m.safetensors") == model.config_dict()
    assert json.loads((tmp_path / "m.json").read_text())["epoch"] == 5
    back = load_checkpoint(tmp_path / "m.safetensors")
    sa, sb = model.state_dict(), back.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    batch = GridBatch.from_grids([base_grid()])
    with torch.no_grad():
        assert torch.equal(model(batch).logits, back(batch).logits)
    assert (tmp_path / "m.safetensors").read_bytes()[:8] != b"\x80\x04\x95"  # not a pickle stream


def test_no_pickle_anywhere_in_training_or_evaluation():
    for folder in ("training", "evaluation", "predict"):
        for path in (PACKAGE / folder).glob("*.py"):
            text = path.read_text()
            assert not re.search(r"torch\.load\(|import pickle|pickle\.load|weights_only", text), path


def test_nan_or_inf_loss_stops_the_fold_with_a_clear_message(small, tmp_path):
    folder, cohort, feats = small
    bad_dir = tmp_path / "features"
    bad_dir.mkdir()
    for r in cohort:
        g = read_feature_grid(feats / f"{r.slide_id}.h5")
        if r.slide_id == cohort.slide_ids[0]:
            # Finite, so the file is valid, but 3e38 overflows float32 in the first layer.
            g = type(g)(**{**g.__dict__, "features": np.full_like(g.features, 3e38)})
        write_feature_grid(bad_dir / f"{r.slide_id}.h5", g)
    config = TrainConfig(folds=2, epochs=2, lr=1e-3, device="cpu")
    with pytest.raises(TrainingError, match=rf"(became (nan|inf)|NaN or inf).*{cohort.slide_ids[0]}"):
        train_cohort(cohort, bad_dir, tmp_path / "run", "meanpool", config, TINY["meanpool"], progress=False)
    folds = list((tmp_path / "run" / "train" / "meanpool").glob("fold_*"))
    assert folds and not any((f / "done.json").exists() or (f / "predictions.csv").exists() for f in folds)


def test_missing_feature_files_are_listed(small, tmp_path):
    folder, cohort, feats = small
    part = tmp_path / "features"
    part.mkdir()
    missing = cohort.slide_ids[:2]
    for sid in cohort.slide_ids[2:]:
        (part / f"{sid}.h5").write_bytes((feats / f"{sid}.h5").read_bytes())
    with pytest.raises(StageInputError, match=rf"2 slide\(s\).*{missing[0]}, {missing[1]}"):
        train_cohort(cohort, part, tmp_path / "run", "meanpool", TrainConfig(folds=2, epochs=1), progress=False)


def test_survival_bins_are_fitted_on_the_training_partition(tmp_path_factory):
    run, manifest, _ = trained_run(tmp_path_factory.getbasetemp(), task="survival", models=("abmil",))
    cohort = load_cohort(manifest, require_path=False)
    for k in range(3):
        fold = run / "train" / "abmil" / f"fold_{k}"
        cfg = json.loads((fold / "config.json").read_text())
        train = cfg["split"]["train"]
        t = np.array([cohort[s].time for s in train])
        e = np.array([cohort[s].event for s in train])
        assert cfg["bin_edges"] == pytest.approx(survival_bin_edges(t, e, 4).tolist())
        assert cfg["train_survival"]["time"] == pytest.approx(t.tolist())
        preds = pd.read_csv(fold / "predictions.csv")
        surv = preds[[f"surv_{j}" for j in range(4)]].to_numpy()
        assert np.all(np.diff(surv, axis=1) <= 1e-7) and np.allclose(preds["risk"], -surv.sum(axis=1), atol=1e-5)
        log = pd.read_csv(fold / "log.csv")
        assert "val_c_index" in log and np.isfinite(log["val_loss"]).all()


def test_learning_rate_schedule_and_accumulation(small, tmp_path):
    assert lr_factor(0, 100, 10, 0.0) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, 0.0) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, 0.0) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, 0.0) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)
    folder, cohort, feats = small
    config = TrainConfig(folds=2, epochs=2, lr=1e-2, batch_size=2, accum_steps=2, warmup_epochs=0.5,
                         class_weighting=True, device="cpu")
    res = train_cohort(cohort, feats, tmp_path, "meanpool", config, TINY["meanpool"], folds_to_run=[0], progress=False)
    cfg = json.loads((res.folds[0].fold_dir / "config.json").read_text())
    steps = math.ceil(math.ceil(len(cfg["split"]["train"]) / 2) / 2)
    log = pd.read_csv(res.folds[0].fold_dir / "log.csv")
    warm = int(round(0.5 * steps))
    # The logged lr is the one of the epoch's last optimiser step.
    assert log["lr"].tolist() == pytest.approx([1e-2 * lr_factor(steps - 1, 2 * steps, warm, 0.0),
                                                1e-2 * lr_factor(2 * steps - 1, 2 * steps, warm, 0.0)])


def test_cli_train_evaluate_and_errors(small, tmp_path, monkeypatch, capsys):
    from typer.testing import CliRunner

    from wsi2dmamba.cli import app, main

    folder, cohort, feats = small
    args = ["train", "--cohort", str(cohort.source), "--features", str(feats), "--out", str(tmp_path),
            "--model", "meanpool", "--folds", "2", "--epochs", "1", "--set", "hidden=8", "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "meanpool fold 1: trained 1 epochs" in result.output
    result = CliRunner().invoke(app, ["evaluate", "--out", str(tmp_path), "--n-boot", "50"])
    assert result.exit_code == 0 and "meanpool" in result.output and "auc" in result.output
    assert (tmp_path / "eval" / "metrics.json").is_file() and (tmp_path / "train" / "meanpool" / "summary.csv").is_file()
    monkeypatch.setattr("sys.argv", ["wsi2dmamba", "train", "--cohort", str(cohort.source), "--features",
                                     str(feats), "--out", str(tmp_path / "x"), "--select-on", "c_index"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2 and "c_index" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_on_gpu(small, tmp_path, precision):
    folder, cohort, feats = small
    config = TrainConfig(folds=2, epochs=3, lr=5e-3, batch_size=2, device="cuda", precision=precision)
    res = train_cohort(cohort, feats, tmp_path, "abmil", config, TINY["abmil"], folds_to_run=[0], progress=False)
    fold = res.folds[0].fold_dir
    log = pd.read_csv(fold / "log.csv")
    assert np.isfinite(log[["train_loss", "val_loss"]].to_numpy()).all()
    assert json.loads((fold / "config.json").read_text())["device"].startswith("cuda")
    preds = pd.read_csv(fold / "predictions.csv")
    last = preds[(preds["checkpoint"] == "last") & (preds["partition"] == "test")]
    # The checkpoint is full precision: on the CPU in fp32 it predicts what autocast predicted.
    model = load_checkpoint(fold / "last.safetensors")
    grids = [read_feature_grid(feats / f"{s}.h5") for s in last["slide_id"]]
    with torch.no_grad():
        probs = torch.softmax(model(GridBatch.from_grids(grids)).logits, dim=1).numpy()
    assert np.abs(probs - last[["prob_0", "prob_1"]].to_numpy()).max() < 0.02
