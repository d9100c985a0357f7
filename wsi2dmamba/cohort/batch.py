"""Run one stage over a cohort: worker processes, resume, ledger, progress.

Every per-slide stage (segment, tile, extract) is a *work function* ``fn(record, config, run_dir) -> dict``
that writes its outputs atomically and returns a small JSON-able dict of information. :func:`run_stage`
decides which slides need work (no state, a failure, other parameters, a changed slide, a missing
output), runs them on an executor (this process, worker processes, or a Ray cluster: see
:mod:`.executors`), records a state file per slide and rebuilds ``RUN/ledger.csv``. A slide that fails
is recorded with its reason and the batch goes on. With ``shard=(i, N)`` only one shard of the cohort
is run (see :mod:`.shards`).
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import run_layout as layout
from ..errors import WsiError
from ..fileio import ensure_writable, file_sha256, os_error_message, params_hash, remove_stale_temporaries
from .executors import TaskResources, make_executor
from .ledger import (
    SlideState,
    hash_outputs,
    read_state,
    source_fingerprint,
    write_ledger,
    write_state,
)
from .manifest import Cohort, SlideRecord
from .options import RunOptions
from .shards import (
    new_record,
    select_shard,
    shard_of,
    stage_lock,
    write_record,
    write_shard_ledger,
)

__all__ = ["StageSummary", "TaskResources", "changed_outputs", "config_hash", "is_up_to_date", "run_stage",
           "shard_of"]

WorkFn = Callable[[SlideRecord, Any, Path], dict]
OutputsFn = Callable[[SlideRecord, Path], Sequence[Path]]


@dataclass
class StageSummary:
    """Counts of a stage run. ``failed`` maps slide id to reason; ``redone`` maps a slide done before
    whose outputs had changed on disk (and which was therefore run again) to a warning naming them."""

    stage: str
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    infos: dict[str, dict] = field(default_factory=dict)
    redone: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed

    def line(self) -> str:
        rate = len(self.done) / self.seconds if self.seconds > 0 else 0.0
        redone = (f" ({len(self.redone)} of them done again because their outputs had changed on disk)"
                  if self.redone else "")
        return (f"{self.stage}: {len(self.done)} done{redone}, {len(self.skipped)} skipped (already done), "
                f"{len(self.failed)} failed in {self.seconds:.1f} s ({rate:.2f} slides/s)")


def config_hash(stage: str, config: Any) -> str:
    """Hash of a stage's configuration (a pydantic model or a mapping)."""
    data = config.model_dump(mode="json") if hasattr(config, "model_dump") else dict(config)
    return params_hash({"stage": stage, "config": data})


def is_up_to_date(run_dir: Path, stage: str, record: SlideRecord, phash: str, outputs: Sequence[Path]) -> bool:
    """True when the slide's recorded state says done with the same parameters, the slide file is
    unchanged and every output still exists with the sha256 recorded when it was written."""
    return _done_before(run_dir, stage, record, phash, outputs) and not changed_outputs(
        run_dir, read_state(run_dir, stage, record.slide_id), outputs)


def _done_before(run_dir: Path, stage: str, record: SlideRecord, phash: str, outputs: Sequence[Path]) -> bool:
    """:func:`is_up_to_date` without comparing the outputs' bytes."""
    st = read_state(run_dir, stage, record.slide_id)
    if st is None or st.status != "done" or st.params_hash != phash:
        return False
    fp = source_fingerprint(record.path)
    if st.source and fp and (st.source.get("size"), st.source.get("mtime_ns")) != (fp.get("size"), fp.get("mtime_ns")):
        return False
    if st.source.get("mpp") != record.mpp:  # the manifest's mpp override changed: tiles would differ
        return False
    return all(Path(p).exists() for p in outputs)


def changed_outputs(run_dir: Path, state: SlideState | None, outputs: Sequence[Path]) -> list[Path]:
    """The outputs whose sha256 differs from the one ``state`` recorded (or that it does not record)."""
    recorded = state.outputs if state is not None and isinstance(state.outputs, dict) else {}
    run = Path(run_dir).resolve()
    changed = []
    for p in map(Path, outputs):
        sha = recorded.get(os.path.relpath(p.resolve(), run))
        try:
            same = sha is not None and file_sha256(p) == sha
        except OSError:
            same = False
        if not same:
            changed.append(p)
    return changed


