"""Model bundles and ``predict``: export, round trip, refusal of off-spec bundles and features, resume
after SIGKILL, external validation, verify."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from training_data import base_grid, crop, one_thread, trained_run  # noqa: F401

from wsi2dmamba.cohort import load_cohort
from wsi2dmamba.cohort.verify import verify_run
from wsi2dmamba.errors import ConfigError, WeightsError
from wsi2dmamba.grid import read_feature_grid, write_feature_grid
from wsi2dmamba.predict import (
    export_bundle,
    load_bundle,
    predict_cohort,
    read_manifest,
    validate,
)
from wsi2dmamba.training import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run, manifest, feats = trained_run(tmp_path_factory.getbasetemp())
    return run, manifest, feats


@pytest.fixture(scope="module")
def bundle_dir(trained, tmp_path_factory):
    run, _, _ = trained
    return export_bundle(run, "abmil", tmp_path_factory.mktemp("bundles") / "abmil")


def _copy(bundle_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(bundle_dir, dst)
    return dst


# ------------------------------------------------------------------------------------------ the bundle

def test_export_records_what_applying_the_model_needs(trained, bundle_dir):
    run, _, feats = trained
    m = read_manifest(bundle_dir)
    assert sorted(p.name for p in bundle_dir.iterdir()) == ["bundle.json", "fold_0.safetensors",
                                                            "fold_1.safetensors", "fold_2.safetensors"]
    grid = read_feature_grid(next(feats.glob("*.h5")))
    assert (m.encoder.name, m.encoder.feature_dim) == (grid.encoder, grid.feature_dim) == ("colour-stats", 16)
    assert m.tiling.mpp == pytest.approx(grid.mpp_requested) and m.tiling.tile_px == grid.tile_px
    assert m.task.kind == "classification" and m.task.classes == ["high", "low"]
    assert m.training_cohort["n_patients"] == 30 and m.cv_metrics["pooled"]["ci"]["auc"]
    assert [f.fold for f in m.folds] == [0, 1, 2] and m.ensemble == "mean_probability"
    # Exporting an unchanged model again leaves the bundle as it was (its identity is kept).
    before = (bundle_dir / "bundle.json").read_bytes()
    assert export_bundle(run, "abmil", bundle_dir) == bundle_dir
    assert (bundle_dir / "bundle.json").read_bytes() == before


def test_bundle_round_trips_identical_predictions_on_cpu(trained, bundle_dir):
    """Each fold model of the bundle gives bit-identical outputs to the run's checkpoint, and the
    ensemble is their mean."""
    from wsi2dmamba.models import GridBatch

    run, _, feats = trained
    bundle = load_bundle(bundle_dir)
    grids = [read_feature_grid(p) for p in sorted(feats.glob("*.h5"))[:6]]
    for g in grids:
        out = bundle.predict(g)
        for k, fold_probs in enumerate(out.fold_probs):
            net = load_checkpoint(run / "train" / "abmil" / f"fold_{k}" / "best.safetensors")
            with torch.no_grad():
                ref = torch.softmax(net(GridBatch.from_grids([g])).logits.double(), dim=1)[0].numpy()
            assert np.array_equal(fold_probs, ref)
        assert np.allclose(out.probs, out.fold_probs.mean(axis=0)) and out.probs.sum() == pytest.approx(1.0)
        amap = out.attention_map
        assert amap.shape == g.shape and np.isnan(amap[~g.mask.astype(bool)]).all()
        assert np.nansum(amap) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.gpu
def test_bundle_of_a_2d_model_round_trips_on_the_gpu(tmp_path_factory):
    """A 2DMambaMIL bundle (trained on the CPU) loaded on the GPU, where the scan runs in the CuPy kernels:
    each fold gives exactly what its checkpoint gives on the GPU, and what the CPU bundle gives within
    float tolerance."""
    from wsi2dmamba.models import GridBatch

    run, _, feats = trained_run(tmp_path_factory.getbasetemp(), models=("2dmambamil",))
    bundle_dir = export_bundle(run, "2dmambamil", tmp_path_factory.mktemp("bundles") / "2dmambamil")
    on_gpu, on_cpu = load_bundle(bundle_dir, device="cuda"), load_bundle(bundle_dir, device="cpu")
    for g in [read_feature_grid(p) for p in sorted(feats.glob("*.h5"))[:6]]:
        gpu, cpu = on_gpu.predict(g), on_cpu.predict(g)
        for k, fold_probs in enumerate(gpu.fold_probs):
            net = load_checkpoint(run / "train" / "2dmambamil" / f"fold_{k}" / "best.safetensors", device="cuda")
            with torch.no_grad():
                logits = net(GridBatch.from_grids([g]).to("cuda")).logits
            assert np.array_equal(fold_probs, torch.softmax(logits.double().cpu(), dim=1)[0].numpy())
        assert np.allclose(gpu.fold_probs, cpu.fold_probs, atol=1e-5)
        assert np.allclose(gpu.attention_map, cpu.attention_map, atol=1e-5, equal_nan=True)


# ------------------------------------------------------------------------------------- refused bundles

class _Trap:
    """Unpickling this object would create a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_tampered_weights_are_refused(bundle_dir, tmp_path):
    b = _copy(bundle_dir, tmp_path)
    data = bytearray((b / "fold_1.safetensors").read_bytes())
    data[-3] ^= 0x01  # one bit of one weight
    (b / "fold_1.safetensors").write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"fold_1\.safetensors: its sha256 .* differs .* changed after export"):
        load_bundle(b)


