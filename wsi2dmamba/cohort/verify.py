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

import csv
import json
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import GridFileError, WsiError
from ..fileio import file_sha256
from .ledger import SlideState, parse_state

_TMP_PREFIX = ".tmp-"
_STATE_DIR = ".state"
#: Header key of a checkpoint's model configuration (see ``models/checkpoint.py``).
_CHECKPOINT_CONFIG_KEY = "wsi2dmamba.model_config"
#: Stage-level file holding the parameters of the stage's last run (not a per-slide output).
CONFIG_FILE = "config.json"
#: The files of a finished training fold; ``done.json``, written last, records their sha256 (as
#: ``FOLD_OUTPUTS`` in ``training/loop.py``, not imported here so that verify does not load torch).
FOLD_FILES = ("config.json", "log.csv", "best.safetensors", "best.json", "last.safetensors", "last.json",
              "predictions.csv")
_PREDICTION_COLUMNS = ("fold", "checkpoint", "epoch", "partition", "slide_id")


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
        if e.name == _STATE_DIR:
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
                    f"{stage_dir}/{_STATE_DIR} under the name {sf.stem!r}; it was moved or edited")
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
        try:
            actual = file_sha256(p)
        except OSError as exc:
            report._add("error", rel, f"cannot be read ({exc})")
            continue
        if actual != recorded:
            report._add("error", rel, f"content changed since stage {st.stage!r} wrote it (sha256 {actual[:12]}… "
                        f"≠ recorded {str(recorded)[:12]}…); rerun the stage with --force")
            continue
        if content:
            problem = check_content(p)
            if problem:
                report._add("error", rel, problem)


def check_content(path: Path) -> str | None:
    """Validate one file by its kind; return what is wrong, or None.

    ``.h5`` files are read and validated as grid files, ``.json``/``.geojson`` parsed, ``.safetensors``
    opened (header and tensor table, without loading any code), ``.csv`` parsed. Other kinds pass.
    """
    suffix = path.suffix.lower()
    try:
        if suffix == ".h5":
            return _check_grid_file(path)
        if suffix in (".json", ".geojson"):
            json.loads(path.read_text(encoding="utf-8"))
        elif suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as fh:
                width = None
                reader = csv.reader(fh)
                for row in reader:
                    if row and width is None:
                        width = len(row)
                    elif row and len(row) != width:  # the tool's tables are rectangular: a cut-off row
                        raise ValueError(f"line {reader.line_num} has {len(row)} field(s), the header {width}")
        elif suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as f:
                for key in f.keys():
                    f.get_slice(key).get_shape()
    except (OSError, ValueError, UnicodeDecodeError, csv.Error) as exc:
        return f"content is not valid {suffix[1:]} ({exc})"
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        return f"content is not valid {suffix[1:]} ({type(exc).__name__}: {exc})"
    return None


def _check_grid_file(path: Path) -> str | None:
    import h5py

    from ..grid import read_feature_grid, read_tile_grid

    try:
        with h5py.File(path, "r") as f:
            kind = f.attrs.get("kind", "")
            has_features = "features" in f
    except OSError as exc:
        return f"not a readable HDF5 file ({exc})"
    try:
        if kind == "features" or has_features:
            read_feature_grid(path)
        else:
            read_tile_grid(path)
    except GridFileError as exc:
        return str(exc)
    return None


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
                    "ledger.csv and the state files: fix them and rerun the stage")
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
            if p is not None and p.suffix == ".h5" and Path(rel).parts[:1] == ("tiles",):
                tiles_of[st.slide_id] = p
    return tiles_of


