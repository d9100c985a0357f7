"""Run one stage over a cohort: worker processes, resume, ledger, progress.

Every per-slide stage (segment, tile, extract) is a *work function* ``fn(record, config, run_dir) -> dict``
that writes its outputs atomically and returns a small JSON-able dict of information. :func:`run_stage`
decides which slides need work (no state, a failure, other parameters, a changed slide, a missing
output), runs them in worker processes, records a state file per slide and rebuilds ``RUN/ledger.csv``.
A slide that fails is recorded with its reason and the batch goes on.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from ..errors import WsiError
from ..fileio import params_hash, remove_stale_temporaries
from .ledger import SlideState, hash_outputs, read_state, source_fingerprint, write_ledger, write_state
from .manifest import Cohort, SlideRecord

WorkFn = Callable[[SlideRecord, Any, Path], dict]
OutputsFn = Callable[[SlideRecord, Path], Sequence[Path]]


@dataclass
class StageSummary:
    """Counts of a stage run. ``failed`` maps slide id to reason."""

    stage: str
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    infos: dict[str, dict] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed

    def line(self) -> str:
        rate = len(self.done) / self.seconds if self.seconds > 0 else 0.0
        return (f"{self.stage}: {len(self.done)} done, {len(self.skipped)} skipped (already done), "
                f"{len(self.failed)} failed in {self.seconds:.1f} s ({rate:.2f} slides/s)")


def config_hash(stage: str, config: Any) -> str:
    """Hash of a stage's configuration (a pydantic model or a mapping)."""
    data = config.model_dump(mode="json") if hasattr(config, "model_dump") else dict(config)
    return params_hash({"stage": stage, "config": data})


def is_up_to_date(run_dir: Path, stage: str, record: SlideRecord, phash: str, outputs: Sequence[Path]) -> bool:
    """True when the slide's recorded state says done with the same parameters, the slide file is
    unchanged and every output still exists."""
    st = read_state(run_dir, stage, record.slide_id)
    if st is None or st.status != "done" or st.params_hash != phash:
        return False
    fp = source_fingerprint(record.path)
    if st.source and fp and (st.source.get("size"), st.source.get("mtime_ns")) != (fp.get("size"), fp.get("mtime_ns")):
        return False
    return all(Path(p).exists() for p in outputs)


def shard_of(slide_id: str, n_shards: int) -> int:
    """The shard (0..N-1) a slide belongs to: a stable hash of its id, independent of manifest order."""
    import hashlib

    return int(hashlib.sha1(slide_id.encode("utf-8")).hexdigest(), 16) % n_shards


def _run_one(fn: WorkFn, record: SlideRecord, config: Any, run_dir: Path) -> tuple[str, dict, str, str]:
    """Execute in a worker: returns (status, info, reason, traceback)."""
    try:
        info = fn(record, config, run_dir) or {}
        return "done", info, "", ""
    except WsiError as exc:
        return "failed", {}, str(exc), ""
    except MemoryError:
        return "failed", {}, f"out of memory while processing slide {record.slide_id!r}", traceback.format_exc()
    except Exception as exc:  # a bug or an unexpected library error: record it, keep the batch going
        return ("failed", {}, f"unexpected error ({type(exc).__name__}: {exc}); see the state file's traceback",
                traceback.format_exc())


