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
        # One time per training patient, however many slides it has (the cohort has 1–2 per patient).
        first = {}
        for s in train:
            first.setdefault(cohort[s].patient_id, cohort[s])
        assert len(first) < len(train)
        t = np.array([r.time for r in first.values()])
        e = np.array([r.event for r in first.values()])
        assert cfg["bin_edges"] == pytest.approx(survival_bin_edges(t, e, 4).tolist())
        assert cfg["train_survival"]["time"] == pytest.approx(t.tolist())
        assert cfg["train_survival"]["patient_id"] == list(first)
        per_slide = np.array([cohort[s].time for s in train]), np.array([cohort[s].event for s in train])
        assert cfg["bin_edges"] != pytest.approx(survival_bin_edges(*per_slide, 4).tolist())
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


def _fold_record(fold: Path) -> tuple[int, list[tuple[int, float, int]]]:
    done = json.loads((fold / "done.json").read_text())
    return done["chosen_restart"], [(r["restart"], r["best_value"], r["best_epoch"]) for r in done["restarts"]]


def test_restarts_are_chosen_on_validation_only_and_resume_per_restart(small, tmp_path):
    folder, cohort, feats = small
    config = TrainConfig(folds=2, epochs=3, lr=5e-3, batch_size=2, seed=3, restarts=3, device="cpu")
    res = train_cohort(cohort, feats, tmp_path / "a", "abmil", config, TINY["abmil"], folds_to_run=[0],
                       progress=False)
    fold_a = tmp_path / "a" / "train" / "abmil" / "fold_0"
    chosen, records = _fold_record(fold_a)
    assert [r[0] for r in records] == [0, 1, 2] and len({r[1] for r in records}) == 3  # three different seeds
    assert chosen == int(np.argmin([r[1] for r in records])) == res.folds[0].chosen_restart  # lowest val loss
    src = fold_a / f"restart_{chosen}"
    assert (fold_a / "predictions.csv").read_bytes() == (src / "predictions.csv").read_bytes()
    assert (fold_a / "best.safetensors").read_bytes() == (src / "best.safetensors").read_bytes()
    table = pd.read_csv(fold_a / "restarts.csv")
    assert table["chosen"].tolist() == [r == chosen for r in range(3)] and "val_auc" in table
    assert json.loads((fold_a / "config.json").read_text())["train"]["restarts"] == 3
    from wsi2dmamba.cohort.verify import verify_run

    report = verify_run(tmp_path / "a", sources=False)
    assert report.ok and report.folds_checked == 1, report.findings  # the fold reads as one ordinary fold
    from wsi2dmamba.evaluation import evaluate_run, write_report

    metrics = evaluate_run(tmp_path / "a", n_boot=20)
    assert metrics["models"]["abmil"]["restarts"]["0"]["chosen"] == chosen
    page = write_report(tmp_path / "a", metrics=metrics).read_text()
    assert f"<td class=\"name\">{chosen + 1} of 3 (loss: " in page  # the per-fold table names the choice

    # Permuted test targets (the labels of fold 0's test patients flipped), same splits: the same choice.
    test_ids = set(pd.read_csv(tmp_path / "a" / "train" / "splits" / "splits_0.csv")["test"].dropna())
    manifest = pd.read_csv(cohort.source, dtype=str)
    flip = manifest["slide_id"].isin(test_ids)
    manifest.loc[flip, "label"] = manifest.loc[flip, "label"].map({"low": "high", "high": "low"})
    manifest.to_csv(folder / "permuted.csv", index=False)
    permuted = load_cohort(folder / "permuted.csv", require_path=False)
    train_cohort(permuted, feats, tmp_path / "p", "abmil", config, TINY["abmil"], folds_to_run=[0],
                 splits=tmp_path / "a" / "train" / "splits", progress=False)
    fold_p = tmp_path / "p" / "train" / "abmil" / "fold_0"
    assert _fold_record(fold_p) == (chosen, records)
    pa, pp = pd.read_csv(fold_a / "predictions.csv"), pd.read_csv(fold_p / "predictions.csv")
    test = pa["partition"] == "test"
    assert (pa.loc[test, "target"] != pp.loc[test, "target"]).all()   # the test targets did change …
    assert np.array_equal(pa["prob_1"], pp["prob_1"])                 # … and nothing trained on them

    # A stop inside restart 2 (the second) resumes that restart alone and ends as the uninterrupted run.
    def stop(row):
        if row["fold_dir"].endswith("restart_1") and row["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_cohort(cohort, feats, tmp_path / "b", "abmil", config, TINY["abmil"], folds_to_run=[0],
                     callbacks=[stop], progress=False)
    fold_b = tmp_path / "b" / "train" / "abmil" / "fold_0"
    assert (fold_b / "restart_0" / "done.json").is_file() and (fold_b / "restart_1" / "resume.safetensors").is_file()
    assert not (fold_b / "done.json").exists()
    seen = []
    train_cohort(cohort, feats, tmp_path / "b", "abmil", config, TINY["abmil"], folds_to_run=[0],
                 callbacks=[lambda row: seen.append((Path(row["fold_dir"]).name, row["epoch"]))], progress=False)
    assert seen == [("restart_1", 3), ("restart_2", 1), ("restart_2", 2), ("restart_2", 3)]
    assert _fold_record(fold_b) == (chosen, records)
    pd.testing.assert_frame_equal(pd.read_csv(fold_a / "predictions.csv"), pd.read_csv(fold_b / "predictions.csv"))
    again = train_cohort(cohort, feats, tmp_path / "b", "abmil", config, TINY["abmil"], folds_to_run=[0],
                         progress=False)
    assert again.folds[0].skipped and again.folds[0].chosen_restart == chosen


