"""Fault tests: runs killed with SIGKILL, a full disk, slides that change or vanish, two runs at once.

Every stage is run on real slides (copies of the CC0 CMU-1-Small-Region slide under several ids) in a
child process that is killed with SIGKILL at random moments (and once at the moment a temporary file
appears, i.e. in the middle of a write), then restarted. After every kill no half-written file may be
visible under its final name; after the restart the run must hold the same files as an uninterrupted run
(only creation times may differ) and ``verify`` must pass.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import sigkill_group
from wsi2dmamba.cohort import load_cohort, run_stage
from wsi2dmamba.cohort.verify import check_content, verify_run
from wsi2dmamba.errors import WsiError
from wsi2dmamba.fileio import write_text_atomic

pytest_plugins = ["conftest_reliability"]

SLIDE = Path(__file__).parent / "data" / "CMU-1-Small-Region.svs"
KILLS_PER_STAGE = int(os.environ.get("WSI_FAULT_KILLS", 3))
SEED = int(os.environ.get("WSI_FAULT_SEED", 0)) or random.randrange(1, 10**6)

# Runs one stage of the library over a manifest, in a child process that the tests kill.
DRIVER = textwrap.dedent("""
    import sys
    stage, manifest, run = sys.argv[1:4]
    from wsi2dmamba.cohort import load_cohort
    cohort = load_cohort(manifest)
    workers = int(sys.argv[4])
    if stage == "segment":
        from wsi2dmamba.tissue import segment_cohort
        summary = segment_cohort(cohort, run, progress=False, workers=workers)
    elif stage == "tile":  # coarse tiles keep extraction short
        from wsi2dmamba.tiling import TileConfig, tile_cohort
        from wsi2dmamba.tissue import read_segment_config
        config = TileConfig(mpp=1.0, segment=read_segment_config(run))
        summary = tile_cohort(cohort, run, config, progress=False, workers=workers)
    elif stage == "extract":
        from wsi2dmamba.features import ExtractConfig, extract_cohort
        config = ExtractConfig(encoder="efficientnet-lite0", device="cpu", workers=workers - 1, batch_size=8)
        summary = extract_cohort(cohort, run, config, progress=False)
    else:
        raise SystemExit(f"unknown stage {stage}")
    print(summary.line())
    raise SystemExit(0 if summary.ok else 1)
""")


# ------------------------------------------------------------------------------------------- helpers

def make_cohort(folder: Path, ids: list[str], copy: bool = False) -> Path:
    """A manifest of ``ids``, each a copy (or a link) of the test slide in ``folder``; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    for sid in ids:
        dst = folder / f"{sid}.svs"
        if copy:
            shutil.copy(SLIDE, dst)
        else:
            os.symlink(SLIDE, dst)
    m = folder / "cohort.csv"
    m.write_text("slide_id,path\n" + "".join(f"{s},{s}.svs\n" for s in ids))
    return m


def driver_cmd(stage: str, manifest: Path, run: Path, workers: int = 1) -> list[str]:
    return [sys.executable, "-c", DRIVER, stage, str(manifest), str(run), str(workers)]


def run_to_end(cmd: list[str]) -> float:
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return time.perf_counter() - t


def visible_files(run: Path) -> list[Path]:
    """Files a user or a later stage would read: everything but temporaries and locks."""
    return sorted(p for p in run.rglob("*") if p.is_file() and not p.name.startswith((".tmp-", ".lock")))


def compared_files(run: Path) -> set[Path]:
    """The visible files of two runs that must agree: the run logs (``logs/``, one per command, named by
    time and process) are housekeeping, like the ledger's times."""
    return {p.relative_to(run) for p in visible_files(run) if p.relative_to(run).parts[0] != "logs"}


def assert_all_whole(run: Path) -> int:
    """Every visible file is complete and valid for its kind; returns how many were checked."""
    from PIL import Image

    files = visible_files(run)
    for p in files:
        assert p.stat().st_size > 0 or p.suffix not in (".h5", ".png", ".json", ".geojson"), f"empty {p}"
        if p.suffix == ".png":
            with Image.open(p) as im:
                im.load()
        else:
            problem = check_content(p)
            assert problem is None, f"half-written or invalid file visible: {p}: {problem}"
    return len(files)




