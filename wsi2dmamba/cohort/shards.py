"""Shards: a deterministic partition of a cohort for Slurm array jobs, and merging what the shards did.

``--shard i/N`` keeps the slides whose :func:`shard_of` is ``i``: a stable hash of the slide id, so the
partition does not depend on the manifest's row order, on the machine, or on the Python version. N
processes (e.g. the tasks of ``sbatch --array=0-N-1``) may then run the same stage on the same run folder
at once, on a shared file system, without touching each other's files:

- each shard holds its own lock, ``RUN/<stage>/.lock-<i>of<N>`` (an unsharded run of the stage holds
  ``RUN/<stage>/.lock`` and refuses to start while any shard of it runs, and the other way round);
- each shard records what it set out to do in ``RUN/<stage>/.shards/<i>of<N>.json`` (its slides, the
  parameter hash, a digest of the whole cohort, running/finished);
- each shard writes its own ledger, ``RUN/ledger.shard-<i>of<N>.csv``, never ``RUN/ledger.csv``.

:func:`merge_shards` (``wsi2dmamba merge RUN``) checks that every shard of every sharded stage ran to its
end with the same parameters on the same cohort, lists the slides that failed or are missing, and
rebuilds ``RUN/ledger.csv`` from the per-slide states: the same ledger as one unsharded run.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from .. import run_layout as layout
from ..errors import StageInputError, WsiError
from ..fileio import remove_stale_temporaries, write_json_atomic, write_text_atomic
from .ledger import LEDGER_COLUMNS, SlideState, read_state, write_ledger
from .manifest import Cohort, load_cohort

SHARDS_DIR = layout.SHARDS_DIR


def shard_of(slide_id: str, n_shards: int) -> int:
    """The shard (0..N-1) a slide belongs to: a stable hash of its id, independent of manifest order."""
    return int(hashlib.sha1(slide_id.encode("utf-8")).hexdigest(), 16) % n_shards


def shard_label(shard: tuple[int, int]) -> str:
    """``(2, 8)`` → ``"2of8"``, as used in lock, record and ledger file names."""
    return f"{shard[0]}of{shard[1]}"


def select_shard(cohort: Cohort, shard: tuple[int, int]) -> Cohort:
    """The slides of ``cohort`` in shard ``i`` of ``N``, in manifest order."""
    i, n = shard
    return Cohort(tuple(r for r in cohort if shard_of(r.slide_id, n) == i), cohort.source)


def cohort_digest(cohort: Cohort) -> str:
    """A short hash of the cohort's slide ids (order-free): shards of one stage must share it."""
    ids = "\n".join(sorted(cohort.slide_ids))
    return hashlib.sha256(ids.encode("utf-8")).hexdigest()[:16]


def shard_ledger_path(run_dir: Path, shard: tuple[int, int]) -> Path:
    return layout.shard_ledger(run_dir, shard_label(shard))


@dataclass
class ShardRecord:
    """What one shard of one stage set out to do, and whether it got to its end.

    ``stage_dir`` is the folder (relative to the run) holding the stage's states, e.g. ``segment`` or
    ``features/<encoder>``; ``slide_ids`` are the shard's slides; ``status`` is ``"running"`` from the
    start and ``"finished"`` once every slide was tried.
    """

    stage: str
    stage_dir: str
    shard: int
    n_shards: int
    params_hash: str
    cohort_digest: str
    cohort_size: int
    cohort_source: str
    slide_ids: list[str]
    status: str = "running"
    host: str = ""
    started_at: str = ""
    finished_at: str = ""
    done: int = 0
    skipped: int = 0
    failed: int = 0


def record_path(run_dir: Path, stage_dir: str, shard: tuple[int, int]) -> Path:
    return layout.shard_record(run_dir, stage_dir, shard_label(shard))


def write_record(run_dir: Path, record: ShardRecord) -> None:
    record.host = record.host or socket.gethostname()
    write_json_atomic(record_path(run_dir, record.stage_dir, (record.shard, record.n_shards)), asdict(record))


def read_records(run_dir: Path) -> list[ShardRecord]:
    """Every shard record of the run (stages in ``RUN/<stage>`` and ``RUN/<a>/<b>``)."""
    run_dir = Path(run_dir)
    found = [p for g in layout.shard_record_globs() for p in sorted(run_dir.glob(g))]
    records = []
    for p in found:
        try:
            records.append(ShardRecord(**json.loads(p.read_text(encoding="utf-8"))))
        except (OSError, ValueError, TypeError) as exc:
            raise StageInputError(f"Shard record {p} cannot be read ({exc}); rerun that shard.") from exc
    return records


