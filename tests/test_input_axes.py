"""The input reduction: whitened principal axes fitted on each fold's training cells and kept in the checkpoint."""

import json

import numpy as np
import pytest
import torch
from training_data import TINY, make_cohort, one_thread  # noqa: F401

from wsi2dmamba.cohort import load_cohort
from wsi2dmamba.errors import ConfigError, StageInputError
from wsi2dmamba.grid import read_feature_grid
from wsi2dmamba.models import GridBatch, create, load_checkpoint, save_checkpoint
from wsi2dmamba.models.input_axes import fit_input_axes
from wsi2dmamba.training import TrainConfig, train_cohort

pytestmark = pytest.mark.usefixtures("one_thread")


def _cells(seed: int = 0, slides: int = 5, dim: int = 12) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    scale = np.linspace(4.0, 0.5, dim)
    mix = np.linalg.qr(rng.normal(size=(dim, dim)))[0]
    return [((rng.normal(size=(int(rng.integers(20, 60)), dim)) * scale) @ mix + 3.0).astype(np.float32)
            for _ in range(slides)]


def test_the_axes_whiten_the_fitted_cells_and_span_the_leading_principal_directions():
    cells = _cells()
    fitted = fit_input_axes(cells, 4)
    x = np.concatenate(cells).astype(np.float64)
    z = (x - fitted.mean) @ fitted.axes.T
    assert fitted.n_cells == len(x)
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-9)
    np.testing.assert_allclose(np.cov(z.T, bias=True), np.eye(4), atol=1e-9)
    _, sing, vt = np.linalg.svd(x - x.mean(axis=0), full_matrices=False)
    np.testing.assert_allclose(fitted.variance, sing[:4] ** 2 / len(x), rtol=1e-9)
    unit = fitted.axes * np.sqrt(fitted.variance)[:, None]
    np.testing.assert_allclose(np.abs(unit @ vt[:4].T), np.eye(4), atol=1e-7)  # the same directions, up to sign
    assert (unit[np.arange(4), np.abs(unit).argmax(axis=1)] > 0).all()  # sign fixed: largest entry positive


def test_fitting_slide_by_slide_equals_fitting_all_cells_at_once():
    cells = _cells(seed=1)
    a, b = fit_input_axes(cells, 3), fit_input_axes([np.concatenate(cells)], 3)
    np.testing.assert_allclose(a.axes, b.axes, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-12)


def test_impossible_fits_are_refused_with_the_reason():
    with pytest.raises(StageInputError, match="more axes than the features have"):
        fit_input_axes(_cells(dim=6), 7)
    with pytest.raises(StageInputError, match="got 1 cell"):
        fit_input_axes([np.ones((1, 6), np.float32)], 2)
    flat = [np.repeat(np.arange(10, dtype=np.float32)[:, None], 6, axis=1)]  # one direction of variance
    with pytest.raises(StageInputError, match="only 1 direction"):
        fit_input_axes(flat, 2)


def test_a_model_with_axes_never_fitted_refuses_to_run_and_a_checkpoint_carries_them(tmp_path):
    model = create("m2dmil", in_dim=12, n_classes=2, d_model=16, n_layers=1, input_axes=3).eval()
    rng = np.random.default_rng(0)
    batch = GridBatch.from_arrays([(rng.normal(size=(4, 5, 12)).astype(np.float32), rng.random((4, 5)) > 0.3)])
    with pytest.raises(RuntimeError, match="never fitted"):
        model(batch)
    model.input_axes.load(fit_input_axes(_cells(), 3))
    assert model.embed[0].in_features == 3
    reduced = model.input_axes.reduce(batch)
    assert reduced.features.shape == (1, 4, 5, 3)
    assert torch.all(reduced.features[~batch.tissue] == 0)
    with torch.no_grad():
        expected = model(batch).logits
    save_checkpoint(tmp_path / "m.safetensors", model, {})
    back = load_checkpoint(tmp_path / "m.safetensors").eval()
    assert torch.equal(back.input_axes.axes, model.input_axes.axes)
    with torch.no_grad():
        assert torch.equal(back(batch).logits, expected)


@pytest.fixture(scope="module")
def cohort_and_features(tmp_path_factory):
    folder = tmp_path_factory.mktemp("axes")
    manifest, feats = make_cohort(folder, n_patients=14, seed=7)
    return load_cohort(manifest, require_path=False), feats