def kill_at_random_points(cmd: list[str], run: Path, full_seconds: float, rng: random.Random, counts,
                          kills: int = KILLS_PER_STAGE) -> int:
    """Start ``cmd`` and SIGKILL its whole process group, ``kills`` times: the first time as soon as a
    temporary output file appears (in the middle of a write), then at random moments. Returns the number
    of kills that hit a running process."""
    hits = 0
    for k in range(kills):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        if k == 0:
            deadline = time.monotonic() + 2 * full_seconds
            while time.monotonic() < deadline and proc.poll() is None:
                if run.is_dir() and any(run.rglob(".tmp-*")):
                    break
                time.sleep(0.002)
        else:
            time.sleep(rng.uniform(0.05, full_seconds))
        if sigkill_group(proc):
            hits += 1
            counts("faults")
        counts("files", assert_all_whole(run))
    return hits


IGNORED_STATE_KEYS = {"finished_at", "seconds"}  # creation-time only
IGNORED_INFO_KEYS = {"tiles_per_s"}  # a speed measurement
IGNORED_H5_ATTRS = {"created", "extract_seconds"}  # creation time, and how long extraction took


def compare_runs(ref: Path, got: Path) -> int:
    """Assert both runs hold the same files with the same content, creation times aside; returns the
    number of files compared."""
    rel = compared_files
    a, b = rel(ref), rel(got)
    assert a == b, f"only in the uninterrupted run: {sorted(a - b)}; only in the killed one: {sorted(b - a)}"
    for r in sorted(a):
        pa, pb = ref / r, got / r
        if ".state" in r.parts:
            sa, sb = json.loads(pa.read_text()), json.loads(pb.read_text())
            for s in (sa, sb):
                for k in IGNORED_STATE_KEYS:
                    s.pop(k, None)
                for k in IGNORED_INFO_KEYS:
                    s.get("info", {}).pop(k, None)
                # An .h5 file's hash covers its creation time; verify checks it against the file itself.
                s["outputs"] = {k: (v if not k.endswith(".h5") else "h5") for k, v in s["outputs"].items()}
            assert sa == sb, f"state {r} differs"
        elif r.suffix == ".csv" and r.name.startswith("ledger"):
            ra, rb = (list(csv.DictReader(open(p))) for p in (pa, pb))
            for row in ra + rb:
                for k in IGNORED_STATE_KEYS:
                    row.pop(k, None)
            assert ra == rb, f"{r} differs"
        elif r.suffix == ".h5":
            assert_same_h5(pa, pb)
        else:
            assert pa.read_bytes() == pb.read_bytes(), f"{r} differs"
    return len(a)