def test_pickle_in_place_of_safetensors_is_refused_unread(bundle_dir, tmp_path):
    b = _copy(bundle_dir, tmp_path)
    marker = tmp_path / "executed"
    (b / "fold_0.safetensors").write_bytes(pickle.dumps(_Trap(marker)))
    with pytest.raises(WeightsError, match="it is a Python pickle"):
        load_bundle(b)
    torch.save({"w": torch.zeros(2)}, b / "fold_0.safetensors")
    with pytest.raises(WeightsError, match="zip archive"):
        validate(b)
    assert not marker.exists()


def _edit_manifest(b: Path, edit) -> None:
    m = json.loads((b / "bundle.json").read_text())
    edit(m)
    (b / "bundle.json").write_text(json.dumps(m))


def test_wrong_feature_dimension_and_unknown_version_are_refused(bundle_dir, tmp_path):
    b = _copy(bundle_dir, tmp_path)
    _edit_manifest(b, lambda m: m["encoder"].update(feature_dim=1024))
    with pytest.raises(ConfigError, match="takes 16-d features but encoder.feature_dim is 1024"):
        validate(b)
    shutil.rmtree(b)
    b = _copy(bundle_dir, tmp_path)
    _edit_manifest(b, lambda m: m.update(format_version=99))
    with pytest.raises(ConfigError, match="format_version 99 is unknown .* upgrade wsi2dmamba"):
        validate(b)
    _edit_manifest(b, lambda m: m.update(format_version=1, model={**m["model"], "hidden": 999}))
    with pytest.raises(WeightsError, match="configuration in its header differs from bundle.json"):
        load_bundle(b)
    shutil.rmtree(b)
    b = _copy(bundle_dir, tmp_path)
    _edit_manifest(b, lambda m: m.pop("encoder"))
    with pytest.raises(ConfigError, match="encoder: Field required"):
        validate(b)
    shutil.rmtree(b)
    b = _copy(bundle_dir, tmp_path)
    (b / "loader.py").write_text("print('hello')\n")
    with pytest.raises(ConfigError, match="loader.py"):
        validate(b)
    with pytest.raises(ConfigError, match="no bundle.json"):
        validate(tmp_path)


