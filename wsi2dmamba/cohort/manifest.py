"""Cohort manifests: one CSV row per slide.

Columns: ``slide_id`` (required), ``path`` (required for the slide stages; relative paths are resolved
against the manifest's folder), and optionally ``patient_id`` (defaults to ``slide_id``), ``label``,
``time`` (survival time, any unit, > 0), ``event`` (1 = event observed, 0 = censored), ``mpp``
(µm per level-0 pixel, overrides the slide's metadata). Any other column is kept in
:attr:`SlideRecord.extra` and carried to the reports.

All problems of a manifest are found and reported together, before any work starts.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ManifestError
from ..fileio import user_path
from ..slide.mpp import mpp_problem

KNOWN_COLUMNS = ("slide_id", "path", "patient_id", "label", "time", "event", "mpp")


@dataclass(frozen=True)
class SlideRecord:
    """One slide of a cohort.

    Attributes:
        slide_id: unique identifier, used to name every output file of the slide.
        path: absolute path of the slide file, or None when the manifest has no ``path`` column.
        patient_id: patient identifier (splits are made per patient).
        label: class label as written in the manifest, or None.
        time: survival time (> 0), or None.
        event: 1 if the event was observed, 0 if censored, or None.
        mpp: µm per level-0 pixel given by the user, or None to read it from the slide.
        extra: every other column, as strings.
    """

    slide_id: str
    path: Path | None
    patient_id: str
    label: str | None = None
    time: float | None = None
    event: int | None = None
    mpp: float | None = None
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Cohort:
    """An ordered, validated list of :class:`SlideRecord` read from one manifest file."""

    records: tuple[SlideRecord, ...]
    source: Path | None = None

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[SlideRecord]:
        return iter(self.records)

    def __getitem__(self, slide_id: str) -> SlideRecord:
        for r in self.records:
            if r.slide_id == slide_id:
                return r
        raise KeyError(slide_id)

    @property
    def slide_ids(self) -> list[str]:
        return [r.slide_id for r in self.records]

    @property
    def has_labels(self) -> bool:
        return all(r.label is not None for r in self.records)

    @property
    def has_survival(self) -> bool:
        return all(r.time is not None and r.event is not None for r in self.records)

    @classmethod
    def from_paths(cls, paths: Sequence[str | os.PathLike[str]], mpp: float | None = None) -> Cohort:
        """A cohort of single slide files (slide id = file name without its extension)."""
        records = []
        seen: set[str] = set()
        problems = []
        if mpp is not None and mpp_problem(mpp):
            problems.append(f"--slide-mpp: {mpp_problem(mpp)}")
        for p in paths:
            path = Path(p).expanduser().resolve()
            sid = _slide_id_from_path(path)
            bad_id = slide_id_problem(sid)
            if bad_id:
                problems.append(f"{path}: {bad_id}; rename the file or use a manifest")
            if sid in seen:
                problems.append(f"two slides would both be named {sid!r}; rename one or use a manifest")
            seen.add(sid)
            if not path.exists():
                problems.append(f"slide file not found: {path}")
            records.append(SlideRecord(slide_id=sid, path=path, patient_id=sid, mpp=mpp))
        if problems:
            raise ManifestError("Cannot run on the given slides:\n  - " + "\n  - ".join(problems))
        return cls(tuple(records))


def _slide_id_from_path(path: Path) -> str:
    name = path.name
    for ext in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem if path.is_file() or path.suffix else name


def load_cohort(path: str | os.PathLike[str], *, require_path: bool = True, check_files: bool = True,
                slides_dir: str | os.PathLike[str] | None = None) -> Cohort:
    """Read and validate a cohort manifest CSV.

    Args:
        path: the manifest file.
        require_path: the ``path`` column must be present and filled (slide stages need it).
        check_files: every slide file must exist.
        slides_dir: where to look for a slide whose ``path`` is empty: the first file in this folder
            (searched recursively) whose name without extension is the ``slide_id``.

    Raises:
        ManifestError: listing every problem found (file, row number as in a spreadsheet, column, fix).
    """
    path = user_path(path, "cohort manifest")
    if not path.is_file():
        raise ManifestError(f"Cohort manifest not found: {path}")
    header, rows = _read_table(path)
    _check_header(path, header, require_path=require_path and slides_dir is None)
    problems: list[str] = []
    base = path.resolve().parent
    index = _index_slides_dir(slides_dir) if slides_dir is not None else {}
    records: list[SlideRecord] = []
    seen: dict[str, int] = {}
    for line, row in rows:
        where = f"{path}, line {line}"
        sid = row["slide_id"].strip()
        bad_id = slide_id_problem(sid)
        if bad_id:
            problems.append(f"{where}: {bad_id}")
            continue
        if sid in seen:
            problems.append(f"{where}: duplicate slide_id {sid!r} (first on line {seen[sid]})")
            continue
        seen[sid] = line
        slide_path = _row_slide_path(row, sid, base, index, where, problems, require_path=require_path,
                                     check_files=check_files)
        records.append(_row_record(row, sid, slide_path, where, problems))
    if problems:
        shown = problems[:20]
        more = f"\n  … and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ManifestError(f"Cohort manifest {path} has {len(problems)} problem(s):\n  - "
                            + "\n  - ".join(shown) + more)
    return Cohort(tuple(records), source=path.resolve())


def _check_header(path: Path, header: Sequence[str], *, require_path: bool) -> None:
    if "slide_id" not in header:
        raise ManifestError(f"{path}: no 'slide_id' column (columns found: {', '.join(header) or 'none'}). "
                            "A manifest needs at least 'slide_id' and 'path'.")
    if require_path and "path" not in header:
        raise ManifestError(f"{path}: no 'path' column; add one with each slide's file "
                            "(relative to the manifest) or pass --slides-dir.")


def _row_slide_path(row: Mapping[str, str], sid: str, base: Path, index: Mapping[str, Path], where: str,
                    problems: list[str], *, require_path: bool, check_files: bool) -> Path | None:
    """The slide file of one manifest row (None when not given); what is wrong with it goes to ``problems``."""
    try:
        slide_path = _resolve_path(row.get("path", "").strip(), base, index.get(sid))
    except ValueError as exc:
        problems.append(f"{where}: column 'path' {exc}")
        return None
    if slide_path is None and require_path:
        problems.append(f"{where}: no path for slide {sid!r}; fill the 'path' column or pass --slides-dir")
    elif slide_path is not None and check_files and not _exists(slide_path):
        problems.append(f"{where}: slide file not found: {slide_path}")
    return slide_path


def _row_record(row: Mapping[str, str], sid: str, slide_path: Path | None, where: str,
                problems: list[str]) -> SlideRecord:
    """The slide record of one manifest row; what is wrong with its cells goes to ``problems``."""
    label = row.get("label", "").strip() or None
    time = _parse_float(row, "time", where, problems, positive=True)
    event = _parse_event(row, where, problems)
    mpp = _parse_float(row, "mpp", where, problems, positive=True)
    if mpp is not None and mpp_problem(mpp):
        problems.append(f"{where}: column 'mpp' (µm per level-0 pixel): {mpp_problem(mpp)}; fix the cell or "
                        "leave it empty to use the slide's metadata")
        mpp = None
    patient = row.get("patient_id", "").strip() or sid
    extra = {k: str(v) for k, v in row.items() if k not in KNOWN_COLUMNS}
    return SlideRecord(sid, slide_path, patient, label, time, event, mpp, extra)


#: Said wherever a cohort's patients are its slides (training warnings, evaluation notes, the report).
SLIDE_LEVEL_PATIENTS = (
    "every slide of the cohort is its own patient (patient_id equals slide_id, or the manifest has no "
    "patient_id column), so the patient-level splits, metrics and confidence intervals are slide-level: where "
    "a patient has several slides, they can sit in two partitions and the intervals are too narrow. Put the "
    "real patient ids in the manifest's patient_id column (BRACS: the patient ID column of the .xlsx on "
    "https://www.bracs.icar.cnr.it/details/).")


def slide_level_patients(patient_of: Mapping[str, str]) -> bool:
    """True when every slide id (key) maps to itself as its patient: no patient ids were given."""
    return len(patient_of) > 1 and all(s == p for s, p in patient_of.items())


#: Longest slide id, in UTF-8 bytes: output names add a suffix (``.tissue.geojson``) and temporaries a
#: prefix and a random part (``.tmp-<id>-k3j9x0_q.h5``), and file systems allow 255 bytes per name.
MAX_SLIDE_ID_BYTES = 200
_TMP_PREFIX = ".tmp-"  # temporaries of the atomic writers (see fileio): deleted when a stage starts


def slide_id_problem(sid: str) -> str | None:
    """Why ``sid`` cannot be a slide id (it names every output file of the slide), or None when it can."""
    import unicodedata

    if not sid:
        return "empty slide_id"
    if any(c in sid for c in "/\\") or sid in (".", ".."):
        return f"slide_id {sid!r} cannot be used as a file name (no '/', '\\', '.' or '..')"
    odd = sorted({c for c in sid if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp")})
    if odd:
        return (f"slide_id {sid!r} holds control or invisible character(s) "
                f"{', '.join(f'U+{ord(c):04X}' for c in odd)}; use printable characters only")
    if sid.startswith(_TMP_PREFIX):
        return (f"slide_id {sid!r} starts with {_TMP_PREFIX!r}, the prefix of temporary files (its outputs would "
                "be deleted as left-overs of a killed run); rename it")
    n = len(sid.encode("utf-8", "surrogatepass"))
    if n > MAX_SLIDE_ID_BYTES:
        return (f"slide_id {sid[:40]!r}… is {n} bytes long; at most {MAX_SLIDE_ID_BYTES} bytes (UTF-8) fit in the "
                "names of its output files; shorten it (keep the long name in another column)")
    return None


def _read_table(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """(column names, [(line number, {column: cell})]) of a CSV manifest; blank lines are skipped.

    Raises:
        ManifestError: not UTF-8 text, not CSV, a column named twice, a row with another number of cells
            than the header, or no row.
    """
    import csv

    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh, skipinitialspace=True)
            table = [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path} is not UTF-8 text ({exc}); save it as CSV UTF-8.") from exc
    except (csv.Error, OSError) as exc:
        raise ManifestError(f"Cannot parse cohort manifest {path} as CSV: {exc}") from exc
    if not table:
        raise ManifestError(f"{path}: the manifest is empty; it needs a header line (slide_id,path,…) and rows.")
    header = [c.strip() for c in table[0][1]]
    while header and not header[-1]:  # trailing separators of spreadsheets
        header.pop()
    dupes = sorted({c for c in header if header.count(c) > 1})
    if dupes:
        raise ManifestError(f"{path}: column(s) {', '.join(repr(c) for c in dupes)} appear more than once in the "
                            f"header (line {table[0][0]}); keep one of each (which one holds the right values is "
                            "ambiguous).")
    rows = []
    for line, cells in table[1:]:
        while len(cells) > len(header) and not cells[-1].strip():  # trailing separators of spreadsheets
            cells = cells[:-1]
        if len(cells) != len(header):
            raise ManifestError(
                f"{path}, line {line}: {len(cells)} cell(s), but the header has {len(header)} column(s) "
                f"({', '.join(header)}); every row needs one cell per column (leave a cell empty rather than "
                "leave it out, and quote cells holding a comma).")
        rows.append((line, dict(zip(header, cells))))
    if not rows:
        raise ManifestError(f"{path}: the manifest has no rows.")
    return header, rows


def _resolve_path(text: str, base: Path, found: Path | None) -> Path | None:
    """The absolute path of a manifest's ``path`` cell (relative to the manifest's folder).

    A path is data, never an option or shell text: it is only ever joined, resolved and opened, so a
    cell such as ``--help`` or ``$(touch x)`` names a (missing) file of that name next to the manifest.

    Raises:
        ValueError: the text cannot be a file name (a NUL character, a name the system rejects).
    """
    if not text:
        return found
    if "\0" in text:
        raise ValueError(f"{text!r} contains a NUL character and cannot be a file name; fix the cell")
    p = Path(text)
    if text.startswith("~"):
        try:
            p = p.expanduser()
        except RuntimeError:  # no home folder known for this user: keep the text as a name
            pass
    try:
        return (p if p.is_absolute() else base / p).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop, a name too long
        raise ValueError(f"{text!r} cannot be resolved to a file ({exc}); fix the cell") from exc


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # e.g. a name longer than the file system allows
        return False


def _index_slides_dir(slides_dir: str | os.PathLike[str]) -> dict[str, Path]:
    root = Path(slides_dir).expanduser()
    if not root.is_dir():
        raise ManifestError(f"--slides-dir {root} is not a folder")
    index: dict[str, Path] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() or (p.is_dir() and p.suffix):
            index.setdefault(_slide_id_from_path(p), p.resolve())
    return index


def _parse_float(row: dict, col: str, where: str, problems: list[str], positive: bool) -> float | None:
    text = row.get(col, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        problems.append(f"{where}: column '{col}' must be a number, got {text!r}")
        return None
    if not math.isfinite(value) or (positive and value <= 0):
        problems.append(f"{where}: column '{col}' must be a finite number > 0, got {text!r}")
        return None
    return value


def _parse_event(row: dict, where: str, problems: list[str]) -> int | None:
    text = row.get("event", "").strip().lower()
    if not text:
        return None
    mapping = {"1": 1, "0": 0, "1.0": 1, "0.0": 0, "true": 1, "false": 0}
    if text not in mapping:
        problems.append(f"{where}: column 'event' must be 1 (event) or 0 (censored), got {text!r}")
        return None
    return mapping[text]
