"""Jobs that overlap or lose their parent: two trainings of one fold, a fold mixed from two runs, workers
whose main process is killed.

Each test runs the real command line or library on real (small) inputs in child processes and kills them
with SIGKILL, as a scheduler or a user would.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from filelock import FileLock, Timeout
from training_data import make_cohort as make_training_cohort

from helpers import sigkill_group
from wsi2dmamba.cohort import load_cohort
from wsi2dmamba.cohort.verify import verify_run
from wsi2dmamba.errors import StageInputError, TrainingError

pytest_plugins = ["conftest_reliability"]

ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SEED = int(os.environ.get("WSI_FAULT_SEED", 0)) or random.randrange(1, 10**6)


def train_cmd(manifest: Path, features: Path, run: Path, *extra: str, epochs: int = 3) -> list[str]:
    """``wsi2dmamba train`` of a tiny ABMIL on fold 0 of 2, on the CPU."""
    return [sys.executable, "-m", "wsi2dmamba", "train", "--cohort", str(manifest), "--features", str(features),
            "--out", str(run), "--model", "abmil", "--folds", "2", "--fold", "0", "--epochs", str(epochs),
            "--lr", "5e-3", "--batch-size", "2", "--device", "cpu", "--set", "hidden=16", "--set", "attn_dim=8",
            "--quiet", *extra]


def wait_until_locked(lock: Path, proc: subprocess.Popen, timeout: float = 120) -> bool:
    """Whether ``proc`` came to hold ``lock`` (an fcntl lock another process cannot take) within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if lock.exists():
            probe = FileLock(str(lock))
            try:
                probe.acquire(timeout=0)
            except Timeout:
                return True
            probe.release()
        time.sleep(0.01)
    return False




@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_training_cohort(tmp_path_factory.mktemp("train-cohort"), n_patients=10, seed=3)


# ------------------------------------------------------------------------------------------- one fold, two jobs