def new_record(stage: str, stage_dir: str, shard: tuple[int, int], params_hash: str, whole: Cohort,
               mine: Cohort) -> ShardRecord:
    return ShardRecord(stage=stage, stage_dir=stage_dir, shard=shard[0], n_shards=shard[1],
                       params_hash=params_hash, cohort_digest=cohort_digest(whole), cohort_size=len(whole),
                       cohort_source=str(whole.source or ""), slide_ids=mine.slide_ids,
                       started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def _ledger_row(s: SlideState) -> list[str]:
    return [s.stage, s.slide_id, s.status, s.reason.replace("\n", " "), s.params_hash, f"{s.seconds:.3f}",
            s.finished_at]


def write_shard_ledger(run_dir: Path, shard: tuple[int, int]) -> Path:
    """Write ``RUN/ledger.shard-<i>of<N>.csv``: the states of this shard's slides in every stage it ran."""
    run_dir = Path(run_dir)
    rows = []
    for rec in read_records(run_dir):
        if (rec.shard, rec.n_shards) != tuple(shard):
            continue
        for sid in rec.slide_ids:
            st = read_state(run_dir, rec.stage_dir, sid)
            if st is not None:
                rows.append(_ledger_row(st))
    rows.sort(key=lambda r: (r[0], r[1]))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(LEDGER_COLUMNS)
    w.writerows(rows)
    path = shard_ledger_path(run_dir, shard)
    write_text_atomic(path, buf.getvalue())
    return path


# ----------------------------------------------------------------------------------------------------- locks

def _held_by_other(path: Path) -> bool:
    """True when another process (or another lock object) holds the lock file ``path``."""
    probe = FileLock(str(path))
    try:
        probe.acquire(timeout=0)
    except Timeout:
        return True
    probe.release()
    return False


def _running_shards(folder: Path) -> list[str]:
    return sorted(layout.shard_of_lock(p) for p in folder.glob(layout.shard_locks_glob()) if _held_by_other(p))


@contextlib.contextmanager
def stage_lock(run_dir: Path, stage_dir: str, stage: str, shard: tuple[int, int] | None) -> Iterator[None]:
    """Hold the stage's lock for this process: the whole stage, or one shard of it.

    Raises :class:`WsiError` when the same shard (or the unsharded stage) already runs, or when an
    unsharded run and shards of the same stage would run together.
    """
    folder = layout.stage_dir(run_dir, stage_dir)
    folder.mkdir(parents=True, exist_ok=True)
    lock_path = layout.lock_file(folder, None if shard is None else shard_label(shard))
    lock = FileLock(str(lock_path))
    what = f"stage {stage!r}" if shard is None else f"shard {shard[0]}/{shard[1]} of stage {stage!r}"
    try:
        lock.acquire(timeout=0)
    except Timeout as exc:
        raise WsiError(f"Another process is running {what} in {run_dir} (lock file {lock_path}). "
                       "Wait for it to finish, or use another --out folder.") from exc
    try:
        if shard is None:
            busy = _running_shards(folder)
            if busy:
                raise WsiError(f"Shards {', '.join(busy)} of stage {stage!r} are running in {run_dir}; wait "
                               "for them and run `wsi2dmamba merge` before running the stage unsharded.")
        elif _held_by_other(layout.lock_file(folder)):
            raise WsiError(f"An unsharded run of stage {stage!r} is running in {run_dir}; wait for it to "
                           "finish before starting shards.")
        yield
    finally:
        lock.release()


# ----------------------------------------------------------------------------------------------------- merge

@dataclass
class StageShards:
    """The merge's findings for one sharded stage (one stage folder, one N)."""

    stage: str
    stage_dir: str
    n_shards: int
    finished: list[int] = field(default_factory=list)
    unfinished: list[int] = field(default_factory=list)
    never_ran: list[int] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unknown_missing: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.unfinished or self.never_ran or self.failed or self.missing or self.unknown_missing
                    or self.problems)

    def lines(self) -> list[str]:
        head = (f"{self.stage} ({self.stage_dir}, {self.n_shards} shards): {len(self.finished)} finished, "
                f"{len(self.done)} slides done, {len(self.failed)} failed, "
                f"{len(self.missing) + self.unknown_missing} missing")
        out = [head]
        out += [f"  problem: {p}" for p in self.problems]
        if self.never_ran:
            out.append(f"  shards that never ran: {', '.join(map(str, self.never_ran))} "
                       f"(run them with --shard i/{self.n_shards})")
        if self.unfinished:
            out.append(f"  shards that started but did not finish: {', '.join(map(str, self.unfinished))} "
                       "(killed or timed out: rerun them; done slides are skipped)")
        out += [f"  failed {sid}: {reason}" for sid, reason in sorted(self.failed.items())]
        if self.missing:
            shown = ", ".join(self.missing[:20]) + (" …" if len(self.missing) > 20 else "")
            out.append(f"  missing ({len(self.missing)}): {shown}")
        if self.unknown_missing:
            out.append(f"  {self.unknown_missing} slides of the shards that never ran are missing "
                       "(pass --cohort to list them)")
        return out


