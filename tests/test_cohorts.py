"""The paper's cohort manifests and split lists in cohorts/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from wsi2dmamba.cohort import load_cohort
from wsi2dmamba.errors import ManifestError
from wsi2dmamba.training.splits import find_leaks, load_splits, resolve_splits

REPO = Path(__file__).resolve().parents[1]
COHORTS = REPO / "cohorts"
SHARED = REPO.parent / "shared" / "data" / "paper_cohorts"

# name: (slides, patients, task, classes)
EXPECTED = {
    "bracs": (547, 547, "classification", {"AT", "BT", "MT"}),
    "dhmc": (563, 563, "classification", {"Benign", "Chromophobe", "Clearcell", "Papillary", "Oncocytoma"}),
    "panda": (10616, 10616, "classification", {"0", "1", "2", "3", "4", "5"}),
    "tcga_brca": (1033, 971, "classification", {"IDC", "ILC"}),
    "tcga_nsclc": (958, 862, "classification", {"LUAD", "LUSC"}),
    "tcga_kirc": (498, 498, "survival", None),
    "tcga_kirp": (261, 261, "survival", None),
    "tcga_luad": (455, 455, "survival", None),
    "tcga_stad": (363, 363, "survival", None),
    "tcga_ucec": (539, 480, "survival", None),
}


def _load(name: str):
    return load_cohort(COHORTS / f"{name}.csv", require_path=False, check_files=False)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_manifest_loads_with_expected_counts(name):
    n_slides, n_patients, task, classes = EXPECTED[name]
    cohort = _load(name)
    assert len(cohort) == n_slides
    assert len({r.patient_id for r in cohort}) == n_patients
    assert all(r.path is None for r in cohort)  # the user fills 'path' or passes --slides-dir
    if task == "classification":
        assert cohort.has_labels and {r.label for r in cohort} == classes
    else:
        assert cohort.has_survival and {r.event for r in cohort} == {0, 1}
        assert all(r.time > 0 for r in cohort)


def test_event_counts_match_the_published_lists():
    # censorship 1 = censored in the authors' files; events as counted in their lists
    assert sum(r.event for r in _load("tcga_kirc")) == 169
    assert sum(r.event for r in _load("tcga_kirp")) == 41
    assert sum(r.event for r in _load("tcga_luad")) == 159
    assert sum(r.event for r in _load("tcga_stad")) == 145


@pytest.mark.parametrize("name, sizes", [("bracs", (395, 65, 87)), ("dhmc", (391, 23, 149))])
def test_official_splits_resolve_without_leaks(name, sizes):
    cohort = _load(name)
    resolved, _ = resolve_splits(load_splits(COHORTS / f"{name}_splits"), cohort)
    assert len(resolved) == 1
    assert (len(resolved[0].train), len(resolved[0].val), len(resolved[0].test)) == sizes


def test_published_survival_folds_have_no_test_partition():
    cohort = _load("tcga_kirc")
    splits = load_splits(COHORTS / "tcga_kirc_published_splits")
    assert len(splits) == 5 and all(not s.test for s in splits)
    resolved, warnings = resolve_splits(splits, cohort)
    assert len(resolved) == 5 and any("no test partition" in w for w in warnings)


@pytest.mark.parametrize("name", ["tcga_brca", "tcga_nsclc", "tcga_ucec"])
def test_published_splits_with_patient_leaks_are_detected(name):
    cohort = _load(name)
    patient_of = {r.slide_id: r.patient_id for r in cohort}
    leaks = find_leaks(load_splits(COHORTS / f"{name}_published_splits"), patient_of)
    assert leaks, name


def test_slides_dir_resolves_slide_ids_to_files(tmp_path):
    cohort = _load("tcga_kirp")
    for r in cohort:
        (tmp_path / f"{r.slide_id}.svs").touch()
    resolved = load_cohort(COHORTS / "tcga_kirp.csv", slides_dir=tmp_path)
    assert all(r.path == (tmp_path / f"{r.slide_id}.svs").resolve() for r in resolved)
    (tmp_path / f"{cohort.slide_ids[0]}.svs").unlink()
    with pytest.raises(ManifestError, match=cohort.slide_ids[0]):
        load_cohort(COHORTS / "tcga_kirp.csv", slides_dir=tmp_path)


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data/paper_cohorts")
def test_manifests_rebuild_identically_from_the_published_lists(tmp_path):
    subprocess.run([sys.executable, str(COHORTS / "make_manifests.py"), str(SHARED), str(tmp_path)],
                   check=True, capture_output=True, timeout=300)
    built = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.csv"))
    shipped = sorted(p.relative_to(COHORTS) for p in COHORTS.rglob("*.csv"))
    assert built == shipped
    for rel in built:
        assert (tmp_path / rel).read_bytes() == (COHORTS / rel).read_bytes(), rel