def _plan(run_dir: Path, sdir: str, cohort: Cohort, phash: str, outputs: OutputsFn, force: bool,
          summary: StageSummary, editable: tuple[str, ...] = ()) -> list[SlideRecord]:
    """The slides to run; the others are counted as skipped. A slide done before whose outputs changed on
    disk since (a flipped bit, an edit) is run again and recorded in ``summary.redone``; outputs whose
    name ends with one of ``editable`` may be changed by hand and are not compared."""
    todo = []
    for rec in cohort:
        outs = outputs(rec, run_dir)
        if force or not _done_before(run_dir, sdir, rec, phash, outs):
            todo.append(rec)
            continue
        compared = [p for p in outs if not str(p).endswith(editable)] if editable else outs
        changed = changed_outputs(run_dir, read_state(run_dir, sdir, rec.slide_id), compared)
        if changed:
            summary.redone[rec.slide_id] = (
                f"{', '.join(map(str, changed))} changed since it was written (its sha256 differs from the "
                "recorded one): the file was damaged on disk or edited; the slide is processed again")
            todo.append(rec)
        else:
            summary.skipped.append(rec.slide_id)
    return todo


def _run_one(fn: WorkFn, record: SlideRecord, config: Any, run_dir: Path) -> tuple[str, dict, str, str]:
    """Execute in a worker: returns (status, info, reason, traceback).

    The slide file is fingerprinted before and after the work: a slide replaced, rewritten or deleted
    while it was read fails instead of leaving outputs made from two versions of it.
    """
    before = source_fingerprint(record.path)
    try:
        info = fn(record, config, run_dir) or {}
        if source_fingerprint(record.path) != before:
            return ("failed", {}, f"slide file {record.path} changed or disappeared while slide "
                    f"{record.slide_id!r} was being processed; rerun the stage once the file is in place", "")
        return "done", info, "", ""
    except WsiError as exc:
        return "failed", {}, str(exc), ""
    except OSError as exc:
        message = os_error_message(exc)
        if message is None:
            return ("failed", {}, f"unexpected error ({type(exc).__name__}: {exc}); see the state file's traceback",
                    traceback.format_exc())
        return "failed", {}, f"slide {record.slide_id!r}: {message}", ""
    except MemoryError:
        return "failed", {}, f"out of memory while processing slide {record.slide_id!r}", traceback.format_exc()
    except Exception as exc:  # a bug or an unexpected library error: record it, keep the batch going
        return ("failed", {}, f"unexpected error ({type(exc).__name__}: {exc}); see the state file's traceback",
                traceback.format_exc())


