"""The files of a training fold: how training writes its records, and how each file is checked.

A fold folder (``RUN/train/<model>/fold_<k>``, names in :mod:`wsi2dmamba.run_layout`) holds the fold's
configuration, log, checkpoints with their JSON sidecars and predictions, then ``done.json``, written last
with the sha256 of each of those files. Training writes the record and the tables through this module;
``wsi2dmamba verify``, evaluation and export check them through it. The module needs no torch: a
checkpoint is checked from its safetensors header, without building the model.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import run_layout as layout
from .fileio import check_csv, file_sha256, recorded_sha256_problem, write_json_atomic, write_text_atomic

#: Header key of a checkpoint's model configuration (written by ``models.checkpoint.save_checkpoint``).
CHECKPOINT_CONFIG_KEY = "wsi2dmamba.model_config"
PREDICTION_COLUMNS = ("fold", "checkpoint", "epoch", "partition", "slide_id")


@dataclass(frozen=True)
class FoldFinding:
    """One problem of a fold's file: ``level`` ``"error"`` or ``"warning"``, the file, what is wrong."""

    level: str
    path: Path
    message: str


# ------------------------------------------------------------------------------------------------ writing
def table_text(rows: Sequence[dict[str, Any]]) -> str:
    """CSV text of ``rows`` (one column per key, in the order of the first row)."""
    import pandas as pd

    return pd.DataFrame(list(rows)).to_csv(index=False)


def write_table(path: str | os.PathLike[str], rows: Sequence[dict[str, Any]]) -> None:
    """Write a fold's table (``log.csv``, ``predictions.csv``, ``restarts.csv``) atomically."""
    write_text_atomic(path, table_text(rows))


def output_hashes(fold_dir: str | os.PathLike[str]) -> dict[str, str]:
    """The sha256 of each of the fold's :data:`~wsi2dmamba.run_layout.FOLD_OUTPUTS`."""
    return {n: file_sha256(layout.fold_file(fold_dir, n)) for n in layout.FOLD_OUTPUTS}


def write_done(fold_dir: str | os.PathLike[str], record: dict[str, Any]) -> Path:
    """Finish a fold: write ``done.json`` (``record`` plus the sha256 of the fold's files under
    ``outputs``). Written last, so that a fold with ``done.json`` has all its files."""
    path = layout.fold_file(fold_dir, layout.FOLD_DONE)
    write_json_atomic(path, {**record, "outputs": output_hashes(fold_dir)})
    return path


# ------------------------------------------------------------------------------------------------ reading
def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``.

    Raises:
        ValueError: the file cannot be read, is not JSON, or holds no object (said in the message).
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"cannot be read ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError("is not a JSON object")  # noqa: TRY004 (callers handle one error type for a bad file)
    return data


def csv_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file with a header; ValueError when it is not a valid table."""
    problem = check_csv(path)
    if problem:
        raise ValueError(problem)
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def checkpoint_model_config(path: Path) -> Any:
    """The model configuration in a checkpoint's header (None when the header has none), read without torch.

    Raises:
        OSError, ValueError: the header cannot be read.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        header = (f.metadata() or {}).get(CHECKPOINT_CONFIG_KEY)
    return json.loads(header) if header is not None else None


def check_safetensors(path: Path) -> str | None:
    """What is wrong with a safetensors file (header and tensor table opened, no code loaded), or None."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is no mapping)
                f.get_slice(key).get_shape()
    except (OSError, ValueError) as exc:
        return f"content is not valid safetensors ({exc})"
    except Exception as exc:  # noqa: BLE001 (safetensors raises its own error types for damaged headers)
        return f"content is not valid safetensors ({type(exc).__name__}: {exc})"
    return None


def checkpoint_sidecar_problem(path: Path) -> tuple[Path, str] | None:
    """A checkpoint whose header's model configuration differs from its ``.json`` sidecar: (file, problem)."""
    sidecar = layout.checkpoint_sidecar(path)
    if not sidecar.is_file():
        return None
    try:
        stored = checkpoint_model_config(path)
        stated = json.loads(sidecar.read_text(encoding="utf-8")).get("model")
    except (OSError, ValueError, AttributeError) as exc:
        return sidecar, f"cannot be read with its checkpoint ({exc})"
    if stored is not None and stated is not None and stored != stated:
        return path, (f"the model configuration in its header differs from {sidecar.name}; one of the two was "
                      "replaced: retrain this fold")
    return None


# ------------------------------------------------------------------------------------------------ checks
def retrain_hint(fold: Path) -> str:
    """What to run to train a damaged fold again."""
    return f"retrain this fold (wsi2dmamba train … --name {fold.parent.name} --fold {layout.fold_index(fold)} --force)"


@dataclass
class FoldCheck:
    """The result of :func:`check_fold`: findings, and how many files had their sha256 compared."""

    findings: list[FoldFinding]
    files_checked: int = 0

    def add(self, level: str, path: Path, message: str) -> None:
        self.findings.append(FoldFinding(level, path, message))


