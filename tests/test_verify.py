"""``wsi2dmamba verify RUN``: every file of a real run checked against its recorded hashes and parameters.

One run (segment + tile of the CC0 CMU-1-Small-Region slide) is made once; each test damages a copy of it
in one way and checks that verify names the file and the problem.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from wsi2dmamba.cohort import load_cohort
from wsi2dmamba.cohort.ledger import SlideState, hash_outputs, write_state
from wsi2dmamba.cohort.verify import verify_run
from wsi2dmamba.errors import WsiError
from wsi2dmamba.grid import FeatureGrid, read_tile_grid, write_feature_grid

pytest_plugins = ["conftest_reliability"]

SLIDE = Path(__file__).parent / "data" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A finished segment + tile run of two slides; returns (run folder, manifest)."""
    from wsi2dmamba.tiling import tile_cohort
    from wsi2dmamba.tissue import segment_cohort

    root = tmp_path_factory.mktemp("verify")
    (root / "slides").mkdir()
    shutil.copy(SLIDE, root / "slides" / "a.svs")
    os.symlink(SLIDE, root / "slides" / "b.svs")
    (root / "cohort.csv").write_text("slide_id,path\na,slides/a.svs\nb,slides/b.svs\n")
    cohort = load_cohort(root / "cohort.csv")
    run = root / "run"
    assert segment_cohort(cohort, run, progress=False).ok
    assert tile_cohort(cohort, run, progress=False).ok
    return run, root / "cohort.csv"


@pytest.fixture
def run(base_run, tmp_path):
    """A private copy of the finished run (the slides stay where the states recorded them)."""
    src, _ = base_run
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


def _verify(run, counts, **kw):
    report = verify_run(run, **kw)
    counts("files", report.files_checked)
    return report


def _messages(report, level="error"):
    return [f.line() for f in report.findings if f.level == level]


def test_intact_run_passes(run, counts):
    report = _verify(run, counts)
    assert report.ok and not report.warnings, report.findings
    assert report.states_checked == 4
    assert report.files_checked == 10  # per slide: geojson, mask, overlay; tiles file, grid picture


def test_changed_byte_is_found_and_named(run, counts):
    p = run / "segment" / "a_mask.png"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    counts("faults")
    report = _verify(run, counts)
    assert not report.ok
    (msg,) = _messages(report)
    assert "segment/a_mask.png" in msg and "content changed" in msg and "--force" in msg


def test_missing_output_is_found(run, counts):
    (run / "tiles" / "b.h5").unlink()
    counts("faults")
    (msg,) = _messages(_verify(run, counts))
    assert "tiles/b.h5" in msg and "missing" in msg


def test_forged_grid_file_with_matching_hash_fails_content_check(run, counts):
    import h5py

    p = run / "tiles" / "a.h5"
    with h5py.File(p, "r+") as f:  # a mask that disagrees with the index, hash updated to match
        m = f["grid/mask"][...]
        m[...] = 1 - m
        f["grid/mask"][...] = m
    st = json.loads((run / "tiles" / ".state" / "a.json").read_text())
    st["outputs"].update(hash_outputs(run, [p]))
    (run / "tiles" / ".state" / "a.json").write_text(json.dumps(st))
    counts("faults")
    (msg,) = _messages(_verify(run, counts))
    assert "tiles/a.h5" in msg and "grid/mask does not match grid/index" in msg
    assert _verify(run, counts, content=False).ok