def run_stage(stage: str, cohort: Cohort, run_dir: str | Path, config: Any, fn: WorkFn, outputs: OutputsFn, *,
              workers: int = 1, progress: bool = True, force: bool = False,
              stage_dir: str | None = None, shard: tuple[int, int] | None = None,
              executor: str = "local", ray_address: str | None = None) -> StageSummary:
    """Run ``fn`` over every slide of ``cohort`` that is not already up to date.

    Args:
        stage: stage name recorded in states and the ledger (e.g. ``"segment"``).
        cohort: the slides.
        run_dir: the run folder.
        config: the stage's validated configuration; its hash decides what may be skipped.
        fn: top-level (picklable) work function ``fn(record, config, run_dir) -> info``.
        outputs: ``outputs(record, run_dir)`` lists the files ``fn`` writes for a slide.
        workers: worker processes (1 = run in this process).
        progress: show a progress bar with slides/s and ETA.
        force: redo every slide.
        stage_dir: folder (relative to the run) whose ``.state`` holds this stage's states; defaults to
            ``stage`` (extraction uses ``features/<encoder>``).
        shard: ``(i, N)``: process only the slides of shard i of N (:func:`shard_of`).
        executor: ``"local"`` (worker processes) or ``"ray"``.
        ray_address: Ray cluster address for ``executor="ray"``.
    """
    if executor not in ("local", "ray"):
        raise WsiError(f"Unknown executor {executor!r}; use 'local' or 'ray'.")
    if executor == "ray":
        raise WsiError("The ray executor is not available in this build.")
    if shard is not None:
        cohort = Cohort(tuple(r for r in cohort if shard_of(r.slide_id, shard[1]) == shard[0]), cohort.source)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    sdir = stage_dir or stage
    (run_dir / sdir).mkdir(parents=True, exist_ok=True)
    phash = config_hash(stage, config)
    # States are kept per output folder (e.g. "features/<encoder>"), and so are ledger rows.
    summary = StageSummary(stage)
    lock = FileLock(str(run_dir / sdir / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout as exc:
        raise WsiError(f"Another process is running stage {stage!r} in {run_dir} (lock file "
                       f"{run_dir / sdir / '.lock'}). Wait for it to finish, or use another --out folder.") from exc
    t0 = time.perf_counter()
    try:
        remove_stale_temporaries(run_dir / sdir)
        todo = []
        for rec in cohort:
            if not force and is_up_to_date(run_dir, sdir, rec, phash, outputs(rec, run_dir)):
                summary.skipped.append(rec.slide_id)
            else:
                todo.append(rec)
        bar = _progress(len(todo), stage, progress)

        def finish(rec: SlideRecord, result: tuple[str, dict, str, str], seconds: float) -> None:
            status, info, reason, tb = result
            outs = [Path(p) for p in outputs(rec, run_dir)] if status == "done" else []
            if status == "done":
                missing = [str(p) for p in outs if not p.exists()]
                if missing:
                    status, reason = "failed", f"stage finished without writing: {', '.join(missing)}"
            state = SlideState(stage=sdir, slide_id=rec.slide_id, status=status, params_hash=phash,
                               reason=reason, seconds=seconds,
                               outputs=hash_outputs(run_dir, outs) if status == "done" else {},
                               source=source_fingerprint(rec.path), info=info, traceback=tb)
            write_state(run_dir, state)
            if status == "done":
                summary.done.append(rec.slide_id)
                summary.infos[rec.slide_id] = info
            else:
                summary.failed[rec.slide_id] = reason
            bar.update(1)

        if workers <= 1 or len(todo) <= 1:
            for rec in todo:
                t = time.perf_counter()
                finish(rec, _run_one(fn, rec, config, run_dir), time.perf_counter() - t)
        else:
            ctx = mp.get_context("spawn")
            with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                starts = {}
                futs = {}
                for rec in todo:
                    f = pool.submit(_run_one, fn, rec, config, run_dir)
                    futs[f] = rec
                    starts[f] = time.perf_counter()
                for f in cf.as_completed(futs):
                    rec = futs[f]
                    try:
                        result = f.result()
                    except Exception as exc:  # the worker process died (killed, segfault in a codec)
                        result = ("failed", {}, f"worker process died while processing this slide ({exc})", "")
                    finish(rec, result, time.perf_counter() - starts[f])
        bar.close()
    finally:
        summary.seconds = time.perf_counter() - t0
        write_ledger(run_dir)
        lock.release()
    return summary


def _progress(total: int, stage: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=stage, unit="slide", disable=not enabled or total == 0, dynamic_ncols=True)