def _feature_tile_pairs(run: Path, states: list[SlideState], report: VerifyReport):
    """(state, relative path, feature grid file, tiles file) of every finished slide's feature grid whose
    tiles file is recorded too; both files exist and neither was already reported as changed or invalid
    (a damaged HDF5 file can crash the library: it is not opened again)."""
    tiles_of = _tiles_files(run, states)
    refused = {Path(f.path) for f in report.errors}
    for st in states:
        if st.status != "done" or Path(st.stage).parts[:1] != ("features",) or st.slide_id not in tiles_of:
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
    for p in sorted(run.rglob("*.safetensors")):
        if p.name.startswith(_TMP_PREFIX):
            continue
        rel = _rel(run, p)
        report.files_checked += 1
        problem = check_content(p)
        if problem:
            report._add("error", rel, problem + "; retrain this fold (delete the fold's folder first)")
            continue
        sidecar = p.with_suffix(".json")
        if not sidecar.is_file():
            continue
        try:
            from safetensors import safe_open

            with safe_open(str(p), framework="numpy") as f:
                header = (f.metadata() or {}).get(_CHECKPOINT_CONFIG_KEY)
            stated = json.loads(sidecar.read_text(encoding="utf-8")).get("model")
            stored = json.loads(header) if header is not None else None
        except (OSError, ValueError, AttributeError) as exc:
            report._add("error", _rel(run, sidecar), f"cannot be read with its checkpoint ({exc})")
            continue
        if stored is not None and stated is not None and stored != stated:
            report._add("error", rel, f"the model configuration in its header differs from {sidecar.name}; one of "
                        "the two was replaced: retrain this fold")


def find_fold_dirs(run: Path) -> list[Path]:
    """Training fold folders ``train/<name>/fold_<k>`` below ``run``, sorted."""
    return sorted(p for p in run.glob("train/*/fold_*")
                  if p.is_dir() and p.name[len("fold_"):].isdigit() and not p.name.startswith(_TMP_PREFIX))


def _retrain(fold: Path) -> str:
    return f"retrain this fold (wsi2dmamba train … --name {fold.parent.name} --fold {fold.name[5:]} --force)"


def _read_json_object(run: Path, path: Path, report: VerifyReport, what: str) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None after reporting why it cannot be used."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        report._add("error", _rel(run, path), f"{what} cannot be read ({exc}); {_retrain(path.parent)}")
        return None
    if not isinstance(data, dict):
        report._add("error", _rel(run, path), f"{what} is not a JSON object; {_retrain(path.parent)}")
        return None
    return data


def _check_fold(run: Path, fold: Path, report: VerifyReport, content: bool) -> None:
    """One training fold: its files against the sha256 ``done.json`` records, and (``content``) against each
    other and the fold's configuration."""
    rel = _rel(run, fold)
    report.folds_checked += 1
    retrain = _retrain(fold)
    if not (fold / "done.json").is_file():
        how = ("it continues from its last finished epoch" if (fold / "resume.safetensors").is_file()
               else "it starts again")
        report._add("warning", rel, f"training fold is not finished (no done.json): run the same `wsi2dmamba "
                    f"train` again and {how}")
        return
    done = _read_json_object(run, fold / "done.json", report, "the record of the finished fold")
    if done is None:
        return
    missing = {n for n in FOLD_FILES if not (fold / n).is_file()}
    for name in sorted(missing):
        report._add("error", _rel(run, fold / name), f"missing from a finished training fold; {retrain}")
    recorded = done.get("outputs")
    if recorded is None:
        report._add("warning", _rel(run, fold / "done.json"), "records no sha256 of the fold's files (written by "
                    "an older version of wsi2dmamba); only their content can be checked")
        recorded = {}
    elif not isinstance(recorded, dict):
        report._add("error", _rel(run, fold / "done.json"), f"its 'outputs' is not a mapping; {retrain}")
        recorded = {}
    for name, sha in sorted(recorded.items()):
        p = fold / str(name)
        if p.parent != fold or name in ("", ".", ".."):
            report._add("error", _rel(run, fold / "done.json"), f"records {name!r}, which is not a file of the "
                        "fold; the record was edited, do not trust this fold")
            continue
        if name in missing:
            continue
        if not p.is_file():
            report._add("error", _rel(run, p), f"recorded in done.json but missing; {retrain}")
            continue
        report.files_checked += 1
        try:
            actual = file_sha256(p)
        except OSError as exc:
            report._add("error", _rel(run, p), f"cannot be read ({exc})")
            continue
        if actual != sha:
            report._add("error", _rel(run, p), f"content changed since training wrote it (sha256 {actual[:12]}… "
                        f"≠ recorded {str(sha)[:12]}…); {retrain}")
    if (fold / "resume.safetensors").is_file():
        report._add("warning", _rel(run, fold / "resume.safetensors"), "left by a run stopped just after the fold "
                    "finished; the next `wsi2dmamba train` of this model removes it")
    if "config.json" in missing:
        return
    config = _read_json_object(run, fold / "config.json", report, "the fold's configuration")
    if config is None:
        return
    if done.get("config_hash") != config.get("config_hash"):
        report._add("error", _rel(run, fold / "config.json"), "holds another configuration than the one the "
                    f"finished fold was trained with (done.json); {retrain}")
    if content:
        for problem_path, problem in _fold_content_problems(run, fold, done, config, missing):
            report._add("error", problem_path, f"{problem}; {retrain}")


