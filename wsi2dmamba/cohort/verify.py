"""Check a run folder against what it recorded: ``wsi2dmamba verify RUN``.

Every per-slide stage records, for each slide, a state file (``RUN/<stage_dir>/.state/<slide_id>.json``)
with the sha256 of each output file, the hash of the parameters that made it, and a fingerprint (size,
modification time) of the slide file. :func:`verify_run` re-reads all of it and reports:

* errors: an output that is missing, whose bytes changed since it was written, that lies outside the run
  folder, or whose content is not a valid file of its kind (grid files are fully validated); a damaged state
  file; slides of one stage made with different parameters; a feature grid whose lattice differs from the
  slide's tiles file (the tiles were redone after extraction); a slide file that changed after it was
  processed; a checkpoint (``*.safetensors``, anywhere in the run) that does not open, or whose header's
  model configuration differs from its ``.json`` sidecar;
* errors in training folds (``RUN/train/<name>/fold_<k>/``, finished when ``done.json`` exists): a file of a
  finished fold that is missing or whose sha256 differs from the one ``done.json`` records; a configuration,
  checkpoint, log or predictions file that disagrees with the fold's ``config.json``/``done.json`` (another
  model, other epochs, other slides than the fold's split, non-numbers); a fold trained on other splits
  than ``train/splits/splits_<k>.csv``;
* errors in a folder of ``wsi2dmamba predict`` (``predict.json``): a prediction table that disagrees with
  the per-slide prediction files, or a slide predicted with another bundle than the one recorded;
* warnings: slides that failed, half-written temporaries left by a killed process, files that no state
  records, a ledger that is out of date, a slide file that is no longer where it was, a training fold that
  is not finished.

The check only reads: it never changes the run.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import fold_files
from .. import run_layout as layout
from ..errors import GridFileError, WsiError
from ..fileio import check_csv, check_json, recorded_sha256_problem
from .ledger import SlideState, ledger_problem, parse_state

_TMP_PREFIX = ".tmp-"
#: Stage-level file holding the parameters of the stage's last run (not a per-slide output).
CONFIG_FILE = layout.STAGE_CONFIG
#: The files of a finished training fold; ``done.json``, written last, records their sha256.
FOLD_FILES = layout.FOLD_OUTPUTS


@dataclass(frozen=True)
class Finding:
    """One problem found in a run.

    Attributes:
        level: ``"error"`` (the run cannot be trusted as is) or ``"warning"`` (worth knowing, harmless).
        path: the file concerned, relative to the run folder.
        message: what is wrong and what to do.
    """

    level: str
    path: str
    message: str

    def line(self) -> str:
        return f"{self.level}: {self.path}: {self.message}"


@dataclass
class VerifyReport:
    """Result of :func:`verify_run`.

    Attributes:
        run_dir: the run folder checked.
        states_checked: state files read.
        folds_checked: training folds (``train/<name>/fold_<k>``) checked.
        files_checked: output files whose sha256 was compared with the recorded one, and checkpoints opened.
        findings: every error and warning, in the order found.
    """

    run_dir: Path
    states_checked: int = 0
    folds_checked: int = 0
    files_checked: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        folds = f" and {self.folds_checked} training fold(s)" if self.folds_checked else ""
        return (f"verify {self.run_dir}: {self.files_checked} file(s) checked in {self.states_checked} "
                f"state(s){folds}; {len(self.errors)} error(s), {len(self.warnings)} warning(s)")

    def to_dict(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "states_checked": self.states_checked,
                "folds_checked": self.folds_checked,
                "files_checked": self.files_checked, "ok": self.ok,
                "findings": [asdict(f) for f in self.findings]}

    def _add(self, level: str, path: str | Path, message: str) -> None:
        self.findings.append(Finding(level, str(path), message))


def verify_run(run_dir: str | os.PathLike[str], *, content: bool = True, sources: bool = True,
               progress: bool = False) -> VerifyReport:
    """Check every file of a run against its recorded hashes and parameters.

    Args:
        run_dir: the run folder (``--out`` of the stages).
        content: also validate each output's content by kind (grid files, JSON, safetensors), and compare
            each feature grid's lattice with the slide's tiles file.
        sources: also compare each slide file with the fingerprint recorded when it was processed.
        progress: show a progress bar over the state files.

    Raises:
        WsiError: ``run_dir`` is not a folder, or holds neither a state file nor a training fold.
    """
    run = Path(run_dir).expanduser()
    if not run.is_dir():
        raise WsiError(f"Run folder not found: {run}. Pass the folder given as --out to the stages.")
    run = run.resolve()
    state_files = find_state_files(run)
    fold_dirs = find_fold_dirs(run)
    if not state_files and not fold_dirs:
        raise WsiError(f"{run} holds no stage state (no */.state/*.json) and no training fold (train/*/fold_*): "
                       "it is not a wsi2dmamba run folder, or no stage has finished a slide yet.")
    report = VerifyReport(run)
    states: list[SlideState] = []
    from tqdm.auto import tqdm

    for sf in tqdm(state_files, desc="verify", unit="state", disable=not progress, dynamic_ncols=True):
        st = _load_state(run, sf, report)
        if st is None:
            continue
        report.states_checked += 1
        states.append(st)
        if st.status == "done":
            _check_outputs(run, st, report, content)
        if sources:
            _check_source(run, sf, st, report)
    _check_params(states, report)
    if content:
        _check_features_match_tiles(run, states, report)
    _check_stage_configs(run, states, report)
    if content:
        _check_checkpoints(run, report)
    for fold in fold_dirs:
        _check_fold(run, fold, report, content)
    _check_unrecorded(run, states, report)
    from .verify_predictions import check_predictions  # a folder of `predict`: its tables

    check_predictions(run, report._add)
    if state_files:  # a run holding only training (features made elsewhere) has no ledger
        _check_ledger(run, states, report)
    return report


def find_state_files(run: Path) -> list[Path]:
    """Every ``<stage_dir>/.state/*.json`` below ``run`` (stage folders may be nested, e.g.
    ``features/<encoder>``), sorted."""
    found = []
    for d in _state_dirs(run, _MAX_STAGE_DEPTH):
        found.extend(p for p in sorted(d.glob("*.json")) if not p.name.startswith(_TMP_PREFIX))
    return found


# Stage folders lie at most this deep below the run (``features/<encoder>``); a deeper search would walk a
# whole disk when ``verify`` is given a folder that is not a run, such as ``/``.
_MAX_STAGE_DEPTH = 3


def _state_dirs(folder: Path, depth: int) -> list[Path]:
    """``.state`` folders at most ``depth`` levels below ``folder``, sorted; links and unreadable folders
    are not followed."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:  # unreadable, or gone meanwhile (e.g. below /proc)
        return []
    found = []
    for e in entries:
        try:
            is_dir = e.is_dir(follow_symlinks=False)
        except OSError:
            continue
        if not is_dir:
            continue
        if e.name == layout.STATE_DIR:
            found.append(Path(e.path))
        elif depth > 1 and not e.name.startswith("."):
            found.extend(_state_dirs(Path(e.path), depth - 1))
    return found


def _rel(run: Path, p: Path) -> str:
    return os.path.relpath(p, run)


def _load_state(run: Path, sf: Path, report: VerifyReport) -> SlideState | None:
    rel = _rel(run, sf)
    try:
        st = parse_state(json.loads(sf.read_text(encoding="utf-8")))
    except (OSError, ValueError, RecursionError) as exc:
        report._add("error", rel, f"state file cannot be read ({exc}); rerun the stage with --force for this "
                    "slide, or delete the file so the slide is processed again")
        return None
    if not isinstance(st.outputs, dict) or not isinstance(st.source, dict) or not isinstance(st.stage, str):
        report._add("error", rel, "state file has fields of the wrong type; rerun the stage for this slide")
        return None
    stage_dir = _rel(run, sf.parent.parent)
    if Path(st.stage) != Path(stage_dir) or st.slide_id != sf.stem:
        report._add("error", rel, f"state file says stage {st.stage!r}, slide {st.slide_id!r} but lies in "
                    f"{stage_dir}/{layout.STATE_DIR} under the name {sf.stem!r}; it was moved or edited")
    return st


def _inside(run: Path, rel: str) -> Path | None:
    """The absolute output path if ``rel`` stays inside the run folder, else None."""
    p = (run / rel).resolve()
    return p if p == run or run in p.parents else None


def _check_outputs(run: Path, st: SlideState, report: VerifyReport, content: bool) -> None:
    for rel, recorded in sorted(st.outputs.items()):
        p = _inside(run, rel)
        if p is None:
            report._add("error", rel, f"recorded as an output of slide {st.slide_id!r} in stage {st.stage!r} but "
                        "lies outside the run folder; the state file was edited, do not trust this run")
            continue
        if not p.is_file():
            report._add("error", rel, f"output of slide {st.slide_id!r} (stage {st.stage!r}) is missing; rerun "
                        "the stage (the slide will be processed again)")
            continue
        report.files_checked += 1
        problem = recorded_sha256_problem(p, recorded, f"stage {st.stage!r}", "rerun the stage with --force")
        if problem:
            report._add("error", rel, problem)
            continue
        if content:
            problem = check_content(p)
            if problem:
                report._add("error", rel, problem)


def check_content(path: Path) -> str | None:
    """Validate one file by its kind; return what is wrong, or None.

    ``.h5`` files are read and validated as grid files, ``.json``/``.geojson`` parsed, ``.safetensors``
    opened (header and tensor table, without loading any code), ``.csv`` parsed. Other kinds pass. Each
    check lives beside the writer of its kind.
    """
    from ..grid import check_grid_file

    checks = {".h5": check_grid_file, ".json": check_json, ".geojson": check_json, ".csv": check_csv,
              ".safetensors": fold_files.check_safetensors}
    suffix = path.suffix.lower()
    check = checks.get(suffix)
    try:
        return check(path) if check is not None else None
    except (OSError, ValueError) as exc:  # a reader's error that its check does not word itself
        return f"content is not valid {suffix[1:]} ({exc})"


def _check_source(run: Path, sf: Path, st: SlideState, report: VerifyReport) -> None:
    src = st.source or {}
    path = src.get("path")
    if not path or src.get("missing"):
        return
    rel = _rel(run, sf)
    try:
        now = Path(path).stat()
    except OSError:
        report._add("warning", rel, f"slide file {path} is no longer there; its outputs cannot be compared "
                    "with it (fine if the run was moved to another machine)")
        return
    if (now.st_size, now.st_mtime_ns) != (src.get("size"), src.get("mtime_ns")):
        report._add("error", rel, f"slide file {path} changed after stage {st.stage!r} processed it (size or "
                    "modification time differ); rerun the stage: the slide will be processed again")


def _check_params(states: Iterable[SlideState], report: VerifyReport) -> None:
    by_stage: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    failed: dict[str, list[str]] = defaultdict(list)
    for st in states:
        if st.status == "done":
            by_stage[st.stage][st.params_hash].append(st.slide_id)
        else:
            failed[st.stage].append(st.slide_id)
    for stage, ids in sorted(failed.items()):
        report._add("warning", stage, f"{len(ids)} slide(s) failed (e.g. {sorted(ids)[0]}); their reasons are in "
                    f"{layout.LEDGER} and the state files: fix them and rerun the stage")
    for stage, groups in sorted(by_stage.items()):
        if len(groups) > 1:
            parts = ", ".join(f"{h}: {len(ids)} slide(s) (e.g. {sorted(ids)[0]})"
                              for h, ids in sorted(groups.items(), key=lambda kv: -len(kv[1])))
            report._add("error", stage, f"slides were made with different parameters ({parts}); rerun the "
                        "stage over the whole cohort with one configuration")


def _check_features_match_tiles(run: Path, states: list[SlideState], report: VerifyReport) -> None:
    """A feature grid must sit on the same lattice as the slide's current tiles file."""
    import numpy as np

    from ..grid import read_tile_grid

    for st, rel, p, tiles in _feature_tile_pairs(run, states, report):
        try:
            a, b = read_tile_grid(tiles), read_tile_grid(p)
        except GridFileError:
            continue  # already reported by the content check
        if a.shape != b.shape or not np.array_equal(a.index, b.index) or not np.array_equal(a.coords, b.coords):
            report._add("error", rel, f"features of slide {st.slide_id!r} lie on another lattice than "
                        f"{_rel(run, tiles)} ({b.shape} vs {a.shape} cells, {b.n_tiles} vs "
                        f"{a.n_tiles} tiles): the slide was tiled again after extraction; rerun extract")


def _tiles_files(run: Path, states: list[SlideState]) -> dict[str, Path]:
    """slide id → its recorded tiles file."""
    tiles_of: dict[str, Path] = {}
    for st in states:
        if st.status != "done":
            continue
        for rel in st.outputs:
            p = _inside(run, rel)
            if p is not None and p.suffix == ".h5" and Path(rel).parts[:1] == (layout.TILES_DIR,):
                tiles_of[st.slide_id] = p
    return tiles_of


def _feature_tile_pairs(run: Path, states: list[SlideState], report: VerifyReport):
    """(state, relative path, feature grid file, tiles file) of every finished slide's feature grid whose
    tiles file is recorded too; both files exist and neither was already reported as changed or invalid
    (a damaged HDF5 file can crash the library: it is not opened again)."""
    tiles_of = _tiles_files(run, states)
    refused = {Path(f.path) for f in report.errors}
    for st in states:
        if st.status != "done" or Path(st.stage).parts[:1] != (layout.FEATURES_DIR,) or st.slide_id not in tiles_of:
            continue
        tiles = tiles_of[st.slide_id]
        for rel in st.outputs:
            p = _inside(run, rel)
            if _both_readable(run, rel, p, tiles, refused):
                yield st, rel, p, tiles


def _both_readable(run: Path, rel: str, p: Path | None, tiles: Path, refused: set[Path]) -> bool:
    if p is None or p.suffix != ".h5" or not p.is_file() or not tiles.is_file():
        return False
    return not {Path(rel), Path(_rel(run, tiles))} & refused


def _check_checkpoints(run: Path, report: VerifyReport) -> None:
    """Every safetensors checkpoint of the run opens (header and tensor table, no code loaded), and the
    model configuration in its header is the one its ``.json`` sidecar states."""
    for p in sorted(run.rglob("*" + layout.CHECKPOINT_SUFFIX)):
        if p.name.startswith(_TMP_PREFIX):
            continue
        report.files_checked += 1
        problem = fold_files.check_safetensors(p)
        if problem:
            report._add("error", _rel(run, p), problem + "; retrain this fold (delete the fold's folder first)")
            continue
        mismatch = fold_files.checkpoint_sidecar_problem(p)
        if mismatch is not None:
            report._add("error", _rel(run, mismatch[0]), mismatch[1])


def find_fold_dirs(run: Path) -> list[Path]:
    """Training fold folders ``train/<name>/fold_<k>`` below ``run``, sorted."""
    return sorted(p for p in layout.train_dir(run).glob(f"*/{layout.fold_glob()}")
                  if p.is_dir() and layout.fold_index(p) is not None)


