"""Patient-level stratified splits: no leakage, stratified, CLAM files, the paper's split lists."""

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from wsi2dmamba.cohort import load_cohort
from wsi2dmamba.errors import ConfigError
from wsi2dmamba.training import (
    SplitLeakError,
    find_leaks,
    load_splits,
    make_splits,
    resolve_splits,
    write_splits,
)

PAPER = Path(__file__).resolve().parents[2] / "shared" / "data" / "paper_cohorts"


def _cohort(tmp_path, n_patients=40, task="classification", seed=0):
    """A manifest with 1–3 slides per patient and imbalanced labels (or events)."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        n_slides = int(rng.integers(1, 4))
        label = "tumour" if p % 4 == 0 else ("benign" if p % 4 in (1, 2) else "other")
        for s in range(n_slides):
            row = {"slide_id": f"P{p}_S{s}", "patient_id": f"P{p}"}
            if task == "survival":
                row.update(time=float(rng.uniform(1, 100)), event=int(p % 3 == 0))
            else:
                row["label"] = label
            rows.append(row)
    path = tmp_path / f"cohort_{task}.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return load_cohort(path, require_path=False, check_files=False)


def _patients(cohort, ids):
    by = {r.slide_id: r.patient_id for r in cohort}
    return {by[i] for i in ids}


@pytest.mark.parametrize("task", ["classification", "survival"])
def test_splits_have_no_leakage_cover_everyone_and_are_stratified(tmp_path, task):
    cohort = _cohort(tmp_path, task=task)
    splits = make_splits(cohort, folds=5, seed=3, task=task)
    assert len(splits) == 5
    all_patients = {r.patient_id for r in cohort}
    test_seen = []
    for s in splits:
        tr, va, te = (_patients(cohort, s.partition(p)) for p in ("train", "val", "test"))
        assert not (tr & va) and not (tr & te) and not (va & te)
        assert tr | va | te == all_patients
        assert va and te
        assert set(s.train) | set(s.val) | set(s.test) == set(cohort.slide_ids)
        test_seen += sorted(te)
    assert sorted(test_seen) == sorted(all_patients)  # each patient is tested exactly once
    # Stratified: per stratum, the test folds' patient counts differ by at most one.
    key = (lambda r: r.event) if task == "survival" else (lambda r: r.label)
    stratum = {r.patient_id: key(r) for r in cohort}
    for value in set(stratum.values()):
        counts = [sum(stratum[p] == value for p in _patients(cohort, s.test)) for s in splits]
        assert max(counts) - min(counts) <= 1, (value, counts)


def test_splits_are_deterministic_per_seed(tmp_path):
    cohort = _cohort(tmp_path)
    assert make_splits(cohort, 4, seed=1) == make_splits(cohort, 4, seed=1)
    assert make_splits(cohort, 4, seed=1) != make_splits(cohort, 4, seed=2)


def test_written_splits_are_clam_files_and_load_back(tmp_path):
    cohort = _cohort(tmp_path)
    splits = make_splits(cohort, 3, seed=0)
    write_splits(splits, tmp_path / "splits", cohort)
    df = pd.read_csv(tmp_path / "splits" / "splits_0.csv")
    assert list(df.columns) == ["Unnamed: 0", "train", "val", "test"]  # CLAM's ",train,val,test"
    desc = pd.read_csv(tmp_path / "splits" / "splits_0_descriptor.csv", index_col=0)
    assert int(desc.loc["tumour", ["train", "val", "test"]].sum()) == sum(r.label == "tumour" for r in cohort)
    patients = {r.patient_id for r in cohort if r.label == "tumour"}
    assert int(desc.loc["tumour", ["train_patients", "val_patients", "test_patients"]].sum()) == len(patients)
    assert len(patients) < sum(r.label == "tumour" for r in cohort)  # the cohort has patients with several slides
    back, warnings = resolve_splits(load_splits(tmp_path / "splits"), cohort)
    assert back == splits and warnings == []


def test_patient_ids_in_split_files_stand_for_all_their_slides(tmp_path):
    cohort = _cohort(tmp_path, n_patients=12)
    pd.DataFrame({"train": [f"P{i}" for i in range(8)], "val": ["P8", "P9"] + [""] * 6,
                  "test": ["P10", "P11", "UNKNOWN"] + [""] * 5}).to_csv(tmp_path / "splits_0.csv")
    (s,), warnings = resolve_splits(load_splits(tmp_path), cohort)
    assert set(s.test) == {r.slide_id for r in cohort if r.patient_id in ("P10", "P11")}
    assert any("UNKNOWN" in w for w in warnings)


def test_a_patient_in_two_partitions_is_refused_with_its_id(tmp_path):
    cohort = _cohort(tmp_path, n_patients=12)
    two = [r.slide_id for r in cohort if r.patient_id == "P1"]
    assert len(two) >= 2  # P1 has several slides in this cohort
    train = [r.slide_id for r in cohort if r.patient_id not in ("P1", "P10", "P11")] + [two[0]]
    pd.DataFrame({"train": train, "val": ["P10"] + [""] * (len(train) - 1),
                  "test": ["P11", two[1]] + [""] * (len(train) - 2)}).to_csv(tmp_path / "splits_0.csv")
    with pytest.raises(SplitLeakError, match=r"patient P1 is in train and test"):
        resolve_splits(load_splits(tmp_path), cohort)


def test_too_few_patients_and_missing_labels_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="too few"):
        make_splits(_cohort(tmp_path, n_patients=5), folds=5)
    pd.DataFrame({"slide_id": ["a", "b"], "label": ["x", ""]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(ConfigError, match="slide b has no label"):
        make_splits(load_cohort(tmp_path / "m.csv", require_path=False), folds=2)


@pytest.mark.skipif(not PAPER.is_dir(), reason="../shared/data/paper_cohorts not present")
def test_paper_split_lists_load_as_they_are_with_their_leaks_reported():
    expected = {"KIRC": [0] * 5, "KIRP": [0] * 5, "LUAD": [0] * 5, "STAD": [0] * 5, "UCEC": [15, 18, 15, 10, 18]}
    for name, leaks_per_fold in expected.items():
        splits = load_splits(PAPER / "survival" / f"TCGA_{name}_survival_kfold")
        assert len(splits) == 5 and all(s.train and s.val and not s.test for s in splits)  # no test set
        leaks = find_leaks(splits)  # ids are case ids, i.e. patients
        assert [sum(lk.fold == k for lk in leaks) for k in range(5)] == leaks_per_fold, name
        assert all(lk.partitions == ("train", "val") for lk in leaks)
    # Slide-level classification splits: the patient is the TCGA barcode's first 12 characters.
    brca = load_splits(PAPER / "classification" / "TCGA-BRCA-split.csv")
    assert [len(brca[0].train), len(brca[0].val), len(brca[0].test)] == [845, 98, 98]
    counts = Counter(lk.partitions for lk in find_leaks(brca, lambda sid: sid[:12]))
    assert counts == {("train", "val"): 10, ("train", "test"): 12, ("val", "test"): 1}
    label = pd.read_csv(PAPER / "classification" / "TCGA-BRCA-label.csv")
    patient_of = {s.removesuffix(".svs"): c for s, c in zip(label["slide_id"], label["case_id"]) if isinstance(c, str)}
    by_case = {lk.patient_id for lk in find_leaks(brca, patient_of)}
    assert by_case and by_case <= {lk.patient_id for lk in find_leaks(brca, lambda sid: sid[:12])}
