"""Rebuild the cohort manifests in this folder from the 2DMamba authors' label and split lists.

    python cohorts/make_manifests.py /path/to/paper_cohorts [OUT_DIR]

``paper_cohorts`` is the authors' ``2DMambaMIL/dataset/csv_files`` folder (``classification/`` and
``survival/``). Every manifest gets an empty ``path`` column: fill it, or pass ``--slides-dir`` to the
commands (or ``slides_dir`` in the pipeline file) so that each ``slide_id`` is found as a file name.
Published splits are copied into ``<cohort>_splits/splits_<k>.csv`` (CLAM layout: columns
``train,val,test``).
"""

from __future__ import annotations

import io
import sys
import zipfile
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent  # where the manifests are written (OUT_DIR overrides)
CLASSIFICATION_COLUMNS = ["slide_id", "path", "patient_id", "label"]
SURVIVAL_COLUMNS = ["slide_id", "path", "patient_id", "time", "event"]


def _write(df: pd.DataFrame, name: str) -> None:
    df.to_csv(HERE / f"{name}.csv", index=False)
    print(f"{name}.csv: {len(df)} slides, {df['patient_id'].nunique()} patients")


def _write_split(name: str, fold: int, train, val, test) -> None:
    folder = HERE / f"{name}_splits"
    folder.mkdir(exist_ok=True)
    cols = {"train": pd.Series(list(train), dtype=str), "val": pd.Series(list(val), dtype=str),
            "test": pd.Series(list(test), dtype=str)}
    pd.DataFrame(cols).to_csv(folder / f"splits_{fold}.csv")


def bracs(src: Path) -> None:
    df = pd.read_csv(src / "classification" / "BRACS.csv", dtype=str)
    out = pd.DataFrame({"slide_id": df.slide_id, "path": "", "patient_id": df.slide_id, "label": df.label,
                        "split": df.split})
    _write(out, "bracs")
    parts = {p: out.slide_id[out.split == p] for p in ("train", "val", "test")}
    _write_split("bracs", 0, parts["train"], parts["val"], parts["test"])


def dhmc(src: Path) -> None:
    df = pd.read_csv(src / "classification" / "DHMC.csv", dtype=str)
    split = df["Data Split"].str.lower()
    out = pd.DataFrame({"slide_id": df["File Name"], "path": "", "patient_id": df["File Name"],
                        "label": df["Diagnosis"], "slide_type": df["Slide Type"], "split": split})
    _write(out, "dhmc")
    parts = {p: out.slide_id[out.split == p] for p in ("train", "val", "test")}
    _write_split("dhmc", 0, parts["train"], parts["val"], parts["test"])


def panda(src: Path) -> None:
    df = pd.read_csv(src / "classification" / "PANDA.csv", dtype=str)
    out = pd.DataFrame({"slide_id": df.image_id, "path": "", "patient_id": df.image_id,
                        "label": df.isup_grade, "data_provider": df.data_provider,
                        "gleason_score": df.gleason_score})
    _write(out, "panda")


def _tcga_classification(label_df: pd.DataFrame, split_csv: Path, name: str, classes: tuple[str, ...]) -> None:
    df = label_df[label_df.oncotree_code.isin(classes)]
    slide_id = df.slide_id.str.replace(r"\.svs$", "", regex=True)
    # The patient is the TCGA barcode's first 12 characters; some rows of the published list carry the
    # slide id in 'case_id' instead.
    out = pd.DataFrame({"slide_id": slide_id.values, "path": "", "patient_id": slide_id.str[:12].values,
                        "label": df.oncotree_code.values})
    out = out.drop_duplicates("slide_id")
    _write(out, name)
    split = pd.read_csv(split_csv, dtype=str, index_col=0)
    known = set(out.slide_id)
    parts = {p: [s for s in split[p].dropna() if s in known] for p in ("train", "val", "test")}
    # The published split is per slide and puts some patients in two partitions; it is kept as
    # published, under its own name, for comparison (see README.md).
    _write_split(f"{name}_published", 0, parts["train"], parts["val"], parts["test"])


def tcga_brca(src: Path) -> None:
    df = pd.read_csv(src / "classification" / "TCGA-BRCA-label.csv", dtype=str)
    _tcga_classification(df, src / "classification" / "TCGA-BRCA-split.csv", "tcga_brca", ("IDC", "ILC"))


def tcga_nsclc(src: Path) -> None:
    with zipfile.ZipFile(src / "classification" / "TCGA-NSCLC-label.csv.zip") as zf:
        member = zf.namelist()[0]  # named "../tcga_lung_subset.csv.zip" inside, but it is plain CSV
        df = pd.read_csv(io.BytesIO(zf.read(member)), dtype=str, usecols=["case_id", "slide_id", "oncotree_code"])
    _tcga_classification(df, src / "classification" / "TCGA-NSCLC-split.csv", "tcga_nsclc", ("LUAD", "LUSC"))


def tcga_survival(src: Path, code: str) -> None:
    df = pd.read_csv(src / "survival" / f"{code}.csv", dtype=str, index_col=0)
    event = (1 - df.censorship.astype(float)).astype(int)
    out = pd.DataFrame({"slide_id": df.slide_id.values, "path": "", "patient_id": df.case_id.values,
                        "time": df.survival_months.values, "event": event.values})
    name = f"tcga_{code.lower()}"
    _write(out, name)
    folder = src / "survival" / f"TCGA_{code}_survival_kfold"
    for k in range(5):
        split = pd.read_csv(folder / f"splits_{k}.csv", dtype=str, index_col=0)
        _write_split(f"{name}_published", k, split.train.dropna(), split.val.dropna(), split.test.dropna())


def main(argv: list[str]) -> None:
    global HERE
    if len(argv) not in (1, 2):
        sys.exit(__doc__)
    src = Path(argv[0])
    if len(argv) == 2:
        HERE = Path(argv[1])
        HERE.mkdir(parents=True, exist_ok=True)
    bracs(src)
    dhmc(src)
    panda(src)
    tcga_brca(src)
    tcga_nsclc(src)
    for code in ("KIRC", "KIRP", "LUAD", "STAD", "UCEC"):
        tcga_survival(src, code)


if __name__ == "__main__":
    main(sys.argv[1:])