def _check_fold(run: Path, fold: Path, report: VerifyReport, content: bool) -> None:
    """One training fold: its files against the sha256 ``done.json`` records, and (``content``) against each
    other, the fold's configuration and the run's splits (see :func:`wsi2dmamba.fold_files.check_fold`)."""
    report.folds_checked += 1
    checked = fold_files.check_fold(fold, content=content, splits=layout.splits_dir(run))
    report.files_checked += checked.files_checked
    for f in checked.findings:
        report._add(f.level, _rel(run, f.path), f.message)


def _check_stage_configs(run: Path, states: list[SlideState], report: VerifyReport) -> None:
    """A stage folder's ``config.json`` (the parameters its last run was started with, read by later
    stages) should be the parameters its finished slides were made with."""
    from ..fileio import params_hash

    done: dict[str, set[str]] = defaultdict(set)
    for st in states:
        if st.status == "done":
            done[st.stage].add(st.params_hash)
    for stage, hashes in sorted(done.items()):
        cfg = layout.stage_config(run, stage)
        if not cfg.is_file():
            continue
        rel = _rel(run, cfg)
        try:
            data = json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            report._add("error", rel, f"cannot be read ({exc}); rerun the stage")
            continue
        names = {Path(stage).name, Path(stage).parts[0]}
        if not hashes & {params_hash({"stage": name, "config": data}) for name in names}:
            report._add("warning", rel, "holds other parameters than the stage's finished slides were made with "
                        "(its last run was interrupted, refused, or ran another configuration); later stages "
                        "read it: rerun the stage so that both agree")