def check_fold(fold: Path, *, content: bool = True, splits: Path | None = None) -> FoldCheck:
    """Check one fold folder: its files against the sha256 ``done.json`` records and, with ``content``,
    against each other and the fold's configuration (and the split files in ``splits``, when given).

    An unfinished fold (no ``done.json``) is one warning.
    """
    out = FoldCheck([])
    done_path = layout.fold_file(fold, layout.FOLD_DONE)
    if not done_path.is_file():
        how = ("it continues from its last finished epoch" if layout.fold_file(fold, layout.FOLD_RESUME).is_file()
               else "it starts again")
        out.add("warning", fold, f"training fold is not finished (no done.json): run the same `wsi2dmamba "
                f"train` again and {how}")
        return out
    done = _record(out, done_path, "the record of the finished fold")
    if done is None:
        return out
    missing = {n for n in layout.FOLD_OUTPUTS if not layout.fold_file(fold, n).is_file()}
    for name in sorted(missing):
        out.add("error", layout.fold_file(fold, name), f"missing from a finished training fold; {retrain_hint(fold)}")
    _check_hashes(out, fold, done, missing)
    resume = layout.fold_file(fold, layout.FOLD_RESUME)
    if resume.is_file():
        out.add("warning", resume, "left by a run stopped just after the fold finished; the next `wsi2dmamba "
                "train` of this model removes it")
    if layout.FOLD_CONFIG in missing:
        return out
    config_path = layout.fold_file(fold, layout.FOLD_CONFIG)
    config = _record(out, config_path, "the fold's configuration")
    if config is None:
        return out
    if done.get("config_hash") != config.get("config_hash"):
        out.add("error", config_path, "holds another configuration than the one the finished fold was trained "
                f"with (done.json); {retrain_hint(fold)}")
    if content:
        for path, problem in fold_content_problems(fold, done, config, missing, splits):
            out.add("error", path, f"{problem}; {retrain_hint(fold)}")
    return out


def _record(out: FoldCheck, path: Path, what: str) -> dict[str, Any] | None:
    try:
        return read_json_object(path)
    except ValueError as exc:
        out.add("error", path, f"{what} {exc}; {retrain_hint(path.parent)}")
        return None


def _recorded_outputs(out: FoldCheck, fold: Path, done: dict[str, Any]) -> dict[Any, Any]:
    done_path = layout.fold_file(fold, layout.FOLD_DONE)
    recorded = done.get("outputs")
    if recorded is None:
        out.add("warning", done_path, "records no sha256 of the fold's files (written by an older version of "
                "wsi2dmamba); only their content can be checked")
        return {}
    if not isinstance(recorded, dict):
        out.add("error", done_path, f"its 'outputs' is not a mapping; {retrain_hint(fold)}")
        return {}
    return recorded


def _check_hashes(out: FoldCheck, fold: Path, done: dict[str, Any], missing: set[str]) -> None:
    """Each file ``done.json`` records has the recorded sha256."""
    for name, sha in sorted(_recorded_outputs(out, fold, done).items()):
        p = layout.fold_file(fold, str(name))
        if p.parent != fold or name in ("", ".", ".."):
            out.add("error", layout.fold_file(fold, layout.FOLD_DONE), f"records {name!r}, which is not a file "
                    "of the fold; the record was edited, do not trust this fold")
        elif name not in missing:
            _check_hash(out, fold, p, sha)


def _check_hash(out: FoldCheck, fold: Path, p: Path, sha: Any) -> None:
    if not p.is_file():
        out.add("error", p, f"recorded in done.json but missing; {retrain_hint(fold)}")
        return
    out.files_checked += 1
    problem = recorded_sha256_problem(p, sha, "training", retrain_hint(fold))
    if problem:
        out.add("error", p, problem)


def fold_content_problems(fold: Path, done: dict[str, Any], config: dict[str, Any], missing: set[str],
                          splits: Path | None = None) -> list[tuple[Path, str]]:
    """(file, problem) for every file of a finished fold that disagrees with ``config.json``/``done.json``,
    or (``splits`` given) with the run's split file of the fold."""
    epochs, best_epoch = done.get("epochs"), done.get("best_epoch")
    problems: list[tuple[Path, str]] = []
    for name, epoch in zip(layout.CHECKPOINTS, (best_epoch, epochs)):
        problems += checkpoint_problems(fold, name, config, epoch, missing)
    if layout.FOLD_LOG not in missing:
        problems += log_problems(layout.fold_file(fold, layout.FOLD_LOG), epochs)
    if layout.FOLD_PREDICTIONS not in missing:
        problems += predictions_problems(layout.fold_file(fold, layout.FOLD_PREDICTIONS), config,
                                         {"best": best_epoch, "last": epochs})
    if splits is not None:
        problems += split_problems(fold, config, splits)
    return problems