def run_stage(stage: str, cohort: Cohort, run_dir: str | Path, config: Any, fn: WorkFn, outputs: OutputsFn,
              options: RunOptions | None = None, *, stage_dir: str | None = None,
              resources: TaskResources | None = None, on_locked: Callable[[], None] | None = None,
              editable: tuple[str, ...] = (), **settings: Any) -> StageSummary:
    """Run ``fn`` over every slide of ``cohort`` that is not already up to date.

    Args:
        stage: stage name recorded in states and the ledger (e.g. ``"segment"``).
        cohort: the slides.
        run_dir: the run folder.
        config: the stage's validated configuration; its hash decides what may be skipped.
        fn: top-level (picklable) work function ``fn(record, config, run_dir) -> info``.
        outputs: ``outputs(record, run_dir)`` lists the files ``fn`` writes for a slide.
        options: how the stage runs (:class:`~.options.RunOptions`): ``workers`` processes of the local
            executor (1 = this process), or ``executor="ray"`` (one Ray task per slide); ``force`` redoes
            every slide; ``progress`` shows a bar with slides/s and ETA; ``shard=(i, N)`` processes only
            the slides of shard i of N (:func:`~.shards.shard_of`): the shard takes its own lock and writes
            ``RUN/ledger.shard-<i>of<N>.csv`` instead of ``RUN/ledger.csv``, and ``wsi2dmamba merge RUN``
            checks the shards and writes ``RUN/ledger.csv``.
        settings: the fields of ``options`` given as keywords instead (``workers=2, progress=False``).
        stage_dir: folder (relative to the run) whose ``.state`` holds this stage's states; defaults to
            ``stage`` (extraction uses ``features/<encoder>``).
        resources: what each slide's task needs (default: one CPU, no GPU). With a GPU, the local
            executor spreads slides over the visible GPUs and Ray schedules them on GPU workers.
        on_locked: called in this process once the stage's lock is held, before any slide is run (e.g. to
            record the stage's parameters: a run refused by the lock must not change them).
        editable: name endings of outputs that people edit by hand (e.g. ``(".geojson",)``): a rerun keeps
            such a file whatever its bytes. Every other output of a slide that is skipped must still have
            the sha256 recorded when it was written; a slide with a changed output is done again.

    Whichever the executor, the work function runs in a worker and this process alone writes the
    states and the ledger, so results, ledger and resume are the same.
    """
    options = RunOptions.of(options, **settings)
    shard = options.shard
    run_dir = Path(run_dir)
    sdir = stage_dir or stage
    whole = cohort
    if shard is not None:
        cohort = select_shard(cohort, shard)
    ensure_writable(layout.stage_dir(run_dir, sdir))
    phash = config_hash(stage, config)
    # States are kept per output folder (e.g. "features/<encoder>"), and so are ledger rows.
    summary = StageSummary(stage)
    with stage_lock(run_dir, sdir, stage, shard):
        if on_locked is not None:
            on_locked()
        t0 = time.perf_counter()
        record = None
        if shard is not None:
            record = new_record(stage, sdir, shard, phash, whole, cohort)
            write_record(run_dir, record)
        else:
            # Only an unsharded run may clear temporaries: a running shard's files are beside them.
            remove_stale_temporaries(layout.stage_dir(run_dir, sdir))
            remove_stale_temporaries(layout.state_dir(run_dir, sdir))  # a state file cut off by a kill
        try:
            todo = _plan(run_dir, sdir, cohort, phash, outputs, options.force, summary, editable)
            bar = _progress(len(todo), stage, options.progress)
            by_id = {rec.slide_id: rec for rec in todo}
            tasks = [(rec.slide_id, (fn, rec, config, run_dir)) for rec in todo]
            # Made only when there is work: a resumed, complete stage starts no Ray cluster.
            pool = make_executor(options.executor, workers=options.workers, resources=resources,
                                 ray_address=options.ray_address) if todo else None
            for out in pool.map(_run_one, tasks) if pool is not None else ():
                rec = by_id[out.key]
                result = out.value if out.ok else ("failed", {}, f"the task for this slide did not finish "
                                                   f"({out.reason})", "")
                _finish(run_dir, sdir, stage, rec, result, out.seconds, phash, outputs, summary)
                bar.update(1)
            bar.close()
        finally:
            summary.seconds = time.perf_counter() - t0
            if record is not None:
                record.status = "finished" if len(summary.done) + len(summary.skipped) + len(summary.failed) \
                    == len(cohort) else "running"
                record.finished_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
                record.done, record.skipped, record.failed = (len(summary.done), len(summary.skipped),
                                                              len(summary.failed))
                write_record(run_dir, record)
                write_shard_ledger(run_dir, shard)
            else:
                write_ledger(run_dir)
    return summary


def _finish(run_dir: Path, sdir: str, stage: str, rec: SlideRecord, result: tuple[str, dict, str, str],
            seconds: float, phash: str, outputs: OutputsFn, summary: StageSummary) -> None:
    """Record one slide's result: check its outputs exist, write its state, count it."""
    status, info, reason, tb = result
    outs = [Path(p) for p in outputs(rec, run_dir)] if status == "done" else []
    if status == "done":
        missing = [str(p) for p in outs if not p.exists()]
        if missing:
            status, reason = "failed", f"stage finished without writing: {', '.join(missing)}"
    state = SlideState(stage=sdir, slide_id=rec.slide_id, status=status, params_hash=phash,
                       reason=reason, seconds=seconds,
                       outputs=hash_outputs(run_dir, outs) if status == "done" else {},
                       source={**source_fingerprint(rec.path), "mpp": rec.mpp}, info=info, traceback=tb)
    write_state(run_dir, state)
    if status == "done":
        summary.done.append(rec.slide_id)
        summary.infos[rec.slide_id] = info
    else:
        summary.failed[rec.slide_id] = reason


def _progress(total: int, stage: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=stage, unit="slide", disable=not enabled or total == 0, dynamic_ncols=True)
