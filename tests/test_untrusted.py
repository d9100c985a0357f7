"""Untrusted files: checkpoints load without pickle; HDF5 files are validated before use and never read
data from elsewhere; manifest paths are file names, never options or shell text."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from wsi2dmamba.cohort import load_cohort
from wsi2dmamba.errors import GridFileError, ManifestError, WeightsError, WsiError
from wsi2dmamba.grid import read_feature_grid, read_tile_grid, write_feature_grid

pytest_plugins = ["conftest_reliability"]

SLIDE = Path(__file__).parent / "data" / "CMU-1-Small-Region.svs"


class _MarkerPayload:
    """Unpickling this object creates a marker file: proof that a pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# ------------------------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("name", ["model.safetensors", "model.pt", "model.ckpt", "model.bin"])
def test_pickle_checkpoint_is_refused_without_being_unpickled(tmp_path, name, counts):
    from wsi2dmamba.models.checkpoint import load_checkpoint

    marker = tmp_path / "EXECUTED"
    assert not marker.exists()
    payload = _MarkerPayload(marker)
    bad = tmp_path / name
    if name.endswith(".pt"):
        import torch

        torch.save({"state_dict": payload}, bad, _use_new_zipfile_serialization=True)
    else:
        bad.write_bytes(pickle.dumps({"state_dict": payload}))
    pickle.loads(pickle.dumps(_MarkerPayload(tmp_path / "control")))  # the payload does work when unpickled
    assert (tmp_path / "control").exists()
    counts("inputs")
    with pytest.raises(WeightsError) as ei:
        load_checkpoint(bad)
    assert str(bad) in str(ei.value)
    assert not marker.exists(), "the checkpoint was unpickled"


def _tiny_model():
    from wsi2dmamba.models import create, list_models

    names = list_models()
    name = "abmil" if "abmil" in names else names[0]
    return create(name, in_dim=8, n_classes=2)


