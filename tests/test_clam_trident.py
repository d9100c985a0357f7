"""CLAM and TRIDENT in both directions: our exports checked against the layouts those tools document and
read, and the import options that their files need (per-slide µm/px, overlap step, off-lattice tiles,
slides without tissue, the slide id kept through TRIDENT).

The expectations are written out here from the tools' documentation and published readers, not
taken from their code:

* CLAM (``main.py`` / ``eval.py`` with ``--data_root_dir``): ``pt_files/<slide_id>.pt`` is one tensor
  of shape (N, D) loaded with ``torch.load``; ``h5_files/<slide_id>.h5`` holds ``features`` (N, D) and
  ``coords`` (N, 2) level-0 corners; the dataset csv has the columns ``case_id, slide_id, label`` and
  ``slide_id`` is the file name without extension. ``Whole_Slide_Bag_FP`` reads the ``coords``
  attributes ``patch_level`` and ``patch_size`` and reads ``patch_size`` pixels at ``patch_level`` from
  each corner (then resizes to ``target_patch_size`` if given).
* TRIDENT: ``features_<encoder>/<slide>.h5`` holds ``features`` (N, D) and ``coords`` (N, 2); its
  ``read_coords`` takes ``patch_size`` and ``patch_size_level0`` from the ``coords`` attributes; the
  footprint is ``patch_size · level0_magnification / target_magnification`` level-0 pixels.
"""

from __future__ import annotations

import csv
from dataclasses import replace

import h5py
import numpy as np
import pytest
import torch
from training_data import base_grid, make_cohort
from typer.testing import CliRunner

from wsi2dmamba.cli import app
from wsi2dmamba.errors import GridFileError
from wsi2dmamba.features import feature_path
from wsi2dmamba.features.exporters import export_features
from wsi2dmamba.features.importers import import_feature_file, import_features
from wsi2dmamba.grid import read_feature_grid, write_feature_grid


@pytest.fixture(scope="module")
def cohort_run(tmp_path_factory):
    """A run with real-slide feature grids of 8 patients (features/colour-stats) and its manifest."""
    folder = tmp_path_factory.mktemp("export")
    manifest, feat_dir = make_cohort(folder, n_patients=8, seed=3)
    return folder, manifest, feat_dir


def resized(grid, slide_id):
    """The grid as tiles of 100 px resized from 128 level-0 px (no pyramid level matches)."""
    return replace(grid, slide_id=slide_id, tile_px=100, stride_px=100,
                   mpp_requested=grid.mpp_level0 * 1.28, mpp_effective=grid.mpp_level0 * 1.28)


def test_clam_export_matches_clams_layout(cohort_run, tmp_path):
    folder, manifest, feat_dir = cohort_run
    write_feature_grid(feat_dir / "R_resized.h5", resized(read_feature_grid(next(feat_dir.glob("P*.h5"))),
                                                          "R_resized"))
    try:
        res = CliRunner().invoke(app, ["export-features", "--format", "clam", str(folder), "--out",
                                       str(tmp_path / "clam"), "--cohort", str(manifest), "-q"])
    finally:
        (feat_dir / "R_resized.h5").unlink()
    assert res.exit_code == 0, res.output
    out = tmp_path / "clam"
    rows = list(csv.DictReader(open(out / "slides.csv")))
    labels = {r["slide_id"]: r for r in csv.DictReader(open(manifest))}
    assert list(rows[0]) == ["case_id", "slide_id", "label"] and len(rows) == len(labels) == 8
    for row in rows:
        sid = row["slide_id"]
        assert row["case_id"] == labels[sid]["patient_id"] and row["label"] == labels[sid]["label"] != ""
        ours = read_feature_grid(feat_dir / f"{sid}.h5")
        pt = torch.load(out / "pt_files" / f"{sid}.pt", weights_only=True)
        assert isinstance(pt, torch.Tensor) and pt.dtype == torch.float32 and pt.shape == ours.features.shape
        with h5py.File(out / "h5_files" / f"{sid}.h5", "r") as f:
            assert f["features"].ndim == 2 and f["features"].dtype.kind == "f"
            assert f["coords"].shape == (ours.n_tiles, 2) and f["coords"].dtype.kind == "i"
            np.testing.assert_array_equal(f["features"][:], pt.numpy())
            np.testing.assert_array_equal(f["coords"][:], ours.coords)
            level, size = int(f["coords"].attrs["patch_level"]), int(f["coords"].attrs["patch_size"])
        assert (level, size) == (0, 128)  # native level 0 tiles
    assert "R_resized" not in {r["slide_id"] for r in rows}  # not in the cohort: not exported


