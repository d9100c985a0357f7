"""Folds spread over (fake) GPUs: each worker reads the feature grids once for all its folds, and every
fold's results equal those of the folds trained one after another in one process."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from training_data import TINY, make_cohort, one_thread  # noqa: F401

from wsi2dmamba.cohort import load_cohort
from wsi2dmamba.grid import read_feature_grid, write_feature_grid
from wsi2dmamba.training import TrainConfig, train_cohort
from wsi2dmamba.training import data as training_data

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    folder = tmp_path_factory.mktemp("folds")
    manifest, feats = make_cohort(folder, n_patients=12, seed=2)
    return load_cohort(manifest, require_path=False), feats


def test_a_worker_reads_each_grid_once_and_again_only_when_its_file_changes(small, tmp_path, monkeypatch):
    cohort, feats = small
    folder = tmp_path / "features"
    folder.mkdir()
    for sid in cohort.slide_ids:
        (folder / f"{sid}.h5").write_bytes((feats / f"{sid}.h5").read_bytes())
    reads = []
    real = training_data.read_feature_grid
    monkeypatch.setattr(training_data, "read_feature_grid", lambda p: reads.append(p.stem) or real(p))
    ids = cohort.slide_ids
    first = training_data.worker_feature_grids(cohort, folder, ids[:8])
    second = training_data.worker_feature_grids(cohort, folder, ids[4:])  # a later fold: half of it seen
    assert sorted(reads) == sorted(ids) and set(first) == set(ids[:8]) and set(second) == set(ids[4:])
    assert second[ids[5]] is first[ids[5]]
    g = read_feature_grid(folder / f"{ids[0]}.h5")
    write_feature_grid(folder / f"{ids[0]}.h5", type(g)(**{**g.__dict__, "features": g.features[:, ::-1].copy()}))
    reads.clear()
    again = training_data.worker_feature_grids(cohort, folder, ids[:3])
    assert reads == [ids[0]]  # the rewritten file only
    np.testing.assert_array_equal(again[ids[0]].features, g.features[:, ::-1])


@pytest.mark.slow
def test_folds_on_two_fake_gpus_equal_folds_in_one_process(small, tmp_path, monkeypatch):
    cohort, feats = small
    config = TrainConfig(folds=3, epochs=2, device="auto", lr=1e-3)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU: the folds run here, one after another
    here = train_cohort(cohort, feats, tmp_path / "here", "abmil", config, TINY["abmil"], progress=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # two (fake) GPUs: one worker process on each
    spread = train_cohort(cohort, feats, tmp_path / "spread", "abmil", config, TINY["abmil"], progress=False)
    assert [f.fold for f in spread.folds] == [f.fold for f in here.folds] == [0, 1, 2]
    for a, b in zip(here.folds, spread.folds):
        pa = pd.read_csv(a.fold_dir / "predictions.csv").sort_values(["checkpoint", "partition", "slide_id"])
        pb = pd.read_csv(b.fold_dir / "predictions.csv").sort_values(["checkpoint", "partition", "slide_id"])
        assert pa["slide_id"].tolist() == pb["slide_id"].tolist()
        np.testing.assert_allclose(pa[["prob_0", "prob_1"]].to_numpy(), pb[["prob_0", "prob_1"]].to_numpy(),
                                   atol=1e-5)