def _csv_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file with a header; ValueError when it is not a valid table."""
    problem = check_content(path)
    if problem:
        raise ValueError(problem)
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _fold_content_problems(run: Path, fold: Path, done: dict[str, Any], config: dict[str, Any],
                           missing: set[str]) -> list[tuple[str, str]]:
    """(file, problem) for every file of a finished fold that disagrees with ``config.json``/``done.json``."""
    import math

    problems: list[tuple[str, str]] = []
    rel = lambda name: _rel(run, fold / name)  # noqa: E731
    epochs, best_epoch = done.get("epochs"), done.get("best_epoch")
    # Checkpoints: the model of config.json, from the epochs done.json names (opened by _check_checkpoints).
    for name, epoch in (("best", best_epoch), ("last", epochs)):
        if f"{name}.safetensors" in missing or check_content(fold / f"{name}.safetensors"):
            continue  # reported already
        try:
            from safetensors import safe_open

            with safe_open(str(fold / f"{name}.safetensors"), framework="numpy") as f:
                header = (f.metadata() or {}).get(_CHECKPOINT_CONFIG_KEY)
            stored = json.loads(header) if header is not None else None
        except (OSError, ValueError) as exc:
            problems.append((rel(f"{name}.safetensors"), f"its header cannot be read ({exc})"))
            continue
        if stored != config.get("model"):
            problems.append((rel(f"{name}.safetensors"), "its model configuration differs from the fold's "
                             "config.json"))
        if f"{name}.json" not in missing:
            try:
                side = json.loads((fold / f"{name}.json").read_text(encoding="utf-8"))
                stated = side.get("epoch") if isinstance(side, dict) else None
            except (OSError, ValueError) as exc:
                problems.append((rel(f"{name}.json"), f"cannot be read ({exc})"))
                continue
            if stated != epoch:
                problems.append((rel(f"{name}.json"), f"is the checkpoint of epoch {stated}, done.json names "
                                 f"epoch {epoch}"))
    if "log.csv" not in missing:
        try:
            logged = [int(r["epoch"]) for r in _csv_rows(fold / "log.csv")]
        except (KeyError, TypeError, ValueError) as exc:
            problems.append((rel("log.csv"), f"is not a valid training log ({exc})"))
        else:
            if not isinstance(epochs, int) or logged != list(range(1, epochs + 1)):
                problems.append((rel("log.csv"), f"logs epochs {logged[:3]}…{logged[-1:]} but done.json says "
                                 f"{epochs} epoch(s)"))
    if "predictions.csv" not in missing:
        try:
            rows = _csv_rows(fold / "predictions.csv")
            if rows and not set(_PREDICTION_COLUMNS) <= set(rows[0]):
                raise ValueError(f"it lacks the column(s) {sorted(set(_PREDICTION_COLUMNS) - set(rows[0]))}")
        except ValueError as exc:
            problems.append((rel("predictions.csv"), f"is not a valid predictions table ({exc})"))
        else:
            split = config.get("split") if isinstance(config.get("split"), dict) else {}
            want_epoch = {"best": best_epoch, "last": epochs}
            for ckpt in ("best", "last"):
                for part in ("val", "test"):
                    got = [r for r in rows if r["checkpoint"] == ckpt and r["partition"] == part]
                    expected = sorted(map(str, split.get(part, [])))
                    if sorted(r["slide_id"] for r in got) != expected:
                        problems.append((rel("predictions.csv"), f"its {ckpt}/{part} rows are not the {len(expected)} "
                                         f"slide(s) of the fold's {part} partition in config.json"))
                    elif any(r["epoch"] != str(want_epoch[ckpt]) or r["fold"] != str(config.get("fold"))
                             for r in got):
                        problems.append((rel("predictions.csv"), f"its {ckpt} rows name another fold or epoch than "
                                         "config.json and done.json"))
            numeric = [c for c in (rows[0] if rows else {}) if c.startswith(("prob_", "surv_")) or c == "risk"]
            for r in rows:
                try:
                    ok = all(math.isfinite(float(r[c])) for c in numeric)
                except ValueError:
                    ok = False
                if not ok:
                    problems.append((rel("predictions.csv"), f"the row of slide {r['slide_id']!r} "
                                     f"({r['checkpoint']}, {r['partition']}) holds a value that is not a number"))
                    break
    problems += _split_problems(run, fold, config)
    return problems


def _split_problems(run: Path, fold: Path, config: dict[str, Any]) -> list[tuple[str, str]]:
    """The fold must have been trained on the run's ``train/splits/splits_<k>.csv``."""
    k = config.get("fold")
    path = run / "train" / "splits" / f"splits_{k}.csv"
    split = config.get("split")
    if not path.is_file() or not isinstance(split, dict):
        return []  # a fold trained outside a run's layout; nothing to compare with
    try:
        rows = _csv_rows(path)
    except ValueError as exc:
        return [(_rel(run, path), f"is not a valid split file ({exc})")]
    for part in ("train", "val", "test"):
        listed = sorted(r.get(part) or "" for r in rows)
        if [s for s in listed if s] != sorted(map(str, split.get(part, []))):
            return [(_rel(run, fold / "config.json"), f"fold {k} was trained with another {part} partition than "
                     f"{_rel(run, path)} lists")]
    return []