def test_features_of_another_encoder_dimension_or_resolution_are_refused(trained, bundle_dir, tmp_path):
    _, manifest, feats = trained
    cohort = load_cohort(manifest, require_path=False)
    bundle = load_bundle(bundle_dir)
    cases = {
        "encoder 'uni', the bundle's model needs 'colour-stats'": lambda g: dict(encoder="uni"),
        "feature dimension 8, the bundle's model needs 16": lambda g: dict(features=g.features[:, :8]),
        "tiles at 1 µm/px": lambda g: dict(mpp_effective=1.0, mpp_requested=1.0),
    }
    for expected, change in cases.items():
        folder = tmp_path / f"feats-{len(expected)}"
        folder.mkdir()
        for sid in cohort.slide_ids:
            g = read_feature_grid(feats / f"{sid}.h5")
            fields = {k: getattr(g, k) for k in g.__dataclass_fields__}
            write_feature_grid(folder / f"{sid}.h5", type(g)(**{**fields, **change(g)}))
        with pytest.raises(ConfigError) as err:
            predict_cohort(bundle, cohort, tmp_path / "run2", features=folder, progress=False)
        assert expected in str(err.value) and "Make the features the way the model was trained" in str(err.value)
        with pytest.raises(ConfigError, match="does not fit the bundle"):
            bundle.predict(read_feature_grid(folder / f"{cohort.slide_ids[0]}.h5"))
    assert not list((tmp_path / "run2").glob("predictions/*.csv"))


# ----------------------------------------------------------------------------------- predict, resume

