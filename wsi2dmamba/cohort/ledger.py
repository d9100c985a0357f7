"""Per-slide state of every stage, and the run's ledger.

The truth is one small JSON *state file* per (stage, slide), written atomically when the slide's outputs
are complete: ``RUN/<stage>/.state/<slide_id>.json``. ``RUN/ledger.csv`` is a table made from all state
files (rebuilt at the end of every batch), so a run killed at any moment loses at most the slides in flight.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import run_layout as layout
from ..fileio import file_sha256, write_json_atomic, write_text_atomic

LEDGER_COLUMNS = ("stage", "slide_id", "status", "reason", "params_hash", "seconds", "finished_at")


@dataclass
class SlideState:
    """What happened to one slide in one stage.

    ``status`` is ``"done"`` or ``"failed"``. ``outputs`` maps each output file (relative to the run
    folder) to its sha256, so ``wsi2dmamba verify`` can check it later. ``source`` fingerprints the slide
    file (size and modification time) so that a slide that changed is processed again.
    """

    stage: str
    slide_id: str
    status: str
    params_hash: str
    reason: str = ""
    seconds: float = 0.0
    finished_at: str = ""
    outputs: dict[str, str] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    traceback: str = ""


_STATE_TYPES = {"stage": str, "slide_id": str, "status": str, "params_hash": str, "reason": str,
                 "seconds": (int, float), "finished_at": str, "outputs": dict, "source": dict, "info": dict,
                 "traceback": str}


def parse_state(data: Any) -> SlideState:
    """A state from the JSON of a state file, every field of its type (a hand-edited file may hold anything).

    Raises:
        ValueError: not an object, an unknown or missing field, or a field of the wrong type (named).
    """
    if not isinstance(data, dict):
        raise ValueError(f"not a JSON object but {type(data).__name__}")
    unknown = sorted(set(data) - set(_STATE_TYPES))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(map(repr, unknown))}")
    for key, kind in _STATE_TYPES.items():
        if key in data and (not isinstance(data[key], kind) or isinstance(data[key], bool)):
            raise ValueError(f"field {key!r} is {type(data[key]).__name__}, not {getattr(kind, '__name__', 'number')}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in data.get("outputs", {}).items()):
        raise ValueError("field 'outputs' must map file names to sha256 strings")
    try:
        return SlideState(**data)
    except TypeError as exc:  # a required field is missing
        raise ValueError(str(exc)) from None


def state_path(run_dir: Path, stage: str, slide_id: str) -> Path:
    return layout.state_file(run_dir, stage, slide_id)


def read_state(run_dir: Path, stage: str, slide_id: str) -> SlideState | None:
    """The recorded state, or None if there is none (or it cannot be read: treated as not done)."""
    p = state_path(run_dir, stage, slide_id)
    try:
        return parse_state(json.loads(p.read_text(encoding="utf-8")))
    except (OSError, ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None


def write_state(run_dir: Path, state: SlideState) -> None:
    state.finished_at = state.finished_at or time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json_atomic(state_path(run_dir, state.stage, state.slide_id), asdict(state))


def recorded_sha256(output: str | os.PathLike[str]) -> str | None:
    """The sha256 recorded for ``output`` (e.g. ``RUN/tiles/<slide_id>.h5``) by the stage that wrote it,
    from the state file beside it (``<folder>/.state/<stem>.json``); None when no finished state records it."""
    output = Path(output)
    try:
        data = json.loads(layout.state_of_output(output).read_text(encoding="utf-8"))
        st = SlideState(**data)
    except (OSError, ValueError, TypeError):
        return None
    if st.status != "done" or not isinstance(st.outputs, dict) or not isinstance(st.stage, str):
        return None
    for rel, sha in st.outputs.items():
        if isinstance(rel, str) and isinstance(sha, str) and Path(rel) == Path(st.stage) / output.name:
            return sha
    return None


def hash_outputs(run_dir: Path, paths: list[Path]) -> dict[str, str]:
    """Map each output (relative to ``run_dir``) to its sha256."""
    run_dir = Path(run_dir).resolve()
    out = {}
    for p in paths:
        p = Path(p).resolve()
        rel = os.path.relpath(p, run_dir)
        out[rel] = file_sha256(p)
    return out


def source_fingerprint(path: Path | None) -> dict[str, Any]:
    """Size and modification time of a slide file (or folder, e.g. DICOM or MRXS data)."""
    if path is None:
        return {}
    try:
        st = Path(path).stat()
    except OSError:
        return {"path": str(path), "missing": True}
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def collect_states(run_dir: Path) -> list[SlideState]:
    """Every state file of every stage of a run, sorted by stage then slide."""
    states = []
    for p in [p for g in layout.state_globs() for p in sorted(Path(run_dir).glob(g))]:
        try:
            states.append(parse_state(json.loads(p.read_text(encoding="utf-8"))))
        except (OSError, ValueError, RecursionError):
            continue
    states.sort(key=lambda s: (s.stage, s.slide_id))
    return states


def write_ledger(run_dir: Path) -> Path:
    """Rebuild ``RUN/ledger.csv`` from the state files; return its path."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(LEDGER_COLUMNS)
    for s in collect_states(run_dir):
        w.writerow([s.stage, s.slide_id, s.status, s.reason.replace("\n", " "), s.params_hash,
                    f"{s.seconds:.3f}", s.finished_at])
    path = layout.ledger(run_dir)
    write_text_atomic(path, buf.getvalue())
    return path


def ledger_problem(run_dir: Path, states: list[SlideState]) -> str | None:
    """What is wrong with ``RUN/ledger.csv`` given the run's state files, or None when it lists exactly
    them (stage, slide, status, parameter hash)."""
    path = layout.ledger(run_dir)
    if not path.is_file():
        return "missing; it is rebuilt from the state files by the next stage run"
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = {(r.get("stage", ""), r.get("slide_id", ""), r.get("status", ""), r.get("params_hash", ""))
                    for r in csv.DictReader(fh)}
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        return f"cannot be read ({exc}); it is rebuilt by the next stage run"
    expected = {(s.stage, s.slide_id, s.status, s.params_hash) for s in states}
    if rows != expected:
        return (f"out of date with the state files ({len(expected - rows)} state(s) not in it, "
                f"{len(rows - expected)} row(s) without a state); it is rebuilt by the next stage run (the state "
                "files are the record)")
    return None