def _check_unrecorded(run: Path, states: list[SlideState], report: VerifyReport) -> None:
    recorded = {(run / rel).resolve() for st in states if st.status == "done" for rel in st.outputs}
    stage_dirs = {layout.stage_dir(run, st.stage).resolve() for st in states}
    for tmp in sorted(run.rglob(_TMP_PREFIX + "*")):
        report._add("warning", _rel(run, tmp), "half-written temporary left by a killed process (never read "
                    "as an output); the next run of that stage deletes it")
    for d in sorted(stage_dirs):
        if not d.is_dir():
            continue
        for p in sorted(d.rglob("*")):
            relp = p.relative_to(d)
            # Dot-names are housekeeping (states, locks, shard records); temporaries were reported above.
            if not p.is_file() or any(part.startswith(".") for part in relp.parts):
                continue
            # Another stage's folder nested inside this one is checked through its own states.
            if any((d / q) in stage_dirs for q in _prefixes(relp)):
                continue
            if p.resolve() not in recorded and relp != Path(layout.STAGE_CONFIG):
                report._add("warning", _rel(run, p), "not recorded as an output of any finished slide (left by "
                            "a failed slide or an earlier run with other parameters)")


def _prefixes(rel: Path) -> list[Path]:
    parts = rel.parts[:-1]
    return [Path(*parts[: i + 1]) for i in range(len(parts))]


def _check_ledger(run: Path, states: list[SlideState], report: VerifyReport) -> None:
    problem = ledger_problem(run, states)
    if problem:
        report._add("warning", layout.LEDGER, problem)


def fold_problems(fold_dir: str | os.PathLike[str]) -> list[str]:
    """Why the files of a finished training fold do not belong together, one line each (empty: they do).

    The checks of ``verify`` for one fold ``RUN/train/<name>/fold_<k>``: every file has the sha256 that
    ``done.json`` records, and configuration, checkpoints, log and predictions agree with each other and
    with the run's splits (a fold mixed from two jobs or configurations fails them).
    """
    fold = Path(fold_dir).resolve()
    run = fold.parents[2]
    report = VerifyReport(run)
    _check_fold(run, fold, report, content=True)
    return [f"{f.path}: {f.message}" for f in report.errors]