def test_clam_attributes_of_resized_tiles_read_the_same_field_of_view(cohort_run, tmp_path):
    _, _, feat_dir = cohort_run
    grid = resized(read_feature_grid(next(feat_dir.glob("P*.h5"))), "R1")
    run = tmp_path / "run"
    write_feature_grid(feature_path(run, "colour-stats", "R1"), grid)
    # Our own file says which readers can use it (CLAM's needs a native level).
    with h5py.File(feature_path(run, "colour-stats", "R1"), "r") as f:
        assert "patch_level" not in f["coords"].attrs and "CLAM" in f["coords"].attrs["readers"]
    summary = export_features(run, tmp_path / "clam", "clam", progress=False)
    assert summary.written == ["R1"] and "no --cohort" in summary.notes[0]
    with h5py.File(tmp_path / "clam" / "h5_files" / "R1.h5", "r") as f:
        a = f["coords"].attrs
        # Whole_Slide_Bag_FP reads patch_size px at patch_level: 128 level-0 px, resized to 100.
        assert int(a["patch_level"]) == 0 and int(a["patch_size"]) == 128 and int(a["target_patch_size"]) == 100
        assert np.asarray(a["downsample"]).tolist() == [1.0, 1.0]
    rows = list(csv.DictReader(open(tmp_path / "clam" / "slides.csv")))
    assert rows == [{"case_id": "R1", "slide_id": "R1", "label": ""}]


def test_trident_export_matches_tridents_layout_and_keeps_the_slide_id(cohort_run, tmp_path):
    folder, manifest, feat_dir = cohort_run
    summary = export_features(folder, tmp_path / "trident", "trident", progress=False)
    assert len(summary.written) == 8 and not summary.failed
    files = sorted((tmp_path / "trident" / "features_colour-stats").glob("*.h5"))
    assert len(files) == 8
    for p in files:
        ours = read_feature_grid(feat_dir / p.name)
        with h5py.File(p, "r") as f:
            a = f["coords"].attrs
            assert f["features"].shape == ours.features.shape and f["coords"].shape == (ours.n_tiles, 2)
            footprint = float(a["patch_size"]) * float(a["level0_magnification"]) / float(a["target_magnification"])
            assert footprint == pytest.approx(ours.tile_size_level0) and int(a["patch_size_level0"]) == 128
            assert int(a["overlap"]) == 0
    # TRIDENT names its outputs by the slide file's stem: the slide id comes back from the attribute.
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for i, p in enumerate(files):
        p.rename(renamed / f"scan-{i:02d}.h5")
    back = import_features(renamed, tmp_path / "run", "trident", progress=False)
    assert sorted(back.written) == sorted(p.stem for p in files) and not back.failed and not back.warnings
    sid = files[0].stem
    again = read_feature_grid(back.written[sid])
    ours = read_feature_grid(feat_dir / f"{sid}.h5")
    np.testing.assert_array_equal(again.features, ours.features)
    np.testing.assert_array_equal(again.index, ours.index - ours.index.min(axis=0))


# ----------------------------------------------------------------------------- import options

def write_clam_h5(path, coords, feats):
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=feats.astype(np.float32))
        f.create_dataset("coords", data=np.asarray(coords, np.int32))


def write_patch_file(path, coords, patch_size):
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        c = f.create_dataset("coords", data=np.asarray(coords, np.int64))
        c.attrs["patch_size"] = patch_size
        c.attrs["patch_level"] = 0
        c.attrs["downsample"] = np.array([1.0, 1.0])