def test_restarts_in_a_pipeline_file(tmp_path):
    from wsi2dmamba.pipeline import load_pipeline

    (tmp_path / "cohort.csv").write_text("slide_id,path,label\ns1,s1.svs,a\n")
    (tmp_path / "p.toml").write_text('[cohort]\nmanifest = "cohort.csv"\n[train]\nmodels = ["abmil"]\nrestarts = 4\n')
    assert load_pipeline(tmp_path / "p.toml").option("train").restarts == 4


def test_paper_recipe_differences_are_named():
    from wsi2dmamba.training import paper_recipe_differences

    cls = paper_recipe_differences(TrainConfig(task="classification", select_on="auc").model_dump(mode="json"))
    assert any("clipped at 1.0 (published: no clipping)" in d for d in cls)
    assert any("earlier epoch (published: the later)" in d for d in cls)
    assert any("per optimiser step (published: per epoch)" in d for d in cls)
    assert not any("learning rate" in d and "published: 0.0001" in d for d in cls)
    surv = paper_recipe_differences(TrainConfig(task="survival", select_on="c_index").model_dump(mode="json"))
    assert any("published for survival: constant learning rate" in d for d in surv)
    assert not any("clipped" in d for d in surv)  # survival clips nothing by default, as published
    off = TrainConfig(task="classification", clip_grad=0)  # how a pipeline file turns clipping off
    assert off.clip_grad is None and not any("clipped" in d for d in paper_recipe_differences(off.model_dump()))
    other = paper_recipe_differences(TrainConfig(task="survival", lr=1e-3, select_on="loss", restarts=3,
                                                 clip_grad=2.0).model_dump(mode="json"))
    for text in ("learning rate 0.001", "clipped at 2.0", "validation loss (published: c_index)", "3 restarts"):
        assert any(text in d for d in other), text


def test_choose_restart_prefers_the_better_validation_value_then_the_earlier_restart():
    from wsi2dmamba.training.loop import choose_restart

    assert choose_restart([0.7, 0.5, 0.6], lower_is_better=True) == 1
    assert choose_restart([0.7, 0.9, 0.9], lower_is_better=False) == 1          # a tie goes to the earlier
    assert choose_restart([float("nan"), 0.6, 0.8], lower_is_better=False) == 2  # NaN never wins
    assert choose_restart([0.5, 0.5], lower_is_better=True) == 0


def test_cli_train_with_restarts(small, tmp_path):
    from typer.testing import CliRunner

    from wsi2dmamba.cli import app

    _, cohort, feats = small
    args = ["train", "--cohort", str(cohort.source), "--features", str(feats), "--out", str(tmp_path),
            "--model", "meanpool", "--folds", "2", "--fold", "1", "--epochs", "1", "--restarts", "2",
            "--set", "hidden=8", "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert re.search(r"meanpool fold 1: trained 1 epochs; restart [12] of 2 chosen on validation \(", result.output)
    assert (tmp_path / "train" / "meanpool" / "fold_1" / "restart_1" / "done.json").is_file()
