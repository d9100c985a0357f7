"""Patient-level, stratified k-fold splits with train/val/test partitions, in CLAM's file layout.

A split file ``splits_<k>.csv`` has the columns ``,train,val,test`` (an index column, then one id per
cell, shorter columns left empty), as CLAM's ``create_splits_seq.py`` writes them. The ids may be slide
ids (what :func:`write_splits` writes) or patient ids (as in the 2DMamba survival split lists); when
splits are resolved against a cohort, a patient id stands for all of that patient's slides.

No patient may sit in two partitions of one fold: :func:`resolve_splits` refuses such splits and names
the patients. :func:`find_leaks` lists them without refusing, to audit published split lists.
"""

from __future__ import annotations

import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import run_layout as layout
from ..cohort import Cohort
from ..cohort.manifest import SLIDE_LEVEL_PATIENTS, slide_level_patients
from ..errors import ConfigError
from ..fileio import write_text_atomic

PARTITIONS = ("train", "val", "test")
_SPLIT_FILE = re.compile(r"^splits_(\d+)\.csv$")


@dataclass(frozen=True)
class FoldSplit:
    """The three partitions of one fold, as lists of ids (slide ids once resolved)."""

    fold: int
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]

    def partition(self, name: str) -> tuple[str, ...]:
        return getattr(self, name)

    def partition_of(self) -> dict[str, str]:
        """id → partition name (the last one wins if an id is listed twice; see :func:`find_leaks`)."""
        return {i: p for p in PARTITIONS for i in self.partition(p)}


@dataclass(frozen=True)
class Leak:
    """A patient found in more than one partition of a fold."""

    fold: int
    patient_id: str
    partitions: tuple[str, ...]

    def __str__(self) -> str:
        return f"fold {self.fold}: patient {self.patient_id} is in {' and '.join(self.partitions)}"


class SplitLeakError(ConfigError):
    """A patient is in two partitions of one fold."""


# --------------------------------------------------------------------------------------------- making

def patient_strata(cohort: Cohort, task: str) -> dict[str, str]:
    """The stratum of each patient: its label (classification) or its event flag (survival).

    A patient with slides of different labels is stratified by its most frequent label.
    """
    per_patient: dict[str, list[str]] = defaultdict(list)
    problems = []
    for r in cohort:
        if task == "survival":
            if r.time is None or r.event is None:
                problems.append(f"slide {r.slide_id} has no time/event")
                continue
            per_patient[r.patient_id].append(str(int(r.event)))
        else:
            if r.label is None:
                problems.append(f"slide {r.slide_id} has no label")
                continue
            per_patient[r.patient_id].append(r.label)
    if problems:
        raise ConfigError(f"Cannot split the cohort for {task}: " + "; ".join(problems[:10])
                          + (f" (and {len(problems) - 10} more)" if len(problems) > 10 else "")
                          + ". Fill the 'label' column (classification) or 'time' and 'event' (survival).")
    strata = {}
    for p, values in per_patient.items():
        counts = Counter(values)
        top = max(counts.values())
        strata[p] = sorted(v for v, c in counts.items() if c == top)[0]
    return strata


def make_splits(cohort: Cohort, folds: int = 5, seed: int = 0, task: str = "classification",
                val_fraction: float = 0.2) -> list[FoldSplit]:
    """Patient-level stratified k-fold splits with a validation partition, as slide ids.

    Each patient is in the test partition of exactly one fold. In fold k, ``val_fraction`` of the
    remaining patients of every stratum (label, or event flag for survival) form the validation
    partition and the rest the training partition.

    Args:
        cohort: the slides; ``patient_id`` groups them.
        folds: number of folds (≥ 2).
        seed: seeds the shuffling; the same seed and cohort give the same splits.
        task: "classification" (stratify by label) or "survival" (stratify by event).
        val_fraction: fraction of each fold's non-test patients used for validation.
    """
    strata = patient_strata(cohort, task)
    n_patients = len(strata)
    if folds < 2:
        raise ConfigError(f"--folds must be at least 2, got {folds}")
    if n_patients < folds + 2:
        raise ConfigError(f"The cohort has {n_patients} patients, too few for {folds} folds with train, "
                          f"validation and test partitions; use fewer folds or more patients.")
    by_stratum: dict[str, list[str]] = defaultdict(list)
    for p, s in strata.items():
        by_stratum[s].append(p)
    rng = np.random.default_rng(seed)
    fold_of: dict[str, int] = {}
    offset = 0
    # Dealing each stratum's shuffled patients round-robin, continuing where the last stratum
    # stopped, keeps both the folds' sizes and their class mix within one patient of each other.
    for s in sorted(by_stratum):
        patients = sorted(by_stratum[s])
        rng.shuffle(patients)
        for i, p in enumerate(patients):
            fold_of[p] = (offset + i) % folds
        offset = (offset + len(patients)) % folds

    slides_of: dict[str, list[str]] = defaultdict(list)
    for r in cohort:
        slides_of[r.patient_id].append(r.slide_id)

    out = []
    for k in range(folds):
        fold_rng = np.random.default_rng([seed, k])
        test_p = sorted(p for p, f in fold_of.items() if f == k)
        val_p: list[str] = []
        for s in sorted(by_stratum):
            rest = sorted(p for p in by_stratum[s] if fold_of[p] != k)
            fold_rng.shuffle(rest)
            val_p += rest[: int(round(val_fraction * len(rest)))]
        if not val_p:  # tiny cohorts: at least one validation patient
            rest = sorted(p for p, f in fold_of.items() if f != k)
            val_p = [rest[int(fold_rng.integers(len(rest)))]]
        val_set = set(val_p)
        train_p = sorted(p for p, f in fold_of.items() if f != k and p not in val_set)

        def slides(patients: Sequence[str]) -> tuple[str, ...]:
            return tuple(sid for p in sorted(patients) for sid in slides_of[p])

        out.append(FoldSplit(k, slides(train_p), slides(val_p), slides(test_p)))
    return out