def assert_same_h5(pa: Path, pb: Path) -> None:
    import h5py

    with h5py.File(pa, "r") as fa, h5py.File(pb, "r") as fb:
        names_a, names_b = [], []
        fa.visit(names_a.append)
        fb.visit(names_b.append)
        assert names_a == names_b, f"{pb}: other datasets"
        for objs in ((fa, fb), *((fa[n], fb[n]) for n in names_a)):
            ka = {k: v for k, v in objs[0].attrs.items() if k not in IGNORED_H5_ATTRS}
            kb = {k: v for k, v in objs[1].attrs.items() if k not in IGNORED_H5_ATTRS}
            assert ka.keys() == kb.keys(), f"{pb}:{objs[1].name}: other attributes"
            for k in ka:
                assert np.array_equal(np.asarray(ka[k]), np.asarray(kb[k])), f"{pb}:{objs[1].name}@{k} differs"
        for n in names_a:
            if isinstance(fa[n], h5py.Dataset):
                assert fa[n].dtype == fb[n].dtype and np.array_equal(fa[n][...], fb[n][...]), f"{pb}:{n} differs"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted segment + tile + extract run of three slides; returns (manifest, run, seconds per
    stage)."""
    root = tmp_path_factory.mktemp("reference")
    manifest = make_cohort(root / "slides", ["a", "b", "c"])
    run = root / "run"
    seconds = {stage: run_to_end(driver_cmd(stage, manifest, run)) for stage in ("segment", "tile", "extract")}
    return manifest, run, seconds


# ------------------------------------------------------------------------------------------- SIGKILL

PREVIOUS = {"segment": [], "tile": ["segment"], "extract": ["segment", "tiles"]}
FOLDER = {"segment": "segment", "tile": "tiles", "extract": "features/efficientnet-lite0"}


@pytest.mark.parametrize("stage,workers", [("segment", 1), ("tile", 2), ("extract", 1)])
def test_killed_stage_resumes_to_identical_files(stage, workers, reference, tmp_path, counts):
    """SIGKILL at random points of a stage, restart: same files as the uninterrupted run, never a
    half-written file visible, and ``verify`` passes."""
    manifest_ref, run_ref, seconds = reference
    rng = random.Random(SEED + len(stage))
    manifest = make_cohort(tmp_path / "slides", ["a", "b", "c"])
    run = tmp_path / "run"
    for folder in PREVIOUS[stage]:  # the stage reads earlier stages' files: copy the finished ones
        shutil.copytree(run_ref / folder, run / folder)
    # Slide paths differ between the two runs (each has its own links): compare with them masked.
    kills = KILLS_PER_STAGE if stage != "extract" else max(1, KILLS_PER_STAGE - 1)  # the slowest stage
    hits = kill_at_random_points(driver_cmd(stage, manifest, run, workers), run, seconds[stage], rng, counts,
                                 kills)
    run_to_end(driver_cmd(stage, manifest, run, workers))
    counts("files", assert_all_whole(run))
    assert not list(run.rglob(".tmp-*")), "temporaries left after a finished run"
    ref_view, got_view = tmp_path / "ref_view", tmp_path / "got_view"
    _masked_copy(run_ref, ref_view, str(manifest_ref.parent), stage)
    _masked_copy(run, got_view, str(manifest.parent), stage)
    counts("files", compare_runs(ref_view, got_view))
    report = verify_run(run)
    counts("files", report.files_checked)
    assert report.ok and not report.warnings, [f.line() for f in report.findings]
    print(f"{stage}: {hits} kill(s) hit a running process (seed {SEED})")


def _masked_copy(run: Path, dst: Path, slides_dir: str, stage: str) -> None:
    """A copy of the run's ``stage`` folder, ledger and segment config in which the slide folder's path
    is replaced by a fixed name (text files and HDF5 attributes), so two runs on different slide
    folders compare equal."""
    import h5py

    folder = FOLDER[stage]
    shutil.copytree(run / folder, dst / folder, ignore=shutil.ignore_patterns(".lock*", ".tmp-*"))
    rows = [r for r in csv.DictReader(open(run / "ledger.csv")) if r["stage"] == folder]
    with open(dst / "ledger.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    for p in dst.rglob("*"):
        if p.suffix in (".json", ".geojson"):
            data = json.loads(p.read_text())
            if ".state" in p.parts:
                data.pop("source", None)  # fingerprint of each run's own link
            p.write_text(json.dumps(data, sort_keys=True).replace(slides_dir, "SLIDES"))
        elif p.suffix == ".h5":
            with h5py.File(p, "r+") as f:
                for k, v in list(f.attrs.items()):
                    if isinstance(v, str) and slides_dir in v:
                        f.attrs[k] = v.replace(slides_dir, "SLIDES")


# ------------------------------------------------------------------------------------------- full disk

@pytest.fixture
def small_fs(tmp_path):
    """A real, small file system (tmpfs) mounted on a fresh folder; yields (folder, remount(size))."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if sys.platform != "linux" or shutil.which("mount") is None:
        pytest.skip("needs Linux mount to make a small file system")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(mnt)], capture_output=True,
                         text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root or CAP_SYS_ADMIN): {res.stderr.strip()}")

    def resize(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True)

    try:
        yield mnt, resize
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_atomic_write_leaves_nothing(small_fs, counts):
    mnt, _ = small_fs
    write_text_atomic(mnt / "small.txt", "kept")
    with pytest.raises(WsiError, match=r"No space left on the device while writing .*big\.txt.*free space"):
        write_text_atomic(mnt / "big.txt", "x" * (4 << 20))
    counts("faults")
    assert sorted(p.name for p in mnt.iterdir()) == ["small.txt"]
    assert (mnt / "small.txt").read_text() == "kept"


