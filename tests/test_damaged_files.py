"""Damaged HDF5 files that crash or hang the HDF5 library: found by a seeded search over byte mutations of
a valid tiles file (``tests/data/damaged/make_damaged_grids.py``), and refused by ``extract`` and
``train`` as clear per-file failures, through the real command line, while the batch goes on."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wsi2dmamba.cohort import load_cohort
from wsi2dmamba.cohort.ledger import (
    SlideState,
    hash_outputs,
    recorded_sha256,
    write_state,
)
from wsi2dmamba.errors import GridFileError
from wsi2dmamba.grid.guard import TIME_LIMIT_ENV, guard_grid_files, probe_in_child

pytest_plugins = ["conftest_reliability"]

ROOT = Path(__file__).resolve().parents[1]
DAMAGED = ROOT / "tests" / "data" / "damaged"
sys.path.insert(0, str(DAMAGED))
from make_damaged_grids import VALID, apply_mutation, outcome, valid_path  # noqa: E402  (after the path above)

LIMIT_S = "2"  # the child's time limit in these tests: a hang costs 2 s


def _fixture(kind: str, layout: str = "tiles") -> bytes:
    """The damaged file of ``kind`` ("crash" or "hang") and ``layout`` ("tiles" or "trident"), built from
    the valid file and its recorded mutation, and identical to the kept copy."""
    m = json.loads((DAMAGED / "mutations.json").read_text())[layout][kind]
    data = apply_mutation(valid_path(layout).read_bytes(), m["pairs"])
    assert data == (DAMAGED / f"{kind}_{layout}.h5").read_bytes()
    return data


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), TIME_LIMIT_ENV: LIMIT_S, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "wsi2dmamba", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.mark.parametrize("layout", ["tiles", "trident"])
def test_fixtures_crash_and_hang_the_plain_reader(tmp_path, layout, counts):
    """The control: read by the stage's reader without the check, the files do crash and hang."""
    for kind in ("crash", "hang"):
        p = tmp_path / f"{kind}.h5"
        p.write_bytes(_fixture(kind, layout))
        counts("inputs")
        assert outcome(p, time_limit=3.0, layout=layout) == kind
    assert outcome(valid_path(layout), time_limit=10.0, layout=layout) == "ok"


def test_probe_names_the_crash_and_the_hang_and_reads_the_others(tmp_path, counts):
    paths = []
    for name, data in [("good1", VALID.read_bytes()), ("crash", _fixture("crash")), ("good2", VALID.read_bytes()),
                       ("hang", _fixture("hang")), ("good3", VALID.read_bytes())]:
        paths.append(tmp_path / f"{name}.h5")
        paths[-1].write_bytes(data)
    counts("inputs", 5)
    bad = probe_in_child(paths, "tiles", base_limit_s=2.0)
    assert set(bad) == {tmp_path / "crash.h5", tmp_path / "hang.h5"}
    assert "crashed" in bad[tmp_path / "crash.h5"] and "SIGSEGV" in bad[tmp_path / "crash.h5"]
    assert "did not finish within 2 s" in bad[tmp_path / "hang.h5"]


def test_a_file_with_a_recorded_hash_is_checked_before_hdf5_opens_it(tmp_path, counts):
    """A file the run wrote and recorded is compared by sha256, with no child process: a damaged copy is
    refused however it would have behaved in the HDF5 library."""
    folder = tmp_path / "tiles"
    folder.mkdir()
    p = folder / "s1.h5"
    p.write_bytes(VALID.read_bytes())
    write_state(tmp_path, SlideState(stage="tiles", slide_id="s1", status="done", params_hash="x",
                                     outputs=hash_outputs(tmp_path, [p])))
    assert recorded_sha256(p) == hash_outputs(tmp_path, [p])["tiles/s1.h5"]
    assert guard_grid_files([p], "tiles", {p: recorded_sha256(p)}, "tile") == {}
    p.write_bytes(_fixture("crash"))
    counts("inputs")
    bad = guard_grid_files([p], "tiles", {p: recorded_sha256(p)}, "tile", base_limit_s=0.001)
    assert str(p) in bad[p] and "changed since the tile stage wrote it" in bad[p] and "wsi2dmamba tile" in bad[p]


def _manifest(path: Path, ids: list[str], slide: Path) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "path"])
        w.writerows([(sid, str(slide)) for sid in ids])
    return path


def _ledger_rows(run: Path, stage_prefix: str) -> dict[str, dict]:
    with open(run / "ledger.csv", newline="") as fh:
        return {r["slide_id"]: r for r in csv.DictReader(fh) if r["stage"].startswith(stage_prefix)}


