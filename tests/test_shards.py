"""Shards (--shard i/N) and `wsi2dmamba merge`: a partition for Slurm array jobs, locks that let shards run
side by side, per-shard ledgers, and a merge that equals one unsharded run."""

from __future__ import annotations

import csv
import hashlib
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from wsi2dmamba.cli import app
from wsi2dmamba.cohort import load_cohort, run_stage
from wsi2dmamba.cohort.ledger import collect_states
from wsi2dmamba.cohort.shards import (ShardRecord, merge_shards, read_records, record_path, select_shard,
                                      shard_ledger_path, shard_of, stage_lock, write_record)
from wsi2dmamba.errors import SlideError, StageInputError, WsiError
from wsi2dmamba.fileio import atomic_path

REPO = Path(__file__).resolve().parents[1]
CMU_CANDIDATES = [REPO / "tests/data/CMU-1-Small-Region.svs",
                  REPO.parent / "shared/data/slides/aperio_svs/CMU-1-Small-Region.svs"]


@pytest.fixture(scope="module")
def cmu() -> Path:
    for p in CMU_CANDIDATES:
        if p.is_file():
            return p
    pytest.skip("CMU-1-Small-Region.svs is neither in tests/data nor in ../shared")


def thumbnail_stage(record, config, run_dir):
    """A real per-slide stage: read a region of the slide with OpenSlide and store it as .npy."""
    import openslide

    try:
        slide = openslide.OpenSlide(str(record.path))
    except openslide.OpenSlideError as exc:
        raise SlideError(f"slide {record.slide_id!r}: cannot open {record.path} ({exc})") from exc
    with slide:
        w, h = slide.dimensions
        region = slide.read_region((w // 3, h // 3), 0, (config["size"], config["size"]))
        thumb = np.asarray(region.convert("RGB"))
    with atomic_path(thumbnail_path(record, run_dir)) as tmp:
        np.save(tmp, thumb)
    return {"shape": list(thumb.shape), "mean": float(thumb.mean())}


def thumbnail_path(record, run_dir):
    return Path(run_dir) / "thumbs" / f"{record.slide_id}.npy"


def outputs(record, run_dir):
    return [thumbnail_path(record, run_dir)]


def write_manifest(path: Path, slide: Path, n: int, broken: Path | None = None) -> Path:
    rows = [f"slide-{k:02d},{slide}" for k in range(n)]
    if broken is not None:
        rows.append(f"broken,{broken}")
    path.write_text("slide_id,path\n" + "\n".join(rows) + "\n")
    return path


def ledger_rows(run: Path, ledger: str = "ledger.csv") -> list[tuple]:
    """The ledger's rows without its timing columns (seconds, finished_at), which differ between runs."""
    with open(run / ledger, newline="") as fh:
        return [(r["stage"], r["slide_id"], r["status"], r["reason"], r["params_hash"]) for r in csv.DictReader(fh)]


def output_hashes(run: Path) -> dict:
    return {(s.stage, s.slide_id): s.outputs for s in collect_states(run)}


# ---------------------------------------------------------------------------------------------- the partition

def test_partition_is_stable_complete_and_order_free():
    ids = [f"TCGA-{k:04d}" for k in range(500)]
    n = 7
    shards = {sid: shard_of(sid, n) for sid in ids}
    assert set(shards.values()) == set(range(n))  # every shard gets slides
    counts = np.bincount(list(shards.values()), minlength=n)
    assert counts.min() > 500 / n * 0.6  # and roughly as many each
    assert {sid: shard_of(sid, n) for sid in reversed(ids)} == shards
    # The partition is a documented function of the id alone (sha1 mod N), so every shard of an array
    # job agrees on it whatever its machine, Python version or process hash seed.
    # Pinned: a change here would mix up the shards of runs made with earlier versions.
    assert shard_of("slide-a", 4) == int(hashlib.sha1(b"slide-a").hexdigest(), 16) % 4
    assert [shard_of(s, 4) for s in ("slide-a", "slide-b", "TCGA-02-0001-01Z-00-DX1")] == [0, 0, 1]


def test_select_shard_splits_a_cohort_into_disjoint_parts(tmp_path, cmu):
    cohort = load_cohort(write_manifest(tmp_path / "m.csv", cmu, 12))
    parts = [select_shard(cohort, (i, 3)) for i in range(3)]
    ids = [sid for p in parts for sid in p.slide_ids]
    assert sorted(ids) == sorted(cohort.slide_ids) and len(set(ids)) == len(ids)
    for p in parts:  # manifest order is kept within a shard
        assert p.slide_ids == [s for s in cohort.slide_ids if s in set(p.slide_ids)]


def test_bad_shard_is_refused(tmp_path, cmu):
    cohort = load_cohort(write_manifest(tmp_path / "m.csv", cmu, 2))
    with pytest.raises(WsiError, match="0 ≤ i < N"):
        run_stage("thumb", cohort, tmp_path / "run", {"size": 32}, thumbnail_stage, outputs,
                  shard=(3, 3), progress=False)


# ---------------------------------------------------------------------------------- two shards = one run

def test_two_shards_merged_equal_one_run(tmp_path, cmu):
    manifest = write_manifest(tmp_path / "m.csv", cmu, 8, broken=tmp_path / "m.csv")
    cohort = load_cohort(manifest)
    cfg = {"size": 64}

    one = tmp_path / "one"
    s = run_stage("thumb", cohort, one, cfg, thumbnail_stage, outputs, progress=False)
    assert len(s.done) == 8 and list(s.failed) == ["broken"]

    sharded = tmp_path / "sharded"
    sizes = []
    for i in range(2):
        part = run_stage("thumb", cohort, sharded, cfg, thumbnail_stage, outputs, shard=(i, 2), progress=False)
        sizes.append(len(part.done) + len(part.failed))
        # A shard writes its own ledger and leaves ledger.csv to the merge.
        assert shard_ledger_path(sharded, (i, 2)).is_file()
        assert not (sharded / "ledger.csv").exists()
        assert {r[1] for r in ledger_rows(sharded, f"ledger.shard-{i}of2.csv")} == \
            set(select_shard(cohort, (i, 2)).slide_ids)
    assert sum(sizes) == 9 and min(sizes) > 0

    report = merge_shards(sharded)
    assert report.ledger == sharded / "ledger.csv"
    assert ledger_rows(sharded) == ledger_rows(one)
    assert output_hashes(sharded) == output_hashes(one)
    (stage,) = report.stages
    assert stage.finished == [0, 1] and not stage.never_ran and not stage.unfinished
    assert list(stage.failed) == ["broken"] and "cannot open" in stage.failed["broken"]
    assert sorted(stage.done) == [f"slide-{k:02d}" for k in range(8)]
    assert not report.ok  # the broken slide is reported as a failure
    np.testing.assert_array_equal(np.load(sharded / "thumbs/slide-03.npy"), np.load(one / "thumbs/slide-03.npy"))

    # Resuming a shard skips its done slides and keeps its record finished.
    again = run_stage("thumb", cohort, sharded, cfg, thumbnail_stage, outputs, shard=(0, 2), progress=False)
    assert not again.done and len(again.skipped) == len([r for r in select_shard(cohort, (0, 2)) if r.slide_id != "broken"])


def test_merge_names_shards_that_never_ran_and_their_slides(tmp_path, cmu):
    cohort = load_cohort(write_manifest(tmp_path / "m.csv", cmu, 9))
    run = tmp_path / "run"
    run_stage("thumb", cohort, run, {"size": 32}, thumbnail_stage, outputs, shard=(1, 3), progress=False)
    report = merge_shards(run)
    (stage,) = report.stages
    assert stage.never_ran == [0, 2] and stage.finished == [1]
    expected_missing = sorted(r.slide_id for r in cohort if shard_of(r.slide_id, 3) != 1)
    assert sorted(stage.missing) == expected_missing  # named from the manifest the shards recorded
    assert not report.ok

    # Once the manifest has moved, merge still counts them, and names them with --cohort.
    moved = tmp_path / "moved.csv"
    (tmp_path / "m.csv").rename(moved)
    (stage,) = merge_shards(run).stages
    assert stage.unknown_missing == len(expected_missing) and not stage.missing
    (stage,) = merge_shards(run, cohort=load_cohort(moved)).stages
    assert sorted(stage.missing) == expected_missing

    # Running the other shards completes the run.
    cohort = load_cohort(moved)
    for i in (0, 2):
        run_stage("thumb", cohort, run, {"size": 32}, thumbnail_stage, outputs, shard=(i, 3), progress=False)
    report = merge_shards(run)
    assert report.ok and sorted(report.stages[0].done) == sorted(cohort.slide_ids)


def test_merge_flags_unfinished_shards_and_mixed_parameters(tmp_path, cmu):
    cohort = load_cohort(write_manifest(tmp_path / "m.csv", cmu, 6))
    run = tmp_path / "run"
    run_stage("thumb", cohort, run, {"size": 32}, thumbnail_stage, outputs, shard=(0, 2), progress=False)
    run_stage("thumb", cohort, run, {"size": 48}, thumbnail_stage, outputs, shard=(1, 2), progress=False)
    # A shard killed by the scheduler leaves its record "running".
    rec_file = record_path(run, "thumb", (0, 2))
    data = json.loads(rec_file.read_text())
    data["status"] = "running"
    write_record(run, ShardRecord(**data))
    (stage,) = merge_shards(run).stages
    assert stage.unfinished == [0]
    assert any("different parameters" in p for p in stage.problems)
    assert not stage.ok


def test_merge_without_shards_is_a_clear_error(tmp_path, cmu):
    cohort = load_cohort(write_manifest(tmp_path / "m.csv", cmu, 2))
    run_stage("thumb", cohort, tmp_path / "run", {"size": 32}, thumbnail_stage, outputs, progress=False)
    with pytest.raises(StageInputError, match="no shard records"):
        merge_shards(tmp_path / "run")
    with pytest.raises(StageInputError, match="does not exist"):
        merge_shards(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------------------- locks

def _hold(run, sdir, shard, started: threading.Event, release: threading.Event):
    with stage_lock(run, sdir, "thumb", shard):
        started.set()
        release.wait(10)


def test_locks_let_shards_run_together_but_not_twice(tmp_path, cmu):
    cohort = load_cohort(write_manifest(tmp_path / "m.csv", cmu, 4))
    run = tmp_path / "run"
    started, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=_hold, args=(run, "thumb", (0, 2), started, release))
    holder.start()
    try:
        assert started.wait(10)
        # Another shard runs while shard 0 holds its lock.
        s = run_stage("thumb", cohort, run, {"size": 32}, thumbnail_stage, outputs, shard=(1, 2), progress=False)
        assert s.ok
        with pytest.raises(WsiError, match="shard 0/2 of stage 'thumb'"):
            run_stage("thumb", cohort, run, {"size": 32}, thumbnail_stage, outputs, shard=(0, 2), progress=False)
        with pytest.raises(WsiError, match="Shards 0of2 of stage 'thumb' are running"):
            run_stage("thumb", cohort, run, {"size": 32}, thumbnail_stage, outputs, progress=False)
        with pytest.raises(WsiError, match="are running"):
            merge_shards(run)
    finally:
        release.set()
        holder.join()
    started2, release2 = threading.Event(), threading.Event()
    holder = threading.Thread(target=_hold, args=(run, "thumb", None, started2, release2))
    holder.start()
    try:
        assert started2.wait(10)
        with pytest.raises(WsiError, match="unsharded run"):
            run_stage("thumb", cohort, run, {"size": 32}, thumbnail_stage, outputs, shard=(0, 2), progress=False)
    finally:
        release2.set()
        holder.join()


def test_temporaries_of_a_running_shard_survive_the_other_shards(tmp_path, cmu):
    cohort = load_cohort(write_manifest(tmp_path / "m.csv", cmu, 4))
    run = tmp_path / "run"
    (run / "thumb").mkdir(parents=True)
    in_flight = run / "thumb" / ".tmp-slide-00-abc.npy"
    in_flight.write_bytes(b"partial")
    run_stage("thumb", cohort, run, {"size": 32}, thumbnail_stage, outputs, shard=(1, 2), progress=False)
    assert in_flight.exists()
    run_stage("thumb", cohort, run, {"size": 32}, thumbnail_stage, outputs, shard=(0, 2), progress=False)
    merge_shards(run)  # no shard runs any more: the merge clears what killed shards left
    assert not in_flight.exists()


# ------------------------------------------------------------------------------------------------------ CLI

def test_cli_merge(tmp_path, cmu):
    cohort = load_cohort(write_manifest(tmp_path / "m.csv", cmu, 6))
    run = tmp_path / "run"
    run_stage("thumb", cohort, run, {"size": 32}, thumbnail_stage, outputs, shard=(0, 2), progress=False)
    runner = CliRunner()
    res = runner.invoke(app, ["merge", str(run)])
    assert res.exit_code == 1
    assert "shards that never ran: 1" in res.output
    run_stage("thumb", cohort, run, {"size": 32}, thumbnail_stage, outputs, shard=(1, 2), progress=False)
    res = runner.invoke(app, ["merge", str(run)])
    assert res.exit_code == 0, res.output
    assert "6 slides done, 0 failed, 0 missing" in res.output
    assert len(read_records(run)) == 2


# ------------------------------------------------------------------------------- the real slide stages

def test_segment_and_tile_in_two_shards_equal_one_run(tmp_path, cmu):
    from wsi2dmamba.grid import read_tile_grid
    from wsi2dmamba.tiling import tile_cohort
    from wsi2dmamba.tissue.stage import segment_cohort

    cohort = load_cohort(write_manifest(tmp_path / "m.csv", cmu, 4))
    one, sharded = tmp_path / "one", tmp_path / "sharded"
    segment_cohort(cohort, one, progress=False)
    tile_cohort(cohort, one, progress=False)
    for i in range(2):  # as two tasks of a Slurm array would, each running its stages in turn
        segment_cohort(cohort, sharded, progress=False, shard=(i, 2))
        tile_cohort(cohort, sharded, progress=False, shard=(i, 2))
    report = merge_shards(sharded)
    assert report.ok, report.lines()
    assert {s.stage_dir for s in report.stages} == {"segment", "tiles"}
    assert ledger_rows(sharded) == ledger_rows(one)
    for r in cohort:
        assert (sharded / "segment" / f"{r.slide_id}.geojson").read_text() == \
            (one / "segment" / f"{r.slide_id}.geojson").read_text()
        a, b = read_tile_grid(sharded / "tiles" / f"{r.slide_id}.h5"), read_tile_grid(one / "tiles" / f"{r.slide_id}.h5")
        np.testing.assert_array_equal(a.coords, b.coords)
        np.testing.assert_array_equal(a.index, b.index)
        assert a.params_hash == b.params_hash