def test_training_fits_the_axes_on_the_folds_training_slides_only(cohort_and_features, tmp_path):
    cohort, feats = cohort_and_features
    config = TrainConfig(folds=2, epochs=1, lr=5e-3, batch_size=2, seed=2, input_axes=4, device="cpu")
    train_cohort(cohort, feats, tmp_path, "abmil", config, TINY["abmil"], folds_to_run=[0], progress=False)
    fold = tmp_path / "train" / "abmil" / "fold_0"
    record = json.loads((fold / "config.json").read_text())
    assert record["train"]["input_axes"] == 4 and record["model"]["input_axes"] == 4
    split = record["split"]
    train_cells = [read_feature_grid(feats / f"{s}.h5").features for s in split["train"]]
    every_cell = [read_feature_grid(feats / f"{s}.h5").features for s in cohort.slide_ids]
    model = load_checkpoint(fold / "best.safetensors")
    expected, leaky = fit_input_axes(train_cells, 4), fit_input_axes(every_cell, 4)
    np.testing.assert_allclose(model.input_axes.axes.numpy(), expected.axes, rtol=1e-5, atol=1e-6)
    assert not np.allclose(model.input_axes.axes.numpy(), leaky.axes, rtol=1e-3, atol=1e-4)


def test_input_axes_is_part_of_the_result_and_absent_from_old_hashes(cohort_and_features, tmp_path):
    cohort, feats = cohort_and_features
    plain = TrainConfig(folds=2, epochs=1, lr=5e-3, seed=2, device="cpu")
    train_cohort(cohort, feats, tmp_path, "meanpool", plain, TINY["meanpool"], folds_to_run=[1], progress=False)
    record = json.loads((tmp_path / "train" / "meanpool" / "fold_1" / "config.json").read_text())
    assert "input_axes" not in record["train"]  # folds trained before the option keep their hash
    with pytest.raises(ConfigError, match="another configuration"):
        train_cohort(cohort, feats, tmp_path, "meanpool", plain.model_copy(update={"input_axes": 2}),
                     TINY["meanpool"], folds_to_run=[1], progress=False)


def test_input_axes_as_a_model_option_is_refused(cohort_and_features, tmp_path):
    cohort, feats = cohort_and_features
    with pytest.raises(ConfigError, match="input_axes is a training option"):
        train_cohort(cohort, feats, tmp_path, "meanpool", TrainConfig(folds=2, epochs=1, device="cpu"),
                     {**TINY["meanpool"], "input_axes": 2}, progress=False)


def test_input_axes_in_a_pipeline_file(tmp_path):
    from wsi2dmamba.pipeline import load_pipeline

    (tmp_path / "cohort.csv").write_text("slide_id,path,label\n")
    (tmp_path / "p.toml").write_text('[cohort]\nmanifest = "cohort.csv"\n[train]\nmodels = ["abmil"]\n'
                                     'input_axes = 8\n')
    assert load_pipeline(tmp_path / "p.toml").option("train").input_axes == 8
    (tmp_path / "q.toml").write_text('[cohort]\nmanifest = "cohort.csv"\n[train]\nmodels = ["abmil"]\n'
                                     '[train.model_options.abmil]\ninput_axes = 8\n')
    with pytest.raises(ConfigError, match="set by the run"):
        load_pipeline(tmp_path / "q.toml")


@pytest.mark.gpu
def test_fitting_on_the_gpu_equals_fitting_on_the_cpu():
    cells = _cells(seed=2, dim=40)
    cpu, gpu = fit_input_axes(cells, 6), fit_input_axes(cells, 6, "cuda")
    np.testing.assert_allclose(gpu.axes, cpu.axes, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(gpu.mean, cpu.mean, rtol=1e-12)


def test_a_bundle_applies_each_folds_own_axes_to_new_grids(cohort_and_features, tmp_path):
    """Exported and loaded again, every fold model projects a new grid on the axes of its own fold and
    predicts what training predicted for that slide."""
    import pandas as pd

    from wsi2dmamba.predict import export_bundle, load_bundle

    cohort, feats = cohort_and_features
    config = TrainConfig(folds=2, epochs=2, lr=5e-3, batch_size=2, seed=4, input_axes=3, device="cpu")
    train_cohort(cohort, feats, tmp_path, "abmil", config, TINY["abmil"], progress=False)
    bundle = load_bundle(export_bundle(tmp_path, "abmil", tmp_path / "bundle"))
    axes = [load_checkpoint(tmp_path / "train" / "abmil" / f"fold_{k}" / "best.safetensors").input_axes.axes
            for k in (0, 1)]
    assert not torch.allclose(axes[0], axes[1])  # each fold fitted its own
    for k in (0, 1):
        table = pd.read_csv(tmp_path / "train" / "abmil" / f"fold_{k}" / "predictions.csv")
        test = table[(table.checkpoint == "best") & (table.partition == "test")].iloc[0]
        out = bundle.predict(read_feature_grid(feats / f"{test.slide_id}.h5"))
        assert out.fold_probs[k][1] == pytest.approx(test.prob_1, abs=1e-6)