def _check_stage_configs(run: Path, states: list[SlideState], report: VerifyReport) -> None:
    """A stage folder's ``config.json`` (the parameters its last run was started with, read by later
    stages) should be the parameters its finished slides were made with."""
    from ..fileio import params_hash

    done: dict[str, set[str]] = defaultdict(set)
    for st in states:
        if st.status == "done":
            done[st.stage].add(st.params_hash)
    for stage, hashes in sorted(done.items()):
        cfg = run / stage / CONFIG_FILE
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
    stage_dirs = {(run / st.stage).resolve() for st in states}
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
            if p.resolve() not in recorded and not (relp == Path(CONFIG_FILE)):
                report._add("warning", _rel(run, p), "not recorded as an output of any finished slide (left by "
                            "a failed slide or an earlier run with other parameters)")


def _prefixes(rel: Path) -> list[Path]:
    parts = rel.parts[:-1]
    return [Path(*parts[: i + 1]) for i in range(len(parts))]


def _check_ledger(run: Path, states: list[SlideState], report: VerifyReport) -> None:
    ledger = run / "ledger.csv"
    if not ledger.is_file():
        report._add("warning", "ledger.csv", "missing; it is rebuilt from the state files by the next stage run")
        return
    try:
        with open(ledger, newline="", encoding="utf-8") as fh:
            rows = {(r.get("stage", ""), r.get("slide_id", ""), r.get("status", ""), r.get("params_hash", ""))
                    for r in csv.DictReader(fh)}
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        report._add("warning", "ledger.csv", f"cannot be read ({exc}); it is rebuilt by the next stage run")
        return
    expected = {(s.stage, s.slide_id, s.status, s.params_hash) for s in states}
    if rows != expected:
        report._add("warning", "ledger.csv", f"out of date with the state files ({len(expected - rows)} state(s) "
                    f"not in it, {len(rows - expected)} row(s) without a state); it is rebuilt by the next "
                    "stage run (the state files are the record)")


def fold_problems(fold_dir: str | os.PathLike[str]) -> list[str]:
    """Why the files of a finished training fold do not belong together, one line each (empty: they do).

    The checks of ``verify`` for one fold ``RUN/train/<name>/fold_<k>``: every file has the sha256 that
    ``done.json`` records, and configuration, checkpoints, log and predictions agree with each other and
    with the run's splits (a fold mixed from two jobs or configurations fails them).
    """
    fold = Path(fold_dir).resolve()
    run = fold.parent.parent.parent
    report = VerifyReport(run)
    _check_fold(run, fold, report, content=True)
    return [f"{f.path}: {f.message}" for f in report.errors]