def checkpoint_problems(fold: Path, name: str, config: dict[str, Any], epoch: Any,
                        missing: set[str]) -> list[tuple[Path, str]]:
    """Checkpoint ``name`` holds the model of ``config.json`` and its sidecar names ``epoch``."""
    path = layout.checkpoint_file(fold, name)
    if path.name in missing or check_safetensors(path):
        return []  # reported as missing or damaged already
    try:
        stored = checkpoint_model_config(path)
    except (OSError, ValueError) as exc:
        return [(path, f"its header cannot be read ({exc})")]
    problems = []
    if stored != config.get("model"):
        problems.append((path, "its model configuration differs from the fold's config.json"))
    sidecar = layout.checkpoint_sidecar(path)
    if sidecar.name in missing:
        return problems
    try:
        side = json.loads(sidecar.read_text(encoding="utf-8"))
        stated = side.get("epoch") if isinstance(side, dict) else None
    except (OSError, ValueError) as exc:
        return [*problems, (sidecar, f"cannot be read ({exc})")]
    if stated != epoch:
        problems.append((sidecar, f"is the checkpoint of epoch {stated}, done.json names epoch {epoch}"))
    return problems


def log_problems(path: Path, epochs: Any) -> list[tuple[Path, str]]:
    """``log.csv`` logs epochs 1…``epochs``, one row each."""
    try:
        logged = [int(r["epoch"]) for r in csv_rows(path)]
    except (KeyError, TypeError, ValueError) as exc:
        return [(path, f"is not a valid training log ({exc})")]
    if not isinstance(epochs, int) or logged != list(range(1, epochs + 1)):
        return [(path, f"logs epochs {logged[:3]}…{logged[-1:]} but done.json says {epochs} epoch(s)")]
    return []


def predictions_problems(path: Path, config: dict[str, Any], epochs: dict[str, Any]) -> list[tuple[Path, str]]:
    """``predictions.csv`` holds, for each checkpoint (``epochs``: name → epoch), the fold's val and test
    slides, from that epoch, with numbers."""
    try:
        rows = csv_rows(path)
        if rows and not set(PREDICTION_COLUMNS) <= set(rows[0]):
            raise ValueError(f"it lacks the column(s) {sorted(set(PREDICTION_COLUMNS) - set(rows[0]))}")
    except ValueError as exc:
        return [(path, f"is not a valid predictions table ({exc})")]
    split = config.get("split") if isinstance(config.get("split"), dict) else {}
    problems = []
    for ckpt in layout.CHECKPOINTS:
        for part in ("val", "test"):
            problem = _partition_problem(rows, ckpt, part, split, str(epochs[ckpt]), str(config.get("fold")))
            if problem:
                problems.append((path, problem))
    bad = _first_non_number(rows)
    if bad is not None:
        problems.append((path, (f"the row of slide {bad['slide_id']!r} ({bad['checkpoint']}, "
                                f"{bad['partition']}) holds a value that is not a number")))
    return problems


def _partition_problem(rows: list[dict[str, str]], ckpt: str, part: str, split: dict[str, Any], epoch: str,
                       fold: str) -> str | None:
    got = [r for r in rows if r["checkpoint"] == ckpt and r["partition"] == part]
    expected = sorted(map(str, split.get(part, [])))
    if sorted(r["slide_id"] for r in got) != expected:
        return (f"its {ckpt}/{part} rows are not the {len(expected)} slide(s) of the fold's {part} partition "
                "in config.json")
    if any(r["epoch"] != epoch or r["fold"] != fold for r in got):
        return f"its {ckpt} rows name another fold or epoch than config.json and done.json"
    return None


def _first_non_number(rows: list[dict[str, str]]) -> dict[str, str] | None:
    numeric = [c for c in (rows[0] if rows else {}) if c.startswith(("prob_", "surv_")) or c == "risk"]
    for r in rows:
        try:
            ok = all(math.isfinite(float(r[c])) for c in numeric)
        except ValueError:
            ok = False
        if not ok:
            return r
    return None


def split_problems(fold: Path, config: dict[str, Any], splits: Path) -> list[tuple[Path, str]]:
    """The fold was trained on ``splits/splits_<k>.csv`` (nothing to compare when there is no such file)."""
    k = config.get("fold")
    path = layout.split_file(splits, k)
    split = config.get("split")
    if not path.is_file() or not isinstance(split, dict):
        return []  # a fold trained outside a run's layout; nothing to compare with
    try:
        rows = csv_rows(path)
    except ValueError as exc:
        return [(path, f"is not a valid split file ({exc})")]
    for part in ("train", "val", "test"):
        listed = sorted(r.get(part) or "" for r in rows)
        if [s for s in listed if s] != sorted(map(str, split.get(part, []))):
            listed_in = layout.relative(fold.parents[2], path)
            return [(layout.fold_file(fold, layout.FOLD_CONFIG),
                     f"fold {k} was trained with another {part} partition than {listed_in} lists")]
    return []