# ------------------------------------------------------------------------------------------- file I/O

def write_splits(splits: Sequence[FoldSplit], folder: str | os.PathLike[str], cohort: Cohort | None = None,
                 task: str = "classification") -> list[Path]:
    """Write ``splits_<k>.csv`` (CLAM layout) and, given the cohort, ``splits_<k>_descriptor.csv``.

    The descriptor counts slides (columns ``train, val, test``, as CLAM's) and patients
    (``train_patients, val_patients, test_patients``) per stratum (label, or event/censored) and partition;
    a patient whose slides fall in two strata counts in both.
    """
    import pandas as pd

    folder = Path(folder)
    written = []
    for s in splits:
        cols = {p: pd.Series(list(s.partition(p)), dtype=object) for p in PARTITIONS}
        df = pd.DataFrame(cols)
        path = layout.split_file(folder, s.fold)
        _write_if_changed(path, df.to_csv())
        written.append(path)
        if cohort is not None:
            key: Callable = ((lambda r: "event" if r.event else "censored") if task == "survival"
                             else (lambda r: r.label))
            by_id = {r.slide_id: r for r in cohort}
            rows = defaultdict(lambda: dict.fromkeys((*PARTITIONS, *(f"{p}_patients" for p in PARTITIONS)), 0))
            for p in PARTITIONS:
                seen: set[tuple[str, str]] = set()
                for sid in s.partition(p):
                    if sid in by_id:
                        stratum = key(by_id[sid])
                        rows[stratum][p] += 1
                        if (stratum, by_id[sid].patient_id) not in seen:
                            seen.add((stratum, by_id[sid].patient_id))
                            rows[stratum][f"{p}_patients"] += 1
            desc = pd.DataFrame.from_dict(rows, orient="index").sort_index()
            _write_if_changed(layout.split_descriptor(folder, s.fold), desc.to_csv())
    return written


def _write_if_changed(path: Path, text: str) -> None:
    """Write ``text`` atomically unless ``path`` already holds it (a rerun changes no file)."""
    try:
        if path.read_text(encoding="utf-8") == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    write_text_atomic(path, text)


def _read_split_csv(path: Path, fold: int) -> FoldSplit:
    import pandas as pd

    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # pandas raises many types for malformed CSV
        raise ConfigError(f"Cannot read split file {path} as CSV: {exc}") from exc
    cols = {str(c).strip().lower(): c for c in df.columns}
    if "train" not in cols:
        raise ConfigError(f"Split file {path} has no 'train' column (columns: {', '.join(map(str, df.columns))}); "
                          "a split file has the columns train, val, test.")
    parts = {}
    for p in PARTITIONS:
        values = [v.strip() for v in df[cols[p]]] if p in cols else []
        parts[p] = tuple(dict.fromkeys(v for v in values if v))  # drop blanks, keep order, no repeats
    return FoldSplit(fold, parts["train"], parts["val"], parts["test"])


