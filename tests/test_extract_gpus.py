"""`extract --gpus`: one worker process per GPU taking slides from one queue, largest first, each loading
its encoder once; the ledger as with one process; a multi-GPU run killed part-way resumes. The GPUs are
fake (CUDA_VISIBLE_DEVICES entries on a CPU machine, the encoder on the CPU): what is tested is the
scheduling, not the arithmetic."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from wsi2dmamba.cohort import load_cohort
from wsi2dmamba.cohort.executors import LocalExecutor, TaskResources
from wsi2dmamba.errors import ConfigError
from wsi2dmamba.features import ExtractConfig, extract_cohort, feature_path
from wsi2dmamba.features.extract import largest_first, resolve_gpus
from wsi2dmamba.grid import read_feature_grid

ENCODER = "efficientnet-lite0"
REPO = Path(__file__).resolve().parents[1]
# Slides of different sizes (cells of 224 px: tumour, lymphocytes, stroma, other; 0 = glass).
LAYOUTS = {"s_small": (2, 2), "s_large": (4, 5), "s_mid": (3, 3), "s_wide": (2, 5), "s_tiny": (1, 2)}


@pytest.fixture(scope="module")
def tiled(tmp_path_factory):
    """A run folder with the tiles of five demo slides, and its cohort manifest."""
    from typer.testing import CliRunner

    from wsi2dmamba.cli import app
    from wsi2dmamba.demo.mosaic import render_cells, write_pyramidal_tiff

    root = tmp_path_factory.mktemp("gpus")
    rng = np.random.default_rng(0)
    rows = ["slide_id,path"]
    for sid, (h, w) in LAYOUTS.items():
        cells = rng.integers(1, 5, size=(h, w))
        path = write_pyramidal_tiff(root / f"{sid}.tif", render_cells(cells, rng))
        rows.append(f"{sid},{path}")
    (root / "cohort.csv").write_text("\n".join(rows) + "\n")
    res = CliRunner().invoke(app, ["tile", "--cohort", str(root / "cohort.csv"), "--out", str(root / "run"),
                                   "--mpp", "0.5", "--tile-px", "224", "--segment-missing", "--quiet"])
    assert res.exit_code == 0, res.output
    return root


def _copy_run(tiled: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(tiled / "run", dest)
    return dest


def _config() -> ExtractConfig:
    return ExtractConfig(encoder=ENCODER, device="cpu", workers=0, batch_size=16, decode="openslide")


def test_gpus_option_is_parsed_and_checked(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert resolve_gpus("all") == ["3", "5"]
    assert resolve_gpus("0, 1") == ["0", "1"] and resolve_gpus(None) is None
    with pytest.raises(ConfigError, match="named twice"):
        resolve_gpus("1,1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ConfigError, match="no GPU is visible"):
        resolve_gpus("all")
    with pytest.raises(ConfigError, match="local executor"):
        extract_cohort(load_cohort_stub(), "/nonexistent", _config(), gpus=["0", "1"], executor="ray")


def load_cohort_stub():
    from wsi2dmamba.cohort.manifest import Cohort

    return Cohort(records=())


def test_the_queue_is_largest_first(tiled):
    cohort = load_cohort(tiled / "cohort.csv")
    order = [r.slide_id for r in largest_first(cohort, tiled / "run")]
    assert order[0] == "s_large" and order[-1] == "s_tiny"
    assert sorted(order) == sorted(LAYOUTS)


def test_workers_pinned_to_fake_gpus_stay_alive_across_tasks():
    ex = LocalExecutor(resources=TaskResources(gpus=1, devices=("7", "9")))
    assert ex.pinned and ex.workers == 2
    seen = [out.value for out in ex.map(_whoami, [(k, (k,)) for k in range(6)])]
    pids = {pid for pid, _ in seen}
    assert len(pids) == 2  # two processes for six tasks: each took several
    gpus = {gpu for _, gpu in seen}
    assert gpus == {"7", "9"} and len({(p, g) for p, g in seen}) == 2  # one GPU per process


def _whoami(k: int) -> tuple[int, str]:
    time.sleep(0.3)  # long enough that both workers take tasks
    return os.getpid(), os.environ["CUDA_VISIBLE_DEVICES"]


@pytest.mark.slow
def test_extraction_spread_over_two_gpus_matches_one_process(tiled, tmp_path):
    cohort = load_cohort(tiled / "cohort.csv")
    spread_run = _copy_run(tiled, tmp_path / "spread")
    summary = extract_cohort(cohort, spread_run, _config(), gpus=["0", "1"], progress=False)
    assert sorted(summary.done) == sorted(LAYOUTS) and not summary.failed
    infos = summary.infos.values()
    by_pid = {}
    for info in infos:
        by_pid.setdefault(info["worker_pid"], set()).add(info["worker_gpu"])
        assert info["worker_encoder_loads"] == 1  # each worker loaded its encoder once, for all its slides
    assert all(len(g) == 1 for g in by_pid.values()) and len(by_pid) <= 2
    assert {g for gs in by_pid.values() for g in gs} <= {"0", "1"}
    with open(spread_run / "ledger.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["stage"].startswith("features")]
    assert sorted(r["slide_id"] for r in rows) == sorted(LAYOUTS) and {r["status"] for r in rows} == {"done"}
    # The same features as one process extracting the slides one after another.
    one_run = _copy_run(tiled, tmp_path / "one")
    extract_cohort(cohort, one_run, _config(), progress=False)
    for sid in LAYOUTS:
        a = read_feature_grid(feature_path(spread_run, ENCODER, sid)).features
        b = read_feature_grid(feature_path(one_run, ENCODER, sid)).features
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_a_killed_multi_gpu_run_resumes_where_it_stopped(tiled, tmp_path):
    run = _copy_run(tiled, tmp_path / "run")
    cmd = [sys.executable, "-c", "from wsi2dmamba.cli import main; main()", "extract", "--cohort", str(tiled / "cohort.csv"), "--out",
           str(run), "--encoder", ENCODER, "--device", "cpu", "--gpus", "0,1", "--workers", "0",
           "--batch-size", "16", "--decode", "openslide", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    states = run / "features" / ENCODER / ".state"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and len(list(states.glob("*.json"))) < 1:
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the command and its GPU workers, mid-run
        proc.wait()
    done_before = {p.stem for p in states.glob("*.json")}
    assert 1 <= len(done_before) < len(LAYOUTS)
    cohort = load_cohort(tiled / "cohort.csv")
    summary = extract_cohort(cohort, run, _config(), progress=False)  # in this process: no workers to start
    assert set(summary.skipped) == done_before and not summary.failed
    assert set(summary.done) == set(LAYOUTS) - done_before
    for sid in LAYOUTS:
        assert read_feature_grid(feature_path(run, ENCODER, sid)).n_tiles > 0
    from wsi2dmamba.fileio import _TMP_PREFIX

    assert not list((run / "features" / ENCODER).glob(f"{_TMP_PREFIX}*"))  # no half-written feature file