@dataclass
class MergeReport:
    """What :func:`merge_shards` found, and the ledger it wrote."""

    run_dir: Path
    stages: list[StageShards]
    ledger: Path
    shard_ledgers: list[Path]

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.stages)

    def lines(self) -> list[str]:
        out = []
        for s in self.stages:
            out += s.lines()
        out.append(f"merged {len(self.shard_ledgers)} shard ledgers into {self.ledger}")
        return out


def _check_group(run_dir: Path, records: list[ShardRecord], cohort: Cohort | None) -> StageShards:
    first = records[0]
    n = first.n_shards
    res = StageShards(first.stage, first.stage_dir, n)
    by_shard = {r.shard: r for r in records}
    res.never_ran = [i for i in range(n) if i not in by_shard]
    hashes = {r.params_hash for r in records}
    if len(hashes) > 1:
        per = ", ".join(f"{r.shard}: {r.params_hash}" for r in sorted(records, key=lambda r: r.shard))
        res.problems.append(f"the shards ran with different parameters ({per}); rerun the odd ones with the "
                            "same options")
    digests = {r.cohort_digest for r in records}
    if len(digests) > 1:
        res.problems.append("the shards ran on different cohorts (manifests differ); rerun them on one manifest")
    # The parameters most shards used are the reference for "done".
    phash = max(hashes, key=lambda h: sum(r.params_hash == h for r in records))
    for i, rec in sorted(by_shard.items()):
        if rec.status == "finished":
            res.finished.append(i)
        else:
            res.unfinished.append(i)
        for sid in rec.slide_ids:
            _classify(res, read_state(run_dir, rec.stage_dir, sid), sid, phash)
    if res.never_ran:
        whole = cohort if cohort is not None else _recorded_cohort(first)
        if whole is not None and cohort_digest(whole) == first.cohort_digest:
            for r in whole:
                if shard_of(r.slide_id, n) in res.never_ran:
                    _classify(res, read_state(run_dir, first.stage_dir, r.slide_id), r.slide_id, phash)
        else:
            covered = sum(len(r.slide_ids) for r in records)
            res.unknown_missing = max(0, first.cohort_size - covered)
    return res


def _classify(res: StageShards, st: SlideState | None, sid: str, phash: str) -> None:
    if st is not None and st.status == "done" and st.params_hash == phash:
        res.done.append(sid)
    elif st is not None and st.status == "failed":
        res.failed[sid] = st.reason
    else:
        res.missing.append(sid)


def _recorded_cohort(rec: ShardRecord) -> Cohort | None:
    if not rec.cohort_source or not Path(rec.cohort_source).is_file():
        return None
    try:
        return load_cohort(rec.cohort_source, require_path=False, check_files=False)
    except WsiError:
        return None


def merge_shards(run_dir: str | Path, cohort: Cohort | None = None) -> MergeReport:
    """Check every sharded stage of a run and rebuild ``RUN/ledger.csv``.

    Args:
        run_dir: the run folder the shards wrote to.
        cohort: the whole cohort; only needed to name the slides of shards that never ran when the
            manifest the shards read is no longer at its recorded path.

    Raises:
        StageInputError: the run folder holds no shard record.
        WsiError: a shard is still running.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise StageInputError(f"Run folder {run_dir} does not exist.")
    records = read_records(run_dir)
    if not records:
        raise StageInputError(f"{run_dir} holds no shard records: nothing to merge. Run the stages with "
                              "--shard i/N first (or, for an unsharded run, the ledger is already complete).")
    groups: dict[tuple[str, int], list[ShardRecord]] = {}
    for rec in records:
        groups.setdefault((rec.stage_dir, rec.n_shards), []).append(rec)
    stages = []
    with contextlib.ExitStack() as held:
        for sdir in sorted({rec.stage_dir for rec in records}):
            held.enter_context(stage_lock(run_dir, sdir, sdir, None))
            # Left by killed shards (outputs and state files cut off); no shard is running now.
            remove_stale_temporaries(layout.stage_dir(run_dir, sdir))
            remove_stale_temporaries(layout.state_dir(run_dir, sdir))
        for key in sorted(groups):
            stages.append(_check_group(run_dir, sorted(groups[key], key=lambda r: r.shard), cohort))
        ledger = write_ledger(run_dir)
    return MergeReport(run_dir, stages, ledger, sorted(run_dir.glob(layout.SHARD_LEDGER_GLOB)))