def load_splits(path: str | os.PathLike[str]) -> list[FoldSplit]:
    """Read split lists as written, ids unresolved.

    Args:
        path: a folder of ``splits_<k>.csv`` files (CLAM, 2DMamba), or one CSV file with train/val/test
            columns (read as fold 0).
    """
    path = Path(path).expanduser()
    if path.is_file():
        return [_read_split_csv(path, 0)]
    if not path.is_dir():
        raise ConfigError(f"Splits not found: {path} is neither a folder of splits_<k>.csv files nor a CSV file.")
    files = sorted(((int(m.group(1)), p) for p in path.iterdir() if (m := _SPLIT_FILE.match(p.name))))
    if not files:
        raise ConfigError(f"No splits_<k>.csv files in {path}.")
    ks = [k for k, _ in files]
    if ks != list(range(len(ks))):
        raise ConfigError(f"Split files in {path} are numbered {ks}; expected splits_0.csv … "
                          f"splits_{len(ks) - 1}.csv without gaps.")
    return [_read_split_csv(p, k) for k, p in files]


# ----------------------------------------------------------------------------------- checks, resolving

def find_leaks(splits: Sequence[FoldSplit], patient_of: Mapping[str, str] | Callable[[str], str] | None = None,
               ) -> list[Leak]:
    """Patients that appear in more than one partition of a fold.

    Args:
        splits: split lists (slide or patient ids).
        patient_of: maps an id to its patient (a mapping, or a function); ids it does not know, and
            every id when it is None, are taken as patient ids.
    """
    if patient_of is None:
        to_patient: Callable[[str], str] = lambda i: i  # noqa: E731
    elif callable(patient_of):
        to_patient = patient_of
    else:
        to_patient = lambda i: patient_of.get(i, i)  # noqa: E731
    leaks = []
    for s in splits:
        where: dict[str, list[str]] = defaultdict(list)
        for p in PARTITIONS:
            for pid in dict.fromkeys(to_patient(i) for i in s.partition(p)):
                where[pid].append(p)
        leaks += [Leak(s.fold, pid, tuple(parts)) for pid, parts in sorted(where.items(), key=lambda kv: str(kv[0]))
                  if len(parts) > 1]
    return leaks


def resolve_splits(splits: Sequence[FoldSplit], cohort: Cohort) -> tuple[list[FoldSplit], list[str]]:
    """Turn split lists of slide or patient ids into slide ids of ``cohort``, refusing leaks.

    Returns:
        The resolved splits, and warnings: ids of the split lists that are not in the cohort (skipped)
        and cohort slides left out of a fold.

    Raises:
        SplitLeakError: a patient's slides are in two partitions of one fold (names the patients).
    """
    slide_ids = set(cohort.slide_ids)
    slides_of: dict[str, list[str]] = defaultdict(list)
    for r in cohort:
        slides_of[r.patient_id].append(r.slide_id)
    patient_of = {r.slide_id: r.patient_id for r in cohort}
    resolved, warnings = [], []
    for s in splits:
        parts: dict[str, tuple[str, ...]] = {}
        unknown = []
        for p in PARTITIONS:
            out: list[str] = []
            for i in s.partition(p):
                if i in slide_ids:
                    out.append(i)
                elif i in slides_of:
                    out += slides_of[i]
                else:
                    unknown.append(i)
            parts[p] = tuple(dict.fromkeys(out))
        fs = FoldSplit(s.fold, parts["train"], parts["val"], parts["test"])
        if unknown:
            shown = ", ".join(unknown[:5]) + (f" … ({len(unknown)} in all)" if len(unknown) > 5 else "")
            warnings.append(f"fold {s.fold}: {len(unknown)} id(s) of the split lists are not in the cohort "
                            f"and were skipped: {shown}")
        missing = sorted(slide_ids - set(fs.partition_of()))
        if missing:
            shown = ", ".join(missing[:5]) + (f" … ({len(missing)} in all)" if len(missing) > 5 else "")
            warnings.append(f"fold {s.fold}: {len(missing)} cohort slide(s) are in no partition and are "
                            f"not used: {shown}")
        resolved.append(fs)
    leaks = find_leaks(resolved, patient_of)
    if leaks:
        shown = "; ".join(str(lk) for lk in leaks[:10])
        more = f" (and {len(leaks) - 10} more)" if len(leaks) > 10 else ""
        raise SplitLeakError(f"The splits put a patient in two partitions, which leaks information between "
                             f"training and evaluation: {shown}{more}. Fix the split files (every slide of "
                             f"a patient in one partition) or let wsi2dmamba make the splits.")
    if slide_level_patients(patient_of):
        warnings.append(SLIDE_LEVEL_PATIENTS)
    for fs in resolved:
        for p in ("train", "val"):
            if not fs.partition(p):
                raise ConfigError(f"fold {fs.fold}: the {p} partition has no slide of the cohort.")
        if not fs.test:
            warnings.append(f"fold {fs.fold}: no test partition; only validation metrics can be reported, "
                            "and they are optimistic because the checkpoint is chosen on them.")
    return resolved, warnings