def test_extract_records_damaged_tiles_files_and_goes_on(tmp_path, cmu_slide, counts):
    """Four slides: a tiles file that crashes HDF5, one that hangs it (neither recorded by the run), one
    with a byte changed after the tile stage recorded it, and a good one. Extraction ends with the good
    slide done and the other three failed in the ledger with their reasons."""
    from wsi2dmamba.tiling import TileConfig, tile_cohort

    run = tmp_path / "run"
    ids = ["a_crash", "b_hang", "c_flipped", "d_good"]
    manifest = _manifest(tmp_path / "cohort.csv", ids, cmu_slide)
    good = load_cohort(_manifest(tmp_path / "good.csv", ["d_good"], cmu_slide))
    summary = tile_cohort(good, run, TileConfig(tile_px=224, mpp=1.0, segment_missing=True), progress=False)
    assert summary.ok, summary.failed
    tiles = run / "tiles"
    for kind, sid in (("crash", "a_crash"), ("hang", "b_hang")):  # files the run did not write
        (tiles / f"{sid}.h5").write_bytes(_fixture(kind))
    # c_flipped: tiled and recorded like d_good, then one bit of its file flips.
    state = json.loads((tiles / ".state" / "d_good.json").read_text())
    data = bytearray((tiles / "d_good.h5").read_bytes())
    state.update(slide_id="c_flipped", outputs={"tiles/c_flipped.h5": state["outputs"]["tiles/d_good.h5"]})
    (tiles / ".state" / "c_flipped.json").write_text(json.dumps(state))
    data[len(data) // 2] ^= 0x10
    (tiles / "c_flipped.h5").write_bytes(bytes(data))
    counts("inputs", 3)
    proc = _cli("extract", "--cohort", str(manifest), "--out", str(run), "--encoder", "efficientnet-lite0",
                "--device", "cpu", "--workers", "1", "--batch-size", "8", "--quiet")
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    rows = _ledger_rows(run, "features")
    assert {sid: r["status"] for sid, r in rows.items()} == {"a_crash": "failed", "b_hang": "failed",
                                                             "c_flipped": "failed", "d_good": "done"}
    assert f"{run / 'tiles' / 'a_crash.h5'} is damaged: the HDF5 library crashed" in rows["a_crash"]["reason"]
    assert "did not finish within 2 s" in rows["b_hang"]["reason"]
    assert "changed since the tile stage wrote it" in rows["c_flipped"]["reason"]
    assert (run / "features" / "efficientnet-lite0" / "d_good.h5").is_file()


def test_train_names_every_damaged_feature_file_without_crashing(tmp_path, counts):
    from training_data import make_cohort

    manifest, feats = make_cohort(tmp_path, n_patients=6, seed=3)
    ids = load_cohort(manifest, require_path=False).slide_ids
    (feats / f"{ids[1]}.h5").write_bytes(_fixture("crash"))
    (feats / f"{ids[3]}.h5").write_bytes(_fixture("hang"))
    counts("inputs", 2)
    proc = _cli("train", "--cohort", str(manifest), "--features", str(feats), "--out", str(tmp_path / "run"),
                "--model", "meanpool", "--folds", "2", "--epochs", "1", "--quiet")
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    err = " ".join(proc.stderr.split())
    assert "Traceback" not in err and "2 feature grid file(s)" in err
    assert f"{ids[1]}.h5 is damaged: the HDF5 library crashed" in err
    assert f"{ids[3]}.h5 is damaged: reading it did not finish" in err


def test_import_features_refuses_damaged_trident_files_and_goes_on(tmp_path, counts):
    """The real `import-features` command on three TRIDENT files: one crashes HDF5, one hangs it, one is
    good. The two are refused with their reasons, the third is imported."""
    src = tmp_path / "trident"
    src.mkdir()
    (src / "a_crash.h5").write_bytes(_fixture("crash", "trident"))
    (src / "b_hang.h5").write_bytes(_fixture("hang", "trident"))
    (src / "c_good.h5").write_bytes(valid_path("trident").read_bytes())
    counts("inputs", 2)
    proc = _cli("import-features", str(src), "--out", str(tmp_path / "run"), "--format", "trident")
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    err = " ".join(proc.stderr.split())
    assert "Traceback" not in err
    assert f"refused a_crash: {src / 'a_crash.h5'} is damaged: the HDF5 library crashed" in err
    assert f"refused b_hang: {src / 'b_hang.h5'} is damaged: reading it did not finish within 2 s" in err
    assert (tmp_path / "run" / "features" / "conch_v15" / "c_good.h5").is_file()


def test_probe_refuses_an_unknown_kind():
    with pytest.raises(ValueError):
        probe_in_child([VALID], "checkpoint")
    with pytest.raises(GridFileError):
        from wsi2dmamba.grid.guard import guard_grid_file

        guard_grid_file(DAMAGED / "crash_tiles.h5", "tiles", "0" * 64, "tile")