def test_checkpoint_round_trip_and_damaged_checkpoints(tmp_path, counts):
    import torch
    from safetensors.torch import save_file

    from wsi2dmamba.models.checkpoint import load_checkpoint, save_checkpoint

    model = _tiny_model()
    good = save_checkpoint(tmp_path / "fold0.safetensors", model)
    back = load_checkpoint(good)
    for (k, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    cfg_key = "wsi2dmamba.model_config"
    import json

    cfg = json.dumps(model.config_dict())
    first = next(iter(tensors))
    cases = {
        "truncated": good.read_bytes()[: len(good.read_bytes()) // 2],
        "empty": b"",
        "huge_header_length": (2**62).to_bytes(8, "little") + b"{}",
    }
    for label, data in cases.items():
        p = tmp_path / f"{label}.safetensors"
        p.write_bytes(data)
        counts("inputs")
        with pytest.raises(WeightsError, match=str(p)):
            load_checkpoint(p)
    shapes = dict(tensors)
    shapes[first] = torch.zeros(3, 3, 3)
    save_file(shapes, str(tmp_path / "shapes.safetensors"), metadata={cfg_key: cfg})
    save_file(tensors, str(tmp_path / "nocfg.safetensors"))
    for label in ("shapes", "nocfg"):
        counts("inputs")
        with pytest.raises(WeightsError, match=f"{label}.safetensors"):
            load_checkpoint(tmp_path / f"{label}.safetensors")


@pytest.mark.parametrize("config", ["{not json", '{"model": "no-such"}', "[1, 2]"])
def test_checkpoint_with_malformed_config_is_a_clear_error(tmp_path, config, counts):
    import torch
    from safetensors.torch import save_file

    from wsi2dmamba.models.checkpoint import load_checkpoint

    p = tmp_path / "badconfig.safetensors"
    save_file({"w": torch.zeros(2)}, str(p), metadata={"wsi2dmamba.model_config": config})
    counts("inputs")
    with pytest.raises(WsiError, match="badconfig.safetensors"):
        load_checkpoint(p)


@pytest.mark.parametrize("forged", [{"in_dim": 10**7}, {"hidden": 10**6, "attn_dim": 10**6}, {"n_layers": 10**6}])
def test_forged_checkpoint_header_is_refused_before_building_the_model(tmp_path, forged, counts):
    import json

    from safetensors.torch import save_file

    from wsi2dmamba.models import create
    from wsi2dmamba.models.checkpoint import load_checkpoint

    name = "2dmambamil" if "n_layers" in forged else "abmil"
    model = create(name, in_dim=8, n_classes=2)
    p = tmp_path / "forged.safetensors"
    save_file({k: v.clone() for k, v in model.state_dict().items()}, str(p),
              metadata={"wsi2dmamba.model_config": json.dumps({**model.config_dict(), **forged})})
    counts("inputs")
    t0 = time.perf_counter()
    with pytest.raises(WeightsError, match="forged.safetensors") as ei:
        load_checkpoint(p)
    # A model of this size would take gigabytes and many seconds to build; the header check takes neither.
    assert time.perf_counter() - t0 < 10
    if "n_layers" not in forged:
        assert "shape" in str(ei.value)


# ------------------------------------------------------------------------------------------- HDF5

def _grid(n_rows=4, n_cols=4, dim=8):
    from test_bad_input import _feature_grid

    return _feature_grid(dim=dim, n_rows=n_rows, n_cols=n_cols)


def _edit(path: Path, fn) -> None:
    with h5py.File(path, "r+") as f:
        fn(f)


def _replace(name, data=None, **kw):
    def edit(f):
        del f[name]
        f.create_dataset(name, data=data, **kw)
    return edit


def _attr(obj, key, value):
    def edit(f):
        (f[obj] if obj else f).attrs[key] = value
    return edit


def _secret(tmp: Path, n: int) -> Path:
    s = tmp / "secret.bin"
    s.write_bytes(np.arange(n, dtype=np.float32).tobytes())
    return s


HDF5_CASES = {
    # what is wrong → (edit, expected words in the message)
    "index out of range": (lambda f: f["grid/index"].__setitem__((0, 0), 99), "outside the"),
    "negative index": (lambda f: f["grid/index"].__setitem__((0, 1), -1), "outside the"),
    "two tiles in one cell": (lambda f: f["grid/index"].__setitem__(1, f["grid/index"][0]),
                              ("share a cell", "does not match grid/index")),
    "mask disagrees": (lambda f: f["grid/mask"].__setitem__((0, 0), 0), "does not match grid/index"),
    "mask of other shape": (_replace("grid/mask", np.ones((2, 2), np.uint8)), "grid/mask"),
    "float coords": (_replace("coords", np.zeros((16, 2), np.float64)), "dtype"),
    "string features": (_replace("features", np.array([[b"x"] * 8] * 16)), "dtype"),
    "features of other length": (_replace("features", np.zeros((15, 8), np.float32)), "shape"),
    "NaN feature": (lambda f: f["features"].__setitem__((3, 2), np.nan), "NaN or inf"),
    "inf feature": (lambda f: f["features"].__setitem__((5, 0), -np.inf), "NaN or inf"),
    "tissue fraction > 1": (lambda f: f["tissue_fraction"].__setitem__(0, 7.0), "tissue_fraction"),
    "forged huge grid": (_attr("grid", "shape", np.array([2**30, 2**30])), "cannot hold"),
    "zero mpp": (_attr("", "mpp_level0", 0.0), "mpp_level0"),
    "NaN stride": (_attr("grid", "stride_level0", np.nan), "stride_level0"),
    "newer format": (_attr("", "format_version", 99), "newer wsi2dmamba"),
    "foreign file": (_attr("", "format", "something-else"), "not a wsi2dmamba grid file"),
}


@pytest.mark.parametrize("case", sorted(HDF5_CASES))
def test_invalid_grid_file_is_refused_with_its_name(case, tmp_path, counts):
    p = tmp_path / "s1.h5"
    write_feature_grid(p, _grid())
    edit, words = HDF5_CASES[case]
    _edit(p, edit)
    counts("inputs")
    with pytest.raises(GridFileError) as ei:
        read_feature_grid(p)
    words = (words,) if isinstance(words, str) else words
    assert str(p) in str(ei.value) and any(w in str(ei.value) for w in words), str(ei.value)


@pytest.mark.parametrize("how", ["external storage", "external link", "virtual dataset"])
def test_grid_file_pointing_at_other_files_is_refused(how, tmp_path, counts):
    """A dataset whose bytes live in another file (which could be any file the reader may open) is
    refused before anything is read through it."""
    p = tmp_path / "s1.h5"
    g = _grid()
    write_feature_grid(p, g)
    secret = _secret(tmp_path, g.n_tiles * g.feature_dim)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("data", data=np.ones((g.n_tiles, g.feature_dim), np.float32))
    with h5py.File(p, "r+") as f:
        del f["features"]
        if how == "external storage":
            f.create_dataset("features", shape=(g.n_tiles, g.feature_dim), dtype=np.float32,
                             external=[(str(secret), 0, secret.stat().st_size)])
        elif how == "external link":
            f["features"] = h5py.ExternalLink(str(other), "/data")
        else:
            layout = h5py.VirtualLayout(shape=(g.n_tiles, g.feature_dim), dtype=np.float32)
            layout[...] = h5py.VirtualSource(str(other), "data", shape=(g.n_tiles, g.feature_dim))
            f.create_virtual_dataset("features", layout)
    counts("inputs")
    with pytest.raises(GridFileError, match="refusing|not data stored in the file") as ei:
        read_feature_grid(p)
    assert str(p) in str(ei.value)
    assert read_tile_grid(p).n_tiles == g.n_tiles  # the tiles part, stored in the file, still reads


def test_forged_shapes_are_refused_before_reading(tmp_path, counts):
    """A file declaring billions of tiles (a compressed, nearly empty dataset) is refused from its
    metadata, quickly, without allocating the arrays."""
    p = tmp_path / "bomb.h5"
    write_feature_grid(p, _grid())
    n = 2**33
    with h5py.File(p, "r+") as f:
        for name in ("coords", "grid/index"):
            del f[name]
            f.create_dataset(name, shape=(n, 2), dtype=np.int64, chunks=(1 << 16, 2), compression="gzip")
    counts("inputs")
    t = time.perf_counter()
    with pytest.raises(GridFileError, match="cannot hold|shape"):
        read_tile_grid(p)
    assert time.perf_counter() - t < 2.0


def test_imported_file_with_nan_features_is_refused_and_named(tmp_path, counts):
    """A CLAM file with a NaN feature: refused with the file's name; the other files still import."""
    from wsi2dmamba.features.importers import import_features

    src = tmp_path / "clam"
    src.mkdir()
    coords = np.stack(np.meshgrid(np.arange(4) * 512, np.arange(3) * 512), -1).reshape(-1, 2).astype(np.int64)
    for name, bad in (("good", None), ("nan", np.nan), ("inf", np.inf)):
        feats = np.ones((len(coords), 8), np.float32)
        if bad is not None:
            feats[2, 3] = bad
        with h5py.File(src / f"{name}.h5", "w") as f:
            f.create_dataset("features", data=feats)
            f.create_dataset("coords", data=coords)
    counts("inputs", 3)
    summary = import_features(src, tmp_path / "run", "clam", mpp=0.5)
    assert set(summary.written) == {"good"}
    assert set(summary.failed) == {"nan", "inf"}
    for name in ("nan", "inf"):
        assert "NaN or inf" in summary.failed[name] and f"{name}.h5" in summary.failed[name]


def test_imported_file_reading_other_files_is_refused(tmp_path, counts):
    """A CLAM/TRIDENT file whose features are stored in another file (external storage) must not be
    imported: it would copy that file's bytes into the run."""
    from wsi2dmamba.features.importers import import_feature_file

    coords = np.stack(np.meshgrid(np.arange(4) * 512, np.arange(3) * 512), -1).reshape(-1, 2).astype(np.int64)
    secret = _secret(tmp_path, len(coords) * 8)
    p = tmp_path / "ext.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("features", shape=(len(coords), 8), dtype=np.float32,
                         external=[(str(secret), 0, secret.stat().st_size)])
        f.create_dataset("coords", data=coords)
    counts("inputs")
    with pytest.raises(GridFileError, match="ext.h5"):
        import_feature_file(p, "clam", mpp=0.5)


# ------------------------------------------------------------------------------------------- manifest paths

HOSTILE = ["--help", "-rf", "; rm -rf /", "$(touch PWNED)", "`touch PWNED`", "a.svs; touch PWNED",
           "| touch PWNED", "~nosuchuser/x.svs", "${HOME}/x.svs", "*.svs", "a\nb.svs"]


def test_hostile_manifest_paths_are_plain_missing_files(tmp_path, counts, monkeypatch):
    monkeypatch.chdir(tmp_path)
    m = tmp_path / "cohort.csv"
    rows = ["slide_id,path"] + [f's{i},"{p}"' for i, p in enumerate(HOSTILE)]
    m.write_text("\n".join(rows) + "\n")
    counts("inputs", len(HOSTILE))
    with pytest.raises(ManifestError) as ei:
        load_cohort(m)
    msg = str(ei.value)
    assert f"{len(HOSTILE)} problem(s)" in msg
    for p in ("--help", "-rf", "; rm -rf /", "$(touch PWNED)"):
        assert f"slide file not found: {tmp_path / p}" in msg, p
    assert not list(tmp_path.rglob("PWNED"))
    cohort = load_cohort(m, check_files=False)
    for rec, text in zip(cohort, HOSTILE):
        assert rec.path.parent == tmp_path or text.startswith("~") or "/" in text, rec.path


def test_hostile_names_run_through_the_cli_as_file_names(tmp_path, counts):
    """Slides really named like options or shell text are processed as files by the real CLI; nothing is
    executed."""
    names = ["--help.svs", "$(touch PWNED).svs", "; touch PWNED.svs"]
    slides = tmp_path / "slides"
    slides.mkdir()
    for n in names:
        os.symlink(SLIDE, slides / n)
    m = tmp_path / "cohort.csv"
    m.write_text("slide_id,path\n" + "".join(f'h{i},"slides/{n}"\n' for i, n in enumerate(names))
                 + "missing,--version\n")
    counts("inputs", len(names) + 1)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "wsi2dmamba", "segment", "--cohort", str(m), "--out", str(run), "-q"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 2, res.stdout + res.stderr
    assert f"slide file not found: {tmp_path / '--version'}" in res.stderr and "Traceback" not in res.stderr
    m.write_text("slide_id,path\n" + "".join(f'h{i},"slides/{n}"\n' for i, n in enumerate(names)))
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "3 done" in res.stdout
    assert not list(tmp_path.rglob("PWNED")) and not (tmp_path / "PWNED").exists()
    assert sorted(p.name for p in (run / "segment").glob("*.geojson")) == ["h0.geojson", "h1.geojson", "h2.geojson"]


def test_slide_ids_cannot_escape_the_run_folder(tmp_path, counts):
    m = tmp_path / "m.csv"
    m.write_text("slide_id,path\n../../evil,x.svs\n..,y.svs\na/b,z.svs\n")
    counts("inputs", 3)
    with pytest.raises(ManifestError) as ei:
        load_cohort(m, check_files=False)
    assert "3 problem(s)" in str(ei.value) and "cannot be used as a file name" in str(ei.value)
