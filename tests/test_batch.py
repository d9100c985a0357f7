"""Batches of slides: failures recorded in the ledger, resume, parallel workers, and a killed batch."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from wsi2dmamba.cohort import load_cohort
from wsi2dmamba.tiling import tile_cohort
from wsi2dmamba.tissue import segment_cohort

CLI = [sys.executable, "-m", "wsi2dmamba"]


def cohort_csv(tmp_path, cmu_slide, n, *, truncated=False, no_mpp=None, blank=None):
    """A manifest of ``n`` hard links to the CMU slide (+ a truncated copy, + a slide without mpp,
    + a blank image at 0.5 µm/px)."""
    d = tmp_path / "slides"
    d.mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        p = d / f"s{i}.svs"
        if not p.exists():
            os.link(cmu_slide, p)
        rows.append((f"s{i}", p))
    if truncated:
        p = d / "half.svs"
        data = cmu_slide.read_bytes()
        p.write_bytes(data[: len(data) // 2])
        rows.append(("half", p))
    if no_mpp is not None:
        rows.append(("nompp", no_mpp))
    rows = [(sid, p, "") for sid, p in rows]
    if blank is not None:
        rows.append(("blank", blank, "0.5"))
    m = tmp_path / "cohort.csv"
    m.write_text("slide_id,path,mpp\n" + "".join(f"{sid},{p},{mpp}\n" for sid, p, mpp in rows))
    return m


def ledger(run):
    with open(run / "ledger.csv", newline="") as fh:
        return {(r["stage"], r["slide_id"]): r for r in csv.DictReader(fh)}


def test_failed_slides_are_recorded_and_the_batch_goes_on(tmp_path, cmu_slide, shared_data):
    m = cohort_csv(tmp_path, cmu_slide, 2, truncated=True,
                   no_mpp=shared_data / "slides/aperio_svs/tcga-cr-7395-01a-01-ts1.svs",
                   blank=shared_data / "tiles/histolab_fixture_tiles/no-tissue.png")
    run = tmp_path / "run"
    p = subprocess.run([*CLI, "segment", "--cohort", str(m), "--out", str(run), "-q"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 1, p.stderr  # something failed; the rest was done
    assert "2 done" in p.stdout and "3 failed" in p.stdout
    led = ledger(run)
    assert led[("segment", "s0")]["status"] == "done" and led[("segment", "s1")]["status"] == "done"
    assert led[("segment", "half")]["status"] == "failed"
    assert "truncated or damaged" in led[("segment", "half")]["reason"]
    assert led[("segment", "nompp")]["status"] == "failed" and "'mpp' column" in led[("segment", "nompp")]["reason"]
    assert led[("segment", "blank")]["status"] == "failed" and "No tissue found" in led[("segment", "blank")]["reason"]
    assert (run / "segment" / "blank_overlay.png").is_file()  # to look at why

    # Tiling goes on too; the failed slides fail again with their own reason.
    summary = tile_cohort(load_cohort(m), run, progress=False)
    assert sorted(summary.done) == ["s0", "s1"] and set(summary.failed) == {"half", "nompp", "blank"}
    assert "segmentation failed: No tissue found" in summary.failed["blank"]
    led = ledger(run)
    assert led[("tiles", "s0")]["status"] == "done" and led[("tiles", "half")]["status"] == "failed"

    # A rerun skips what is done and retries what failed.
    again = segment_cohort(load_cohort(m), run, progress=False)
    assert sorted(again.skipped) == ["s0", "s1"] and set(again.failed) == {"half", "nompp", "blank"}


def test_tile_without_segmentation_says_what_to_run(tmp_path, cmu_slide):
    m = cohort_csv(tmp_path, cmu_slide, 1)
    summary = tile_cohort(load_cohort(m), tmp_path / "run", progress=False)
    assert "Run `wsi2dmamba segment` first" in summary.failed["s0"]


def outputs_of(run):
    """Every output file of the run, by path relative to it (state files, ledger, logs and locks left out)."""
    return sorted(p.relative_to(run) for p in run.rglob("*")
                  if p.is_file() and ".state" not in p.parts and "logs" not in p.relative_to(run).parts
                  and p.name not in ("ledger.csv", ".lock"))


def assert_same_outputs(a, b):
    assert outputs_of(a) == outputs_of(b) and outputs_of(a)
    for rel in outputs_of(a):
        if rel.suffix == ".h5":
            with h5py.File(a / rel, "r") as fa, h5py.File(b / rel, "r") as fb:
                ignore = {"created"}
                assert {k: v for k, v in fa.attrs.items() if k not in ignore} == \
                    pytest.approx({k: v for k, v in fb.attrs.items() if k not in ignore})
                names = []
                fa.visit(names.append)
                for name in names:
                    if isinstance(fa[name], h5py.Dataset):
                        assert np.array_equal(fa[name][...], fb[name][...]), name
                        assert dict(fa[name].attrs).keys() == dict(fb[name].attrs).keys()
        else:
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def run_and_kill(args, state_dir, timeout=90):
    """Start the CLI, SIGKILL it once the first slide's state file appears; True if it was killed."""
    proc = subprocess.Popen([*CLI, *args, "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    try:
        while proc.poll() is None and time.monotonic() - t0 < timeout:
            if state_dir.is_dir() and any(state_dir.glob("s*.json")):  # a whole state, not a temporary
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return False


def test_killed_and_restarted_batch_equals_an_uninterrupted_one(tmp_path, cmu_slide):
    m = cohort_csv(tmp_path, cmu_slide, 4)
    # The uninterrupted reference runs in 2 worker processes: parallel and serial runs must agree too.
    ref = tmp_path / "ref"
    assert segment_cohort(load_cohort(m), ref, workers=2, progress=False).ok
    assert tile_cohort(load_cohort(m), ref, workers=2, progress=False).ok

    run = tmp_path / "killed"
    for stage, folder in (("segment", "segment"), ("tile", "tiles")):
        args = [stage, "--cohort", str(m), "--out", str(run)]
        killed = run_and_kill(args, run / folder / ".state")
        assert killed, f"{stage} finished before it could be killed"
        n_states = len(list((run / folder / ".state").glob("s*.json")))
        assert 1 <= n_states < 4, "the kill should come in the middle of the batch"
        p = subprocess.run([*CLI, *args, "-q"], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        assert f"{4 - n_states} done, {n_states} skipped" in p.stdout
    assert not [p for p in run.rglob(".tmp-*")], "temporary files of the killed run must be cleaned up"
    assert_same_outputs(ref, run)


def test_deleted_output_is_made_again(tmp_path, cmu_slide):
    m = cohort_csv(tmp_path, cmu_slide, 2)
    run = tmp_path / "run"
    segment_cohort(load_cohort(m), run, progress=False)
    (run / "segment" / "s1_overlay.png").unlink()
    again = segment_cohort(load_cohort(m), run, progress=False)
    assert again.done == ["s1"] and again.skipped == ["s0"]
    shutil.rmtree(run / "segment")
    assert sorted(segment_cohort(load_cohort(m), run, progress=False).done) == ["s0", "s1"]