def test_full_disk_grid_writers_fail_cleanly(small_fs, counts):
    """A feature grid larger than the disk: a clear error, nothing left, and the process survives (HDF5
    can crash a process whose write fails while it closes a file, so this runs in a child process)."""
    mnt, _ = small_fs
    code = textwrap.dedent(f"""
        import numpy as np, os, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_bad_input import _feature_grid
        from wsi2dmamba.errors import WsiError
        from wsi2dmamba.grid import write_feature_grid, write_tile_grid
        write_tile_grid({str(mnt / "t.h5")!r}, _feature_grid(dim=8))
        for i in range(3):
            try:
                write_feature_grid({str(mnt / "f.h5")!r}, _feature_grid(dim=4096, n_rows=12, n_cols=12))
            except WsiError as exc:
                print("clear error:", exc)
        import gc; gc.collect()
        print(sorted(os.listdir({str(mnt)!r})))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"child died ({res.returncode}): {res.stderr[-2000:]}"
    assert res.stdout.count("clear error: No space left on the device while writing") == 3
    assert res.stdout.strip().endswith("['t.h5']"), res.stdout
    counts("faults", 3)


def test_full_disk_mid_stage_then_resume(small_fs, tmp_path, reference, counts):
    """The disk fills up in the middle of segmenting a cohort: a clear error or failures naming the
    disk, no partial file, and after freeing space the rerun completes to the same files."""
    from wsi2dmamba.tissue import segment_cohort

    mnt, resize = small_fs
    manifest_ref, run_ref, _ = reference
    manifest = make_cohort(tmp_path / "slides", ["a", "b", "c"])
    cohort = load_cohort(manifest)
    run = mnt / "run"
    try:
        summary = segment_cohort(cohort, run, progress=False)
    except WsiError as exc:
        message = str(exc)
    else:
        assert summary.failed, "the small disk did not fill up"
        message = " ".join(summary.failed.values())
    counts("faults")
    assert "No space left on the device" in message
    counts("files", assert_all_whole(run))
    assert not list(run.rglob(".tmp-*"))
    resize("64m")
    summary = segment_cohort(cohort, run, progress=False)
    assert summary.ok and summary.done, summary.failed
    ref_view, got_view = tmp_path / "ref_view", tmp_path / "got_view"
    _masked_copy(run_ref, ref_view, str(manifest_ref.parent), "segment")
    _masked_copy(run, got_view, str(manifest.parent), "segment")
    counts("files", compare_runs(ref_view, got_view))


# ------------------------------------------------------------------------------------------- changing slides

def test_slide_that_disappears_is_a_clear_failure(tmp_path, counts):
    from wsi2dmamba.tissue import segment_cohort

    manifest = make_cohort(tmp_path / "slides", ["a", "b"], copy=True)
    cohort = load_cohort(manifest)
    (tmp_path / "slides" / "b.svs").unlink()  # after the manifest was checked, before b is read
    counts("faults")
    summary = segment_cohort(cohort, tmp_path / "run", progress=False)
    assert summary.done == ["a"] and set(summary.failed) == {"b"}
    assert str(tmp_path / "slides" / "b.svs") in summary.failed["b"] and "unexpected" not in summary.failed["b"]
    assert not (tmp_path / "run" / "segment" / "b.geojson").exists()


def segment_while_the_slide_changes(record, config, run_dir):
    """The segment stage's work, during which the slide file is rewritten (as by a scanner re-export)."""
    from wsi2dmamba.tissue.stage import segment_slide

    info = segment_slide(record, config, run_dir)
    st = os.stat(record.path)
    os.utime(record.path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    return info


def test_slide_changed_during_processing_is_detected_and_redone(tmp_path, counts):
    from wsi2dmamba.tissue import SegmentConfig
    from wsi2dmamba.tissue.stage import segment_cohort, segment_outputs

    manifest = make_cohort(tmp_path / "slides", ["a", "b"], copy=True)
    cohort = load_cohort(manifest)
    run = tmp_path / "run"
    summary = run_stage("segment", cohort, run, SegmentConfig(), segment_while_the_slide_changes,
                        segment_outputs, progress=False)
    counts("faults", 2)
    assert set(summary.failed) == {"a", "b"}
    assert all("changed or disappeared while" in r for r in summary.failed.values())
    # Once the files are stable, a rerun redoes them; later a change between runs redoes that slide only.
    assert segment_cohort(cohort, run, progress=False).done == ["a", "b"]
    with open(tmp_path / "slides" / "b.svs", "ab") as fh:
        fh.write(b"\0")
    counts("faults")
    again = segment_cohort(cohort, run, progress=False)
    assert again.done == ["b"] and again.skipped == ["a"]


# ------------------------------------------------------------------------------------------- two runs at once

def test_second_run_on_the_same_folder_is_refused(tmp_path, counts):
    from filelock import FileLock, Timeout

    from wsi2dmamba.tissue import segment_cohort

    manifest = make_cohort(tmp_path / "slides", ["a", "b", "c"])
    run = tmp_path / "run"
    first = subprocess.Popen(driver_cmd("segment", manifest, run), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    lock = run / "segment" / ".lock"
    deadline = time.monotonic() + 60
    held = False
    while time.monotonic() < deadline and first.poll() is None and not held:
        if lock.exists():
            try:
                FileLock(str(lock)).acquire(timeout=0)
            except Timeout:
                held = True
                break
            else:
                FileLock(str(lock)).release()
        time.sleep(0.01)
    assert held, "the first run never held its lock"
    counts("faults")
    with pytest.raises(WsiError, match="Another process is running"):
        segment_cohort(load_cohort(manifest), run, progress=False)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert "3 done" in out
    report = verify_run(run)
    counts("files", report.files_checked)
    assert report.ok, [f.line() for f in report.findings]


# ------------------------------------------------------------------------------------------- training

# Threads pinned to one: the same arithmetic in the same order in every run, and no OpenMP spinning on
# a busy machine.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
IGNORED_LOG_COLUMNS = {"seconds"}  # how long each epoch took


def train_cmd(manifest: Path, features: Path, run: Path) -> list[str]:
    """``wsi2dmamba train`` of a tiny ABMIL, 2 folds × 3 epochs on the CPU."""
    return [sys.executable, "-m", "wsi2dmamba", "train", "--cohort", str(manifest), "--features", str(features),
            "--out", str(run), "--model", "abmil", "--folds", "2", "--epochs", "3", "--lr", "5e-3",
            "--batch-size", "2", "--device", "cpu", "--set", "hidden=16", "--set", "attn_dim=8", "--quiet"]


def _written_since(root: Path, t_ns: int, pattern: str = "*") -> list[Path]:
    """Files (temporaries included) under ``root`` matching ``pattern`` modified at or after ``t_ns``."""
    found = []
    for p in root.rglob(pattern) if root.is_dir() else ():
        try:
            if p.stat().st_mtime_ns >= t_ns:
                found.append(p)
        except FileNotFoundError:  # a temporary renamed away meanwhile
            pass
    return found


def _fold_in_progress(run: Path) -> bool:
    """Some fold holds a resume state and is not finished: the kill left a fold mid-way."""
    return any((f / "resume.safetensors").is_file() and not (f / "done.json").is_file()
               for f in (run / "train").glob("*/fold_*"))


def assert_train_files_whole(run: Path) -> int:
    """Every visible file of the training folder is complete: safetensors load (every tensor), JSON
    parses, CSVs parse as rectangular tables; ``verify`` finds no error. Returns the files checked."""
    import pandas as pd
    from safetensors.numpy import load_file

    from wsi2dmamba.cohort.verify import find_fold_dirs

    n = assert_all_whole(run)
    for p in visible_files(run):
        if p.suffix == ".safetensors":
            assert load_file(p), f"{p}: no tensors"
        elif p.suffix == ".csv":
            assert len(pd.read_csv(p).columns) > 1, f"{p}: not a table"
    if find_fold_dirs(run):  # an unfinished fold is a warning, never an error
        report = verify_run(run)
        assert report.ok, [f.line() for f in report.errors]
    return n


def compare_training(ref: Path, got: Path) -> int:
    """Both training folders hold the same files: checkpoints tensor-identical (same header), the log
    equal but for epoch durations, ``done.json`` equal but for the log's hash, everything else byte
    for byte. Returns the number of files compared."""
    from safetensors import safe_open

    rel = compared_files
    a, b = rel(ref), rel(got)
    assert a == b, f"only in the uninterrupted run: {sorted(a - b)}; only in the killed one: {sorted(b - a)}"
    for r in sorted(a):
        pa, pb = ref / r, got / r
        if r.suffix == ".safetensors":
            with safe_open(str(pa), framework="numpy") as fa, safe_open(str(pb), framework="numpy") as fb:
                assert fa.metadata() == fb.metadata(), f"{r}: other header"
                assert sorted(fa.keys()) == sorted(fb.keys()), f"{r}: other tensors"
                for k in fa.keys():
                    ta, tb = fa.get_tensor(k), fb.get_tensor(k)
                    assert ta.dtype == tb.dtype and np.array_equal(ta, tb), f"{r}:{k} differs"
        elif r.name == "log.csv":
            ra, rb = (list(csv.DictReader(open(p))) for p in (pa, pb))
            strip = lambda rows: [{k: v for k, v in row.items() if k not in IGNORED_LOG_COLUMNS}  # noqa: E731
                                  for row in rows]
            assert strip(ra) == strip(rb), f"{r} differs"
        elif r.name == "done.json":
            da, db = json.loads(pa.read_text()), json.loads(pb.read_text())
            for d in (da, db):
                d["outputs"].pop("log.csv")  # the log holds the epochs' durations
            assert da == db, f"{r} differs"
        else:
            assert pa.read_bytes() == pb.read_bytes(), f"{r} differs"
    return len(a)


def test_killed_training_resumes_to_identical_files(tmp_path, counts):
    """SIGKILL ``wsi2dmamba train`` in the middle of a write, in the middle of a fold, and at random
    moments; restart: never a half-written file visible, the same checkpoints (tensor for tensor),
    predictions, logs and metrics as an uninterrupted run, and ``verify`` passes."""
    from training_data import make_cohort as make_training_cohort

    rng = random.Random(SEED + 5)
    manifest, features = make_training_cohort(tmp_path / "cohort", n_patients=10, seed=3)
    ref, run = tmp_path / "ref", tmp_path / "run"

    # The uninterrupted run; it times how long the process runs before its first write, and after.
    t0 = time.monotonic()
    first_write = None
    proc = subprocess.Popen(train_cmd(manifest, features, ref), env=ONE_THREAD, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    while proc.poll() is None:
        if first_write is None and (ref / "train").is_dir():
            first_write = time.monotonic() - t0
        time.sleep(0.005)
    out, err = proc.communicate()
    assert proc.returncode == 0, out + err
    writing = time.monotonic() - t0 - (first_write or 0.0)

    def start() -> tuple[subprocess.Popen, int]:
        launched = time.time_ns()
        return (subprocess.Popen(train_cmd(manifest, features, run), env=ONE_THREAD, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True), launched)

    def wait_for(proc: subprocess.Popen, found) -> None:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and not found():
            time.sleep(0.002)

    def kill(proc: subprocess.Popen) -> bool:
        alive = sigkill_group(proc)
        if alive:
            counts("faults")
        counts("files", assert_train_files_whole(run))
        return alive

    hits = 0
    # 1. In the middle of the first write (a temporary file exists).
    proc, _ = start()
    wait_for(proc, lambda: any((run / "train").rglob(".tmp-*")) if (run / "train").is_dir() else False)
    hits += kill(proc)
    # 2. In the middle of a fold: just after an epoch's resume state was written (retried if the fold ended
    #    between the look and the kill).
    mid_fold = 0
    for _ in range(3):
        proc, launched = start()
        wait_for(proc, lambda: any(not (p.parent / "done.json").exists()
                                   for p in _written_since(run / "train", launched, "resume.safetensors")))
        hits += kill(proc)
        if _fold_in_progress(run):
            mid_fold += 1
            break
    assert mid_fold, "no kill left a fold mid-way"
    # 3. At random moments once the process writes (imports take most of a short run's time).
    for _ in range(max(1, KILLS_PER_STAGE - 2)):
        proc, launched = start()
        wait_for(proc, lambda: bool(_written_since(run / "train", launched)))
        time.sleep(rng.uniform(0.0, writing))
        hits += kill(proc)

    res = subprocess.run(train_cmd(manifest, features, run), env=ONE_THREAD, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert not list(run.rglob(".tmp-*")), "temporaries left after a finished run"
    counts("files", compare_training(ref, run))
    report = verify_run(run)
    counts("files", report.files_checked)
    assert report.ok and not report.warnings, [f.line() for f in report.findings]
    assert report.folds_checked == 2 and report.files_checked == 2 * (7 + 2)  # hashed files + checkpoints
    print(f"train: {hits} kill(s) hit a running process, {mid_fold} mid-fold (seed {SEED})")