def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "wsi2dmamba", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def test_predict_killed_and_resumed_writes_identical_tables_and_verifies(trained, bundle_dir, tmp_path):
    _, manifest, feats = trained
    reference = tmp_path / "reference"
    res = predict_cohort(load_bundle(bundle_dir), load_cohort(manifest, require_path=False), reference,
                         features=feats, progress=False)
    n = len(res.stages["predict"].done)
    assert n == 45 and not res.failed

    run2 = tmp_path / "killed"
    cmd = _cli("predict", "--model", str(bundle_dir), "--cohort", str(manifest), "--features", str(feats),
               "--out", str(run2), "--device", "cpu", "-q")
    proc = subprocess.Popen(cmd, env=_env(), start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and \
            len(list((run2 / "predictions" / "abmil").glob("*.json"))) < 3:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    made = len(list((run2 / "predictions" / "abmil").glob("*.json")))
    assert 0 < made < n, "the run was not stopped in the middle"
    assert not (run2 / "predictions" / "abmil.csv").exists()

    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{n - made} done" in done.stdout or f"{n - made + 1} done" in done.stdout  # a slide in flight
    for name in ("abmil.csv", "abmil.patients.csv"):
        assert (run2 / "predictions" / name).read_bytes() == (reference / "predictions" / name).read_bytes()
    report = verify_run(run2)
    assert report.ok and report.states_checked == n, [f.line() for f in report.findings]

    # verify notices a table that no longer agrees with the per-slide predictions
    table = run2 / "predictions" / "abmil.csv"
    df = pd.read_csv(table, dtype={"slide_id": str, "patient_id": str})
    df.loc[0, "prob_0"] = 0.123
    table.write_text(df.to_csv(index=False))
    assert any("the table was edited" in f.message for f in verify_run(run2).errors)


def test_a_slide_that_fails_is_recorded_and_the_batch_goes_on(trained, bundle_dir, tmp_path):
    _, manifest, feats = trained
    folder = tmp_path / "feats"
    shutil.copytree(feats, folder)
    bad = sorted(folder.glob("*.h5"))[3]
    bad.write_bytes(bad.read_bytes()[:200])  # a file cut off by a full disk
    res = predict_cohort(load_bundle(bundle_dir), load_cohort(manifest, require_path=False), tmp_path / "run2",
                         features=folder, progress=False)
    assert list(res.failed) == [bad.stem] and "predict:" in res.failed[bad.stem]
    slides = pd.read_csv(res.slides_csv, dtype={"slide_id": str})
    assert len(slides) == 44 and bad.stem not in set(slides["slide_id"])
    ledger = pd.read_csv(tmp_path / "run2" / "ledger.csv")
    assert ledger[ledger["slide_id"] == bad.stem]["status"].tolist() == ["failed"]


def test_external_validation_of_a_survival_model(tmp_path_factory, tmp_path):
    """The risk groups of the external cohort are split at the training cohort's cut-off; evaluate and
    report give the C-index with its interval beside the cross-validated one, and Kaplan–Meier curves."""
    from wsi2dmamba.evaluation import evaluate_run, format_summary, write_report

    run, manifest, feats = trained_run(tmp_path_factory.getbasetemp(), task="survival", models=("abmil",))
    b = export_bundle(run, "abmil", tmp_path / "bundle")
    m = read_manifest(b)
    test = pd.concat(pd.read_csv(run / "train" / "abmil" / f"fold_{k}" / "predictions.csv") for k in range(3))
    test = test[(test["checkpoint"] == "best") & (test["partition"] == "test")]
    cut = [float(np.median(test[test["fold"] == k]["risk"])) for k in range(3)]
    assert [f.risk_cutoff for f in m.folds] == pytest.approx(cut) and m.risk_cutoff == pytest.approx(np.mean(cut))

    cohort = load_cohort(manifest, require_path=False)
    few = type(cohort)(cohort.records[:3], cohort.source)
    predict_cohort(b, few, tmp_path / "heatmaps", features=feats, heatmaps=True, progress=False)
    sid = few.slide_ids[0]
    drawn = tmp_path / "heatmaps" / "predictions" / "abmil" / "heatmaps"
    geo = json.loads((drawn / f"{sid}.geojson").read_text())
    att = [f["properties"]["measurements"]["attention"] for f in geo["features"]]
    assert len(att) == read_feature_grid(feats / f"{sid}.h5").n_tiles and sum(att) == pytest.approx(1.0, rel=1e-4)
    assert (drawn / f"{sid}.png").stat().st_size > 0 and verify_run(tmp_path / "heatmaps").ok

    res = predict_cohort(b, cohort, tmp_path / "run2", features=feats, progress=False)
    patients = pd.read_csv(res.patients_csv)
    assert set(patients["risk_group"]) <= {"high", "low"}
    assert (patients["risk_group"] == "high").tolist() == (patients["risk"] > m.risk_cutoff).tolist()
    metrics = evaluate_run(tmp_path / "run2", n_boot=200)
    ext = metrics["models"]["abmil"]
    assert ext["results"]["patient"]["risk_groups"]["high"] + ext["results"]["patient"]["risk_groups"]["low"] == 30
    assert ext["comparison"]["cv"] == pytest.approx(m.cv_metrics["pooled"]["c_index"])
    lo, hi = ext["comparison"]["external_ci"]
    assert lo <= ext["comparison"]["external"] <= hi
    assert "c_index cross-validated" in format_summary(metrics)
    page = write_report(tmp_path / "run2", n_boot=200).read_text()
    assert "Kaplan" in page and "cross-validated" in page and page.count("data:image/png") >= 2


def test_cli_export_predict_evaluate_report(trained, tmp_path, monkeypatch, capsys):
    from typer.testing import CliRunner

    from wsi2dmamba.cli import app, main

    run, manifest, feats = trained
    out = CliRunner().invoke(app, ["export", str(run), "--model", "meanpool", "--out", str(tmp_path / "b")])
    assert out.exit_code == 0 and "Bundle of meanpool (3 folds" in out.output, out.output
    run2 = tmp_path / "run2"
    out = CliRunner().invoke(app, ["predict", "--model", str(tmp_path / "b"), "--cohort", str(manifest),
                                   "--features", str(feats), "--out", str(run2), "--heatmaps", "-q"])
    assert out.exit_code == 0, out.output
    assert "pools without attention: no heatmaps drawn" in out.output and "meanpool.patients.csv" in out.output
    out = CliRunner().invoke(app, ["evaluate", "--out", str(run2), "--n-boot", "100"])
    assert out.exit_code == 0 and "auc cross-validated" in out.output, out.output
    out = CliRunner().invoke(app, ["report", "--out", str(run2), "--n-boot", "100"])
    assert out.exit_code == 0 and (run2 / "report" / "index.html").is_file(), out.output
    monkeypatch.setattr("sys.argv", ["wsi2dmamba", "predict", "--model", str(tmp_path), "--cohort", str(manifest),
                                     "--out", str(run2)])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2 and "no bundle.json" in capsys.readouterr().err


def test_predict_table_of_a_pipeline_file_is_validated(tmp_path):
    from wsi2dmamba.pipeline import load_pipeline

    base = "[demo]\nslides = 8\nseed = 0\n[train]\nmodels = [\"abmil\"]\n"
    cases = {
        "[predict]\nheatmaps = true\n": "needs manifest",
        "[predict]\ndemo_seed = 0\n": "is [demo]'s seed",
        "[predict]\ndemo_seed = 1\nmodels = [\"meanpool\"]\n": "not in [train] models",
        "[predict]\ndemo_seed = 1\nout = \"../x\"\n": "plain folder name",
        "[predict]\ndemo_seed = 1\ncolour = 1\n": "unknown key 'colour'",
    }
    for table, message in cases.items():
        (tmp_path / "p.toml").write_text(base + table)
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_pipeline(tmp_path / "p.toml")
    (tmp_path / "p.toml").write_text(base + "[predict]\nmanifest = \"other.csv\"\n")
    section = load_pipeline(tmp_path / "p.toml").predict
    assert section.manifest == tmp_path / "other.csv" and section.out == "external" and section.models is None


@pytest.mark.slow
def test_pipeline_trains_on_one_demo_cohort_and_predicts_another_from_raw_slides(tmp_path):
    """The [predict] table end to end on real slides: the second cohort is segmented, tiled and encoded
    with the bundle's parameters (the same parameter hashes as the training run's), a rerun redoes
    nothing, and a bundle whose encoder weights differ from the installed ones is refused."""
    from wsi2dmamba.cohort.ledger import read_state
    from wsi2dmamba.pipeline import load_pipeline, run_pipeline

    toml = tmp_path / "p.toml"
    toml.write_text("[demo]\nslides = 8\nseed = 0\n[run]\ntrain_dir = \"classification\"\n"
                    "[tile]\ntile_px = 224\nmpp = 0.5\n[extract]\nbatch_size = 64\n"
                    "[train]\nmodels = [\"meanpool\"]\nfolds = 2\nepochs = 2\nval_fraction = 0.25\n"
                    "[train.model_options.meanpool]\nhidden = 8\n[evaluate]\nn_boot = 50\n"
                    "[predict]\ndemo_seed = 1\ndemo_slides = 4\n")
    result = run_pipeline(load_pipeline(toml, out=tmp_path / "run"), progress=False)
    ext = result.train_dir / "external"
    assert result.external["models"]["meanpool"]["n_slides"] == 4 and (ext / "report" / "index.html").is_file()
    for stage in ("segment", "tiles"):
        train_hash = read_state(tmp_path / "run", stage, "demo-000").params_hash
        assert read_state(ext, stage, "demo-000").params_hash == train_hash
    assert verify_run(ext).ok
    table = (ext / "predictions" / "meanpool.csv").read_bytes()
    again = run_pipeline(load_pipeline(toml, out=tmp_path / "run"), progress=False)
    assert again.external is not None and (ext / "predictions" / "meanpool.csv").read_bytes() == table
    states = sorted(ext.glob("*/.state/*.json")) + sorted(ext.glob("*/*/.state/*.json"))
    assert len(states) == 4 * 4  # segment, tiles, features, predictions: each slide once, nothing redone

    bundle = result.train_dir / "bundles" / "meanpool"
    _edit_manifest(bundle, lambda m: m["encoder"].update(weights_sha256="0" * 64))
    cohort = load_cohort(ext / "cohort" / "manifest.csv")
    with pytest.raises(ConfigError, match="weights of encoder 'efficientnet-lite0' found here .* are not those"):
        predict_cohort(bundle, cohort, tmp_path / "other", device="cpu", progress=False)


def test_calibration_of_known_probabilities():
    from wsi2dmamba.evaluation.external import calibration

    y = np.array([0] * 8 + [1] * 2 + [0] * 2 + [1] * 8)  # 20 % positives at p = 0.2, 80 % at p = 0.8
    p1 = np.array([0.2] * 10 + [0.8] * 10)
    cal = calibration(y, np.stack([1 - p1, p1], axis=1))
    assert cal["ece"] == pytest.approx(0.0) and cal["curve"]["count"] == [10, 10]
    assert cal["curve"]["observed"] == pytest.approx([0.2, 0.8])
    assert cal["brier"] == pytest.approx(np.mean(2 * (p1 - y) ** 2))
    over = calibration(y, np.stack([1 - p1, p1], axis=1).round() * 0.98 + 0.01)  # overconfident
    assert over["ece"] > 0.1