def test_second_training_of_a_fold_is_refused_and_a_killed_one_changes_nothing(cohort, tmp_path, counts):
    """While one ``train`` holds fold 0, a second one (library or command line) is refused at once with
    the fold and the lock named, and a third, other-configured job killed meanwhile leaves nothing: the
    first job's fold ends whole, ``verify`` passes and ``evaluate`` reads it."""
    from wsi2dmamba.evaluation import evaluate_run
    from wsi2dmamba.training import TrainConfig, train_cohort

    manifest, features = cohort
    run = tmp_path / "run"
    # long enough to outlive the other jobs below even on an idle machine
    first = subprocess.Popen(train_cmd(manifest, features, run, epochs=300), env=ONE_THREAD, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert wait_until_locked(run / "train" / "abmil" / "fold_0" / ".lock", first), \
            f"the first training never held its fold's lock: {first.communicate()}"
        counts("faults")
        config = TrainConfig(folds=2, epochs=3, lr=5e-3, batch_size=2, device="cpu")
        with pytest.raises(TrainingError, match=r"Another process is training abmil fold 0 .*fold_0/\.lock"):
            train_cohort(load_cohort(manifest, require_path=False), features, run, "abmil", config,
                         {"hidden": 16, "attn_dim": 8}, folds_to_run=[0], progress=False)
        second = subprocess.run(train_cmd(manifest, features, run), env=ONE_THREAD, capture_output=True, text=True,
                                timeout=120)
        counts("faults")
        assert second.returncode == 2 and "Another process is training abmil fold 0" in second.stderr, second
        assert "Traceback" not in second.stderr
        killed = subprocess.Popen(train_cmd(manifest, features, run, "--force", "--seed", "7"), env=ONE_THREAD,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(random.Random(SEED).uniform(0.5, 4.0))
        assert first.poll() is None, "the first training ended before the third job was killed"
        sigkill_group(killed)
        counts("faults")
        out, err = first.communicate(timeout=300)
    finally:
        sigkill_group(first)
    assert first.returncode == 0, out + err
    fold = json.loads((run / "train" / "abmil" / "fold_0" / "config.json").read_text())
    assert fold["train"]["seed"] == 0 and fold["train"]["epochs"] == 300
    report = verify_run(run)
    counts("files", report.files_checked)
    assert report.ok, [f.line() for f in report.errors]
    metrics = evaluate_run(run, n_boot=20, write=False)
    assert metrics["models"]["abmil"]["folds"] == [0]


@pytest.fixture(scope="module")
def two_runs(cohort, tmp_path_factory):
    """Fold 0 of a tiny ABMIL trained twice, with seeds 0 and 1, into two run folders."""
    from wsi2dmamba.training import TrainConfig, train_cohort

    manifest, features = cohort
    base = tmp_path_factory.mktemp("two-runs")
    for seed in (0, 1):
        config = TrainConfig(folds=2, epochs=3, lr=5e-3, batch_size=2, device="cpu", seed=seed)
        train_cohort(load_cohort(manifest, require_path=False), features, base / f"seed{seed}", "abmil", config,
                     {"hidden": 16, "attn_dim": 8}, folds_to_run=[0], progress=False)
    return base / "seed0", base / "seed1"


@pytest.mark.parametrize("mixed", ["last.safetensors", "best.json", "predictions.csv", "config.json", "log.csv"])
def test_evaluate_refuses_a_fold_mixed_from_two_runs(two_runs, tmp_path, mixed, counts):
    """A fold holding files of two trainings (here: one file copied from a run with another seed, as a
    second job killed mid-way would leave it) is refused by ``evaluate``, naming the model, the fold and
    the file, instead of being reported."""
    from wsi2dmamba.evaluation import evaluate_run

    run = tmp_path / "run"
    shutil.copytree(two_runs[0], run)
    evaluate_run(run, n_boot=20, write=False)  # whole: evaluated
    shutil.copy(two_runs[1] / "train" / "abmil" / "fold_0" / mixed, run / "train" / "abmil" / "fold_0" / mixed)
    counts("faults")
    with pytest.raises(StageInputError, match=rf"abmil fold 0 .*not one training run's output.*{mixed}"):
        evaluate_run(run, n_boot=20, write=False)


# ------------------------------------------------------------------------------------------- orphaned workers

SLIDE = Path(__file__).parent / "data" / "CMU-1-Small-Region.svs"


def children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (read from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # ended meanwhile
            continue
        if int(text.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_workers_die_with_their_killed_parent(tmp_path, counts):
    """SIGKILL of the main process alone (not its group) of ``segment --workers 2``: its workers end
    within seconds and write nothing more, so no output appears without the lock that the dead parent
    held; a rerun then finishes the stage."""
    folder = tmp_path / "slides"
    folder.mkdir()
    ids = [f"s{i}" for i in range(8)]
    for sid in ids:
        os.symlink(SLIDE, folder / f"{sid}.svs")
    manifest = folder / "cohort.csv"
    manifest.write_text("slide_id,path\n" + "".join(f"{s},{s}.svs\n" for s in ids))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "wsi2dmamba", "segment", "--cohort", str(manifest), "--out", str(run), "--quiet"]
    main = subprocess.Popen([*cmd, "--workers", "2"], env=ONE_THREAD, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        workers: list[int] = []
        while time.monotonic() < deadline and main.poll() is None and len(workers) < 2:
            workers = [p for p in children(main.pid)
                       if "wsi2dmamba" not in Path(f"/proc/{p}/cmdline").read_text(errors="replace")
                       and "resource_tracker" not in Path(f"/proc/{p}/cmdline").read_text(errors="replace")]
            time.sleep(0.05)
        assert len(workers) == 2 and main.poll() is None, "the stage never started two workers"
        time.sleep(random.Random(SEED).uniform(0.5, 2.0))  # the workers are in the middle of slides
        os.kill(main.pid, signal.SIGKILL)
        main.wait()
        killed_at = time.time_ns()
        counts("faults")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(alive(p) for p in workers):
            time.sleep(0.05)
        assert not any(alive(p) for p in workers), "workers still run after their parent was killed"
        time.sleep(1.0)
        late = [p for p in run.rglob("*") if p.is_file() and p.stat().st_mtime_ns > killed_at + 200_000_000]
        assert not late, f"written after the parent died: {late}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(main.pid, signal.SIGKILL)
    res = subprocess.run(cmd, env=ONE_THREAD, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    report = verify_run(run)
    counts("files", report.files_checked)
    assert report.ok, [f.line() for f in report.errors]