def test_state_pointing_outside_the_run_is_refused(run, counts, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of the run")
    st = json.loads((run / "tiles" / ".state" / "a.json").read_text())
    st["outputs"]["../secret.txt"] = "0" * 64
    (run / "tiles" / ".state" / "a.json").write_text(json.dumps(st))
    counts("faults")
    report = _verify(run, counts)
    assert any("../secret.txt" in m and "outside the run folder" in m for m in _messages(report))


def test_damaged_state_file_is_an_error(run, counts):
    (run / "segment" / ".state" / "b.json").write_text('{"stage": "segment", "slide_')
    counts("faults")
    msgs = _messages(_verify(run, counts))
    assert any("segment/.state/b.json" in m and "cannot be read" in m for m in msgs)


def test_slides_made_with_other_parameters_are_found(run, counts):
    p = run / "tiles" / ".state" / "b.json"
    st = json.loads(p.read_text())
    st["params_hash"] = "ffffffffffffffff"
    p.write_text(json.dumps(st))
    counts("faults")
    msgs = _messages(_verify(run, counts))
    assert any(m.startswith("error: tiles:") and "different parameters" in m and "ffffffffffffffff" in m
               for m in msgs), msgs


def test_slide_changed_after_processing_is_found(base_run, run, counts):
    _, manifest = base_run
    slide = manifest.parent / "slides" / "a.svs"
    st = os.stat(slide)
    try:
        os.utime(slide, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        counts("faults")
        report = _verify(run, counts)
        msgs = _messages(report)
        assert len(msgs) == 2 and all("a.svs changed after stage" in m for m in msgs)
        assert _verify(run, counts, sources=False).ok
    finally:
        os.utime(slide, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_leftovers_and_stale_ledger_are_warnings(run, counts):
    (run / "tiles" / ".tmp-a-x1y2.h5").write_bytes(b"\x89HDF half")
    (run / "tiles" / "zz_old.h5").write_bytes(b"old")
    lines = (run / "ledger.csv").read_text().splitlines()
    (run / "ledger.csv").write_text("\n".join(lines[:-1]) + "\n")
    counts("faults", 3)
    report = _verify(run, counts)
    assert report.ok
    warns = _messages(report, "warning")
    assert any(".tmp-a-x1y2.h5" in w and "half-written" in w for w in warns)
    assert any("zz_old.h5" in w and "not recorded" in w for w in warns)
    assert any("ledger.csv" in w and "out of date" in w for w in warns)


def test_features_on_another_lattice_than_the_tiles_are_found(run, counts):
    tiles = read_tile_grid(run / "tiles" / "a.h5")
    keep = slice(0, max(1, tiles.n_tiles - 1))  # the slide was tiled again after extraction
    from dataclasses import replace

    older = replace(tiles, coords=tiles.coords[keep], index=tiles.index[keep],
                    tissue_fraction=tiles.tissue_fraction[keep])
    feats = np.random.default_rng(0).normal(size=(older.n_tiles, 4)).astype(np.float32)
    out = run / "features" / "enc" / "a.h5"
    write_feature_grid(out, FeatureGrid.from_tiles(older, feats, encoder="enc"))
    write_state(run, SlideState(stage="features/enc", slide_id="a", status="done", params_hash="1234",
                                outputs=hash_outputs(run, [out])))
    counts("faults")
    msgs = _messages(_verify(run, counts))
    assert len(msgs) == 1 and "features/enc/a.h5" in msgs[0] and "another lattice" in msgs[0]


def test_not_a_run_folder(tmp_path):
    with pytest.raises(WsiError, match="not a wsi2dmamba run folder"):
        verify_run(tmp_path)
    with pytest.raises(WsiError, match="Run folder not found"):
        verify_run(tmp_path / "nope")


def _cli(args, capsys):
    """Run the ``wsi2dmamba`` entry point in this process; return (exit status, stdout, stderr)."""
    from wsi2dmamba.cli import main

    old = sys.argv
    sys.argv = ["wsi2dmamba", *args]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_exit_status_and_json(run, tmp_path, counts, capsys):
    args = ["verify", str(run), "--quiet", "--json", str(tmp_path / "v.json")]
    code, out, err = _cli(args, capsys)
    assert code == 0, err
    assert "10 file(s) checked in 4 state(s); 0 error(s), 0 warning(s)" in out
    (run / "segment" / "b.geojson").write_text("{}")
    code, out, err = _cli(args, capsys)
    assert code == 1 and "segment/b.geojson" in err and "content changed" in err
    data = json.loads((tmp_path / "v.json").read_text())
    assert data["ok"] is False and data["files_checked"] == 10
    counts("files", 20)
    # The console script itself: a user error is one line on stderr, exit status 2, no traceback.
    missing = subprocess.run([sys.executable, "-m", "wsi2dmamba", "verify", str(tmp_path / "nope")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "Run folder not found" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_checkpoints_are_opened_and_matched_with_their_sidecar(run, counts):
    from wsi2dmamba.models import create
    from wsi2dmamba.models.checkpoint import save_checkpoint

    fold = run / "train" / "abmil" / "fold_0"
    save_checkpoint(fold / "best.safetensors", create("abmil", in_dim=8, n_classes=2))
    save_checkpoint(fold / "last.safetensors", create("abmil", in_dim=8, n_classes=2))
    report = _verify(run, counts)
    assert report.ok and report.files_checked == 12
    side = json.loads((fold / "best.json").read_text())
    side["model"]["hidden"] = 7
    (fold / "best.json").write_text(json.dumps(side))
    data = (fold / "last.safetensors").read_bytes()
    (fold / "last.safetensors").write_bytes(data[: len(data) // 3])
    counts("faults", 2)
    msgs = _messages(_verify(run, counts))
    assert len(msgs) == 2
    assert any("best.safetensors" in m and "differs from best.json" in m for m in msgs)
    assert any("last.safetensors" in m and "not valid safetensors" in m for m in msgs)


# ------------------------------------------------------------------------------------------- training folds

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished training run (tiny ABMIL, 2 folds × 2 epochs) on small real grids; returns its folder."""
    import torch
    from training_data import TINY, make_cohort

    from wsi2dmamba.training import TrainConfig, train_cohort

    root = tmp_path_factory.mktemp("verify-train")
    manifest, feats = make_cohort(root, n_patients=10, seed=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = TrainConfig(folds=2, epochs=2, lr=5e-3, batch_size=2, seed=0, device="cpu")
        train_cohort(load_cohort(manifest, require_path=False), feats, root / "run", "abmil", config,
                     TINY["abmil"], progress=False)
    finally:
        torch.set_num_threads(threads)
    return root / "run"


@pytest.fixture
def trun(trained, tmp_path):
    """A private copy of the finished training run."""
    dst = tmp_path / "run"
    shutil.copytree(trained, dst)
    return dst


def _rehash(fold: Path, *names: str) -> None:
    """Record the current sha256 of ``names`` in the fold's done.json (a forgery that passes the hash check)."""
    from wsi2dmamba.fileio import file_sha256

    done = json.loads((fold / "done.json").read_text())
    done["outputs"].update({n: file_sha256(fold / n) for n in names})
    (fold / "done.json").write_text(json.dumps(done))


def test_finished_training_passes_with_recorded_hashes(trun, counts):
    from wsi2dmamba.training.loop import FOLD_OUTPUTS

    report = _verify(trun, counts)
    assert report.ok and not report.warnings, report.findings
    assert report.states_checked == 0 and report.folds_checked == 2
    assert report.files_checked == 2 * (len(FOLD_OUTPUTS) + 2)  # hashed files, and the checkpoints opened
    assert "and 2 training fold(s)" in report.summary()
    done = json.loads((trun / "train" / "abmil" / "fold_0" / "done.json").read_text())
    assert sorted(done["outputs"]) == sorted(FOLD_OUTPUTS)


def _change_a_byte(fold):
    p = fold / "predictions.csv"
    data = bytearray(p.read_bytes())
    data[-3] = ord("7") if data[-3] != ord("7") else ord("3")
    p.write_bytes(bytes(data))


def _other_model_checkpoint(fold):
    from wsi2dmamba.models import create
    from wsi2dmamba.models.checkpoint import save_checkpoint

    cfg = json.loads((fold / "config.json").read_text())
    save_checkpoint(fold / "best.safetensors", create("abmil", in_dim=cfg["in_dim"], n_classes=2, hidden=8),
                    {"epoch": json.loads((fold / "done.json").read_text())["best_epoch"]})
    _rehash(fold, "best.safetensors", "best.json")


def _slide_dropped_from_predictions(fold):
    lines = (fold / "predictions.csv").read_text().splitlines(keepends=True)
    test_rows = [i for i, line in enumerate(lines) if ",last,2,test," in line]
    del lines[test_rows[0]]
    (fold / "predictions.csv").write_text("".join(lines))
    _rehash(fold, "predictions.csv")


def _nan_prediction(fold):
    text = (fold / "predictions.csv").read_text().splitlines(keepends=True)
    head, row = text[0].rstrip("\n").split(","), text[1].rstrip("\n").split(",")
    row[head.index("prob_1")] = "nan"
    (fold / "predictions.csv").write_text("".join([text[0], ",".join(row) + "\n", *text[2:]]))
    _rehash(fold, "predictions.csv")


def _log_cut_mid_row(fold):
    text = (fold / "log.csv").read_text()
    (fold / "log.csv").write_text(text[: len(text) - 25])
    _rehash(fold, "log.csv")


def _sidecar_of_another_epoch(fold):
    side = json.loads((fold / "last.json").read_text())
    side["epoch"] = 1
    (fold / "last.json").write_text(json.dumps(side))
    _rehash(fold, "last.json")


def _other_configuration(fold):
    cfg = json.loads((fold / "config.json").read_text())
    cfg["config_hash"] = "0123456789abcdef"
    (fold / "config.json").write_text(json.dumps(cfg))
    _rehash(fold, "config.json")


def _other_splits(fold):
    split = fold.parents[1] / "splits" / "splits_0.csv"
    lines = split.read_text().splitlines(keepends=True)  # move the first test slide to train
    cols = lines[1].rstrip("\n").split(",")
    lines[1] = ",".join([cols[0], cols[3], cols[2], cols[1]]) + "\n"
    split.write_text("".join(lines))


@pytest.mark.parametrize("damage,where,expected", [
    (_change_a_byte, "predictions.csv", "content changed since training wrote it"),
    (lambda fold: (fold / "last.json").unlink(), "last.json", "missing from a finished training fold"),
    (_other_model_checkpoint, "best.safetensors", "differs from the fold's config.json"),
    (_slide_dropped_from_predictions, "predictions.csv", "last/test rows are not the"),
    (_nan_prediction, "predictions.csv", "not a number"),
    (_log_cut_mid_row, "log.csv", "field(s), the header"),
    (_sidecar_of_another_epoch, "last.json", "epoch 1, done.json names epoch 2"),
    (_other_configuration, "config.json", "another configuration than the one the finished fold"),
    (_other_splits, "config.json", "another train partition than train/splits/splits_0.csv"),
], ids=["byte", "missing", "other-model", "dropped-slide", "nan", "cut-log", "sidecar-epoch", "config",
        "splits"])
def test_damaged_training_fold_is_found_and_named(trun, counts, damage, where, expected):
    fold = trun / "train" / "abmil" / "fold_0"
    damage(fold)
    counts("faults")
    msgs = _messages(_verify(trun, counts))
    assert msgs and all(f"train/abmil/fold_0/{where}" in m or "splits_0.csv" in m for m in msgs), msgs
    assert any(expected in m for m in msgs), msgs
    assert all("--name abmil --fold 0 --force" in m for m in msgs if "fold_0" in m), msgs


def test_unfinished_and_older_folds_are_warnings(trun, counts):
    f0, f1 = trun / "train" / "abmil" / "fold_0", trun / "train" / "abmil" / "fold_1"
    (f0 / "done.json").unlink()  # as if killed mid-fold, with the state to continue from
    (f0 / "resume.safetensors").write_bytes((f0 / "last.safetensors").read_bytes())
    done = json.loads((f1 / "done.json").read_text())
    del done["outputs"]  # written before sha256s were recorded
    (f1 / "done.json").write_text(json.dumps(done))
    counts("faults", 2)
    report = _verify(trun, counts)
    assert report.ok
    warns = _messages(report, "warning")
    assert len(warns) == 2
    assert any("fold_0" in w and "not finished" in w and "continues from its last finished epoch" in w for w in warns)
    assert any("fold_1/done.json" in w and "records no sha256" in w for w in warns)


def test_cut_off_csv_is_not_valid_content(tmp_path):
    from wsi2dmamba.cohort.verify import check_content

    p = tmp_path / "t.csv"
    p.write_text("a,b,c\n1,2,3\n4,5")
    assert "line 3 has 2 field(s), the header 3" in check_content(p)
    p.write_text("a,b,c\n1,2,3\n\n4,5,6\n")
    assert check_content(p) is None
