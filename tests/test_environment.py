"""A hostile environment and hand-edited files: read-only and full disks, odd slide ids and paths, edited
state files, checkpoint headers and training records, malformed CLAM / TRIDENT files, ``verify /``.

The property everywhere: one clear message naming the file and what to do (the project's own error, or
the command line's ``error:`` line and exit status 2), never a traceback; a per-file problem fails that
file alone and the batch goes on.
"""

from __future__ import annotations

import json
import re
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from training_data import make_cohort as make_training_cohort

from wsi2dmamba.cohort import Cohort, load_cohort
from wsi2dmamba.errors import ConfigError, ManifestError, WeightsError, WsiError

pytest_plugins = ["conftest_reliability"]

SLIDE = Path(__file__).parent / "data" / "CMU-1-Small-Region.svs"
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TINY_TRAIN = ["--model", "abmil", "--folds", "2", "--epochs", "2", "--lr", "5e-3", "--batch-size", "2",
              "--device", "cpu", "--set", "hidden=16", "--set", "attn_dim=8", "--quiet"]


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """Run the command line in this process; (exit status, everything printed)."""
    from wsi2dmamba.cli import main

    monkeypatch.setattr(sys, "argv", ["wsi2dmamba", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out + out.err


def slide_cohort(folder: Path, ids: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for sid in ids:
        os.symlink(SLIDE, folder / f"{sid}.svs")
    manifest = folder / "cohort.csv"
    manifest.write_text("slide_id,path\n" + "".join(f"{s},{s}.svs\n" for s in ids))
    return manifest


def mount_tmpfs(folder: Path, options: str) -> None:
    """Mount a tmpfs on ``folder`` (skips the test where that is not allowed)."""
    if sys.platform != "linux" or shutil.which("mount") is None:
        pytest.skip("needs Linux mount")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                         text=True, check=False)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {res.stderr.strip()}")


@pytest.fixture(scope="module")
def training(tmp_path_factory):
    """(manifest, features) of a small generated cohort of real feature grids."""
    return make_training_cohort(tmp_path_factory.mktemp("env-cohort"), n_patients=10, seed=3)


# ------------------------------------------------------------------------------------------- read-only and full disks

@pytest.fixture
def read_only_run(tmp_path, training):
    """A run folder (segmented, tiled and trained) on a file system made read-only afterwards."""
    from wsi2dmamba.tiling import TileConfig, tile_cohort
    from wsi2dmamba.tissue import read_segment_config, segment_cohort
    from wsi2dmamba.training import TrainConfig, train_cohort

    mnt = tmp_path / "ro"
    mnt.mkdir()
    mount_tmpfs(mnt, "size=16m")
    try:
        manifest = slide_cohort(tmp_path / "slides", ["a"])
        run = mnt / "run"
        segment_cohort(load_cohort(manifest), run, progress=False)
        tile_cohort(load_cohort(manifest), run, TileConfig(mpp=2.0, segment=read_segment_config(run)),
                    progress=False)
        tm, feats = training
        train_cohort(load_cohort(tm, require_path=False), feats, run, "abmil",
                     TrainConfig(folds=2, epochs=1, batch_size=2, device="cpu"), {"hidden": 16, "attn_dim": 8},
                     progress=False)
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        yield manifest, run
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_read_only_output_folder_is_one_clear_error_for_every_command(read_only_run, training, tmp_path,
                                                                      monkeypatch, capsys, counts):
    manifest, run = read_only_run
    tm, feats = training
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(f'[cohort]\nmanifest = "{manifest}"\n[extract]\ndevice = "cpu"\n'
                        '[train]\nmodels = ["abmil"]\ndevice = "cpu"\n')
    commands = {
        "segment": ["segment", "--cohort", str(manifest), "--out", str(run), "--force", "-q"],
        "tile": ["tile", "--cohort", str(manifest), "--out", str(run), "--mpp", "2", "--force", "-q"],
        "extract": ["extract", "--cohort", str(manifest), "--out", str(run), "--device", "cpu", "-q"],
        "import-features": ["import-features", str(feats), "--format", "trident", "--out", str(run)],
        "train": ["train", "--cohort", str(tm), "--features", str(feats), "--out", str(run), "--force",
                  *TINY_TRAIN],
        "evaluate": ["evaluate", "--out", str(run), "--n-boot", "10"],
        "report": ["report", "--out", str(run), "--n-boot", "10"],
        "run": ["run", str(pipeline), "--out", str(run / "new"), "-q"],
    }
    for name, args in commands.items():
        code, text = run_cli(monkeypatch, capsys, *args)
        counts("faults")
        assert code == 2, f"{name}: exit {code}: {text[-1500:]}"
        assert "Traceback" not in text and "read-only" in text.lower() and str(run) in text, f"{name}: {text}"


def test_full_disk_during_training_is_a_clear_error_then_resumes(tmp_path, training, monkeypatch, capsys, counts):
    """A real 64 KiB file system fills while ``train`` writes a checkpoint (through safetensors, whose
    own error type carries the errno): one error naming the file and the fix, no partial file, and the
    same command finishes once there is space."""
    tm, feats = training
    mnt = tmp_path / "small"
    mnt.mkdir()
    mount_tmpfs(mnt, "size=64k")
    try:
        args = ["train", "--cohort", str(tm), "--features", str(feats), "--out", str(mnt / "run"), *TINY_TRAIN]
        code, text = run_cli(monkeypatch, capsys, *args)
        counts("faults")
        assert code == 2 and "No space left on the device while writing" in text and "free space" in text, text
        assert "Traceback" not in text and str(mnt / "run" / "train") in text
        assert not list(mnt.rglob(".tmp-*"))
        subprocess.run(["mount", "-o", "remount,size=8m", str(mnt)], check=True)
        code, text = run_cli(monkeypatch, capsys, *args)
        assert code == 0, text
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_inside_a_library_writer_is_named(tmp_path, monkeypatch, counts):
    """Without a small disk: safetensors failing with "(os error 28)" inside the atomic writer becomes the
    project's full-disk error, and the temporary file is removed."""
    import torch
    from safetensors import SafetensorError

    from wsi2dmamba.models import checkpoint

    def full(*_args, **_kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("safetensors.torch.save_file", full)
    from wsi2dmamba.models import create

    model = create("meanpool", in_dim=4, n_classes=2, hidden=4)
    with pytest.raises(WsiError, match=r"No space left on the device while writing .*best\.safetensors"):
        checkpoint.save_checkpoint(tmp_path / "best.safetensors", model, {"epoch": 1})
    counts("faults")
    assert not list(tmp_path.iterdir())
    assert torch.is_tensor(next(model.parameters()))


# ------------------------------------------------------------------------------------------- slide ids and paths

@pytest.mark.parametrize("sid,why", [
    ("x" * 201, "bytes long"), ("é" * 101, "bytes long"), (".tmp-slide", "prefix of temporary files"),
    ("a\tb", "U+0009"), ("a\u202eb", "U+202E"), ("a\x1bb", "U+001B"),
])
def test_slide_ids_that_cannot_name_files_are_refused_in_the_manifest(tmp_path, sid, why, counts):
    """Refused with the line before any work (a 230-byte id used to abort a batch half-way through)."""
    m = tmp_path / "m.csv"
    m.write_text(f'slide_id,path\nok,ok.svs\n"{sid}",x.svs\n', encoding="utf-8")
    counts("inputs")
    with pytest.raises(ManifestError, match=rf"line 3: .*{re.escape(why)}"):
        load_cohort(m, check_files=False)


def test_longest_slide_id_runs_through_a_stage(tmp_path, counts):
    """An id of the longest accepted length (200 bytes) names every output and temporary file."""
    from wsi2dmamba.cohort.manifest import MAX_SLIDE_ID_BYTES
    from wsi2dmamba.tissue import segment_cohort

    sid = "é" * (MAX_SLIDE_ID_BYTES // 2)
    folder = tmp_path / "slides"
    folder.mkdir()
    os.symlink(SLIDE, folder / "s.svs")
    (folder / "m.csv").write_text(f"slide_id,path\n{sid},s.svs\n", encoding="utf-8")
    summary = segment_cohort(load_cohort(folder / "m.csv"), tmp_path / "run", progress=False)
    counts("inputs")
    assert summary.done == [sid], summary.failed


def test_slide_file_whose_name_cannot_be_an_id_is_refused(tmp_path):
    p = tmp_path / (".tmp-" + "s.svs")
    p.write_bytes(b"")
    with pytest.raises(ManifestError, match="prefix of temporary files"):
        Cohort.from_paths([p])


@pytest.mark.parametrize("path", ["a\0b.csv", "~nosuchuser-wsi2dmamba/cohort.csv"])
def test_pipeline_paths_with_nul_or_unknown_user_are_refused(tmp_path, path, counts):
    from wsi2dmamba.pipeline import load_pipeline

    p = tmp_path / "p.toml"
    p.write_text(f'[cohort]\nmanifest = {json.dumps(path)}\n[train]\nmodels = ["abmil"]\n')
    counts("inputs")
    with pytest.raises(ConfigError, match=r"p\.toml: \[cohort\] manifest: the path .*(NUL|no user)"):
        load_pipeline(p)
    with pytest.raises(ConfigError, match=r"(NUL|no user)"):
        load_pipeline(path.replace(".csv", ".toml"))
    with pytest.raises(ConfigError, match=r"(NUL|no user)"):
        load_cohort(path)


def test_verify_of_the_root_folder_is_refused_at_once(monkeypatch, capsys, counts):
    t0 = time.monotonic()
    code, text = run_cli(monkeypatch, capsys, "verify", "/")
    counts("inputs")
    assert code == 2 and "not a wsi2dmamba run folder" in text and "Traceback" not in text, text
    assert time.monotonic() - t0 < 20


# ------------------------------------------------------------------------------------------- hand-edited records

@pytest.fixture(scope="module")
def segmented(tmp_path_factory):
    """A run folder with slides a and b segmented."""
    from wsi2dmamba.tissue import segment_cohort

    base = tmp_path_factory.mktemp("segmented")
    manifest = slide_cohort(base / "slides", ["a", "b"])
    segment_cohort(load_cohort(manifest), base / "run", progress=False)
    return manifest, base / "run"


STATE_EDITS = {
    "source not an object": lambda s: {**s, "source": "edited"},
    "outputs a list": lambda s: {**s, "outputs": ["segment/a.geojson"]},
    "status a number": lambda s: {**s, "status": 5},
    "not an object": lambda s: [s],
    "seconds text": lambda s: {**s, "seconds": "fast"},
    "unknown field": lambda s: {**s, "owner": "me"},
}


@pytest.mark.parametrize("edit", sorted(STATE_EDITS))
def test_hand_edited_state_file_is_redone_and_reported(segmented, tmp_path, edit, counts):
    """The slide whose state was edited is processed again (the other is skipped), and ``verify`` names
    the state file instead of failing with a traceback."""
    from wsi2dmamba.cohort.verify import verify_run
    from wsi2dmamba.tissue import segment_cohort

    manifest, original = segmented
    run = tmp_path / "run"
    shutil.copytree(original, run, symlinks=True)
    state = run / "segment" / ".state" / "a.json"
    state.write_text(json.dumps(STATE_EDITS[edit](json.loads(state.read_text()))))
    counts("faults")
    report = verify_run(run)
    assert any(f.path.endswith("a.json") and "state file" in f.message for f in report.errors), report.findings
    summary = segment_cohort(load_cohort(manifest), run, progress=False)
    assert summary.done == ["a"] and summary.skipped == ["b"], summary
    assert verify_run(run).ok


@pytest.fixture(scope="module")
def trained(tmp_path_factory, training):
    from wsi2dmamba.training import TrainConfig, train_cohort

    tm, feats = training
    run = tmp_path_factory.mktemp("trained") / "run"
    train_cohort(load_cohort(tm, require_path=False), feats, run, "abmil",
                 TrainConfig(folds=2, epochs=2, lr=5e-3, batch_size=2, device="cpu"), {"hidden": 16, "attn_dim": 8},
                 folds_to_run=[0], progress=False)
    return run


def _edit_header(path: Path, key: str, change) -> None:
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = dict(f.metadata())
    meta[key] = change(meta[key])
    save_file(load_file(str(path)), str(path), metadata=meta)


@pytest.mark.parametrize("edit", ["epoch text", "log short", "optimizer groups", "best value text"])
def test_hand_edited_resume_state_is_refused_with_its_name(trained, training, tmp_path, edit, monkeypatch, capsys,
                                                         counts):
    """A fold stopped mid-way whose resume state's header was edited: ``train`` names the file and says
    to delete it (no traceback from inside the training loop)."""
    tm, feats = training
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    fold = run / "train" / "abmil" / "fold_0"
    from wsi2dmamba.models import create
    from wsi2dmamba.models.checkpoint import save_training_state

    model = create("abmil", in_dim=16, n_classes=2, hidden=16, attn_dim=8)
    import torch

    opt = torch.optim.AdamW(model.parameters())
    loop = {"epoch": 1, "step": 3, "best_value": 0.5, "best_epoch": 1, "log": [{"epoch": 1}]}
    save_training_state(fold / "resume.safetensors", model, opt, loop, {"torch": torch.get_rng_state()})
    (fold / "done.json").unlink()
    change = {
        "epoch text": lambda h: {**h, "loop": {**h["loop"], "epoch": "1"}},
        "log short": lambda h: {**h, "loop": {**h["loop"], "log": []}},
        "optimizer groups": lambda h: {**h, "param_groups": {"lr": 1}},
        "best value text": lambda h: {**h, "loop": {**h["loop"], "best_value": "good"}},
    }[edit]
    _edit_header(fold / "resume.safetensors", "wsi2dmamba.state",
                 lambda text: json.dumps(change(json.loads(text))))
    counts("faults")
    cfg = json.loads((fold / "config.json").read_text())
    args = ["train", "--cohort", str(tm), "--features", str(feats), "--out", str(run), "--fold", "0",
            "--model", "abmil", "--folds", "2", "--epochs", "2", "--lr", "5e-3", "--batch-size", "2",
            "--device", "cpu", "--set", "hidden=16", "--set", "attn_dim=8", "--quiet"]
    assert cfg["train"]["epochs"] == 2
    code, text = run_cli(monkeypatch, capsys, *args)
    assert code == 2 and "resume.safetensors" in text and "delete it" in text and "Traceback" not in text, text


@pytest.mark.parametrize("edit", ["done not json", "done best_epoch text", "config not json", "config a list"])
def test_hand_edited_fold_records_are_retrained_or_refused_clearly(trained, training, tmp_path, edit, monkeypatch,
                                                                  capsys, counts):
    """An edited ``done.json`` or fold ``config.json``: the fold is trained again (its record cannot be
    trusted) or refused with its name, and ``evaluate`` never reports it as it is."""
    tm, feats = training
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    fold = run / "train" / "abmil" / "fold_0"
    target, text = {
        "done not json": ("done.json", "{"),
        "done best_epoch text": ("done.json", json.dumps({**json.loads((fold / "done.json").read_text()),
                                                          "best_epoch": "2"})),
        "config not json": ("config.json", "not json"),
        "config a list": ("config.json", "[]"),
    }[edit]
    (fold / target).write_text(text)
    counts("faults")
    code, out = run_cli(monkeypatch, capsys, "evaluate", "--out", str(run), "--n-boot", "10")
    assert code == 2 and "fold 0" in out and "Traceback" not in out, out
    args = ["train", "--cohort", str(tm), "--features", str(feats), "--out", str(run), "--fold", "0",
            "--model", "abmil", "--folds", "2", "--epochs", "2", "--lr", "5e-3", "--batch-size", "2",
            "--device", "cpu", "--set", "hidden=16", "--set", "attn_dim=8", "--quiet"]
    code, out = run_cli(monkeypatch, capsys, *args)
    assert "Traceback" not in out
    if code == 0:
        assert "trained 2 epochs" in out
        code, out = run_cli(monkeypatch, capsys, "evaluate", "--out", str(run), "--n-boot", "10")
        assert code == 0, out
    else:
        assert code == 2 and str(fold) in out and "--force" in out, out


# ------------------------------------------------------------------------------------------- CLAM / TRIDENT files

def _trident(path: Path, n: int = 12, **attrs) -> Path:
    """A TRIDENT-like feature file: coords on a 512-px lattice with TRIDENT's attributes (overridable)."""
    rng = np.random.default_rng(0)
    coords = np.stack(np.meshgrid(np.arange(4) * 512, np.arange(3) * 512), -1).reshape(-1, 2)[:n]
    base = {"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 20, "target_magnification": 10,
            "overlap": 0}
    with h5py.File(path, "w") as f:
        f["features"] = rng.normal(size=(len(coords), 8)).astype(np.float32)
        ds = f.create_dataset("coords", data=attrs.pop("coords", coords))
        for k, v in {**base, **attrs}.items():
            if v is not None:
                ds.attrs[k] = v
    return path


def _clam(path: Path, **attrs) -> Path:
    coords = np.stack(np.meshgrid(np.arange(3) * 256, np.arange(3) * 256), -1).reshape(-1, 2)
    with h5py.File(path, "w") as f:
        f["features"] = np.ones((len(coords), 8), np.float32)
        ds = f.create_dataset("coords", data=coords)
        for k, v in {"patch_size": 256, "patch_level": 0, "downsample": [1.0, 1.0], **attrs}.items():
            ds.attrs[k] = v
    return path


# (format, attributes or coordinates, what must happen: "refused" with the file named, or "imported" into a
# valid grid, the odd attribute having been ignored).
MALFORMED = {
    "encoder attribute an array (ValueError: truth value of an array)": ("trident", {"features_encoder": True},
                                                                        "imported"),
    "level_dim of one number (not enough values to unpack)": ("clam", {"level_dim": [100]}, "refused"),
    "level_dim text": ("clam", {"level_dim": "big"}, "refused"),
    "patch size zero": ("trident", {"patch_size": 0}, "refused"),
    "patch size nan": ("trident", {"patch_size": np.nan}, "refused"),
    "patch size huge": ("trident", {"patch_size": 1e300, "patch_size_level0": 1e300}, "refused"),
    "patch_size_level0 negative": ("trident", {"patch_size_level0": -512}, "refused"),
    "magnification zero": ("trident", {"patch_size_level0": None, "level0_magnification": 0}, "refused"),
    "magnification huge": ("trident", {"level0_magnification": 1e300}, "refused"),
    "magnification array": ("trident", {"level0_magnification": [20, 40]}, "imported"),
    "overlap equal to the patch": ("trident", {"overlap": 256}, "refused"),
    "coords nan": ("trident", {"coords": np.full((4, 2), np.nan)}, "refused"),
    "coords negative": ("trident", {"coords": -np.arange(8).reshape(4, 2) * 512}, "refused"),
    "coords far apart": ("trident", {"coords": np.array([[0, 0], [2**30, 2**30]]), "patch_size_level0": 1},
                         "refused"),
    "downsample zero": ("clam", {"downsample": [0.0, 0.0]}, "imported"),
    "patch level text": ("clam", {"patch_level": "zero"}, "imported"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_clam_and_trident_files_are_refused_and_the_import_goes_on(tmp_path, case, counts):
    """Each file is refused with its name, or imported into a valid grid; the other files of the folder
    are imported either way."""
    from wsi2dmamba.features.importers import import_feature_file, import_features
    from wsi2dmamba.grid import read_feature_grid, write_feature_grid

    fmt, attrs, expected = MALFORMED[case]
    src = tmp_path / "src"
    src.mkdir()
    attrs = dict(attrs)
    encoder_array = attrs.pop("features_encoder", False)
    bad = (_trident if fmt == "trident" else _clam)(src / "bad.h5", **attrs)
    if encoder_array:
        with h5py.File(bad, "r+") as f:
            f["features"].attrs["encoder"] = np.array([1, 2, 3])
    (_trident if fmt == "trident" else _clam)(src / "good.h5")
    counts("inputs")
    mpp = 0.5 if fmt == "clam" else None
    if expected == "refused":
        with pytest.raises(WsiError, match=re.escape(str(bad))):
            import_feature_file(bad, fmt, mpp=mpp)
    else:
        grid = import_feature_file(bad, fmt, mpp=mpp)
        write_feature_grid(tmp_path / "check.h5", grid)
        assert read_feature_grid(tmp_path / "check.h5").n_tiles == grid.n_tiles
        if encoder_array:  # an array is no encoder name: the format's default name is used
            assert grid.encoder == "trident-import"
    summary = import_features(src, tmp_path / "run", fmt, mpp=mpp)
    assert "good" in summary.written and ("bad" in summary.failed) == (expected == "refused"), summary


def test_implausible_mpp_for_an_import_is_refused(tmp_path):
    from wsi2dmamba.features.importers import import_feature_file

    path = _clam(tmp_path / "s.h5")
    for mpp in (1e300, 1e-300, 0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="--mpp"):
            import_feature_file(path, "clam", mpp=mpp)


def test_checkpoint_header_with_edited_model_values_is_refused(trained, counts):
    """A checkpoint whose header's model configuration was edited (a text where a number belongs)."""
    from wsi2dmamba.training import load_checkpoint

    best = trained / "train" / "abmil" / "fold_0" / "best.safetensors"
    for change in ({"hidden": "sixteen"}, {"model": "no-such-model"}, {"dropout": [0.1]}):
        copy = best.parent.parent / f"edited-{len(str(change))}.safetensors"
        shutil.copy(best, copy)
        _edit_header(copy, "wsi2dmamba.model_config", lambda text, c=change: json.dumps({**json.loads(text), **c}))
        counts("faults")
        with pytest.raises(WeightsError, match=str(copy).replace(".", r"\.")):
            load_checkpoint(copy)
        copy.unlink()