def test_per_slide_mpp_from_the_cohort(tmp_path):
    g = base_grid()
    for sid in ("a", "b"):
        write_clam_h5(tmp_path / "h5" / f"{sid}.h5", g.coords, g.features)
    manifest = tmp_path / "m.csv"
    manifest.write_text("slide_id,patient_id,mpp\na,p1,0.25\nb,p2,0.5\n")
    res = CliRunner().invoke(app, ["import-features", str(tmp_path / "h5"), "--out", str(tmp_path / "run"),
                                   "--format", "clam", "--cohort", str(manifest), "-q"])
    assert res.exit_code == 0, res.output
    mpps = {s: read_feature_grid(feature_path(tmp_path / "run", "clam-import", s)).mpp_level0 for s in "ab"}
    assert mpps == {"a": 0.25, "b": 0.5}
    # Without a cohort and without --slide-mpp, CLAM files cannot be imported.
    res = CliRunner().invoke(app, ["import-features", str(tmp_path / "h5"), "--out", str(tmp_path / "r2"),
                                   "--format", "clam", "-q"])
    assert res.exit_code == 1 and "--slide-mpp" in res.output


def test_step_of_clam_patches_made_with_overlap(tmp_path):
    # 256-px patches every 128 px (CLAM's 50 % overlap): a lattice of stride 128.
    rng = np.random.default_rng(0)
    cells = np.array([(r, c) for r in range(4) for c in range(5) if rng.random() < 0.8])
    coords = cells[:, ::-1] * 128 + np.array([1000, 2000])
    feats = rng.normal(size=(len(cells), 8))
    write_clam_h5(tmp_path / "h5" / "s.h5", coords, feats)
    write_patch_file(tmp_path / "patches" / "s.h5", coords, 256)
    kw = dict(mpp=0.5, coords_file=tmp_path / "patches" / "s.h5")
    with pytest.raises(GridFileError, match="share a grid cell|off one lattice"):
        import_feature_file(tmp_path / "h5" / "s.h5", "clam", **kw)  # step taken for the patch size
    g = import_feature_file(tmp_path / "h5" / "s.h5", "clam", step=128, **kw)
    assert g.stride_level0 == 128 and g.tile_size_level0 == 256 and g.stride_px == 128
    np.testing.assert_array_equal(g.index, cells[np.lexsort((cells[:, 1], cells[:, 0]))] - cells.min(axis=0))


@pytest.mark.parametrize("shift, max_offset, outcome", [(8, 0.1, "warned"), (45, 0.1, "refused"),
                                                        (45, 0.4, "warned")])
def test_off_lattice_tiles_are_reported_and_refused_beyond_the_threshold(tmp_path, shift, max_offset, outcome):
    g = base_grid()
    coords = g.coords.copy()
    coords[-3:] += shift  # a second region whose grid does not line up (128-px stride)
    write_clam_h5(tmp_path / "h5" / "cmu.h5", coords, g.features)
    s = import_features(tmp_path / "h5", tmp_path / "run", "clam", mpp=0.5, max_offset=max_offset)
    if outcome == "refused":
        assert not s.written and "slide cmu" in s.failed["cmu"] and f"{shift} level-0 px" in s.failed["cmu"]
        assert "--max-offset" in s.failed["cmu"]
    else:
        assert list(s.written) == ["cmu"] and len(s.warnings) == 1
        assert s.warnings[0].startswith(f"slide cmu: tiles moved up to {shift} level-0 px")


def test_a_trident_slide_without_tissue_is_recorded_as_empty(tmp_path):
    g = base_grid()
    d = tmp_path / "features_uni"
    d.mkdir()
    for sid, n in (("empty", 0), ("full", g.n_tiles)):
        with h5py.File(d / f"{sid}.h5", "w") as f:
            f.create_dataset("features", data=g.features[:n] if n else np.zeros((0,), np.float32))
            c = f.create_dataset("coords", data=g.coords[:n] if n else np.zeros((0, 2), np.int64))
            c.attrs.update({"patch_size": 128, "patch_size_level0": 128, "level0_magnification": 20.0,
                            "target_magnification": 20.0, "overlap": 0})
    res = CliRunner().invoke(app, ["import-features", str(d), "--out", str(tmp_path / "run"), "--format",
                                   "trident"])
    assert res.exit_code == 0, res.output
    assert "1 file(s) written" in res.output and "1 slide(s) without tiles" in res.output
    assert "empty empty: no tiles" in res.output
    assert feature_path(tmp_path / "run", "trident-import", "full").is_file()
    assert not feature_path(tmp_path / "run", "trident-import", "empty").exists()
