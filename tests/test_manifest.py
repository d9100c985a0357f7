"""Cohort manifests driving the slide stages: mpp overrides, kept columns, problems found before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import h5py
import pytest

from wsi2dmamba.cohort import load_cohort
from wsi2dmamba.errors import ManifestError
from wsi2dmamba.tiling import tile_cohort, tile_paths
from wsi2dmamba.tissue import segment_cohort, segment_paths

CLI = [sys.executable, "-m", "wsi2dmamba"]


def write_csv(path, header, rows):
    path.write_text(",".join(header) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


def test_manifest_mpp_override_reaches_the_outputs(tmp_path, shared_data, cmu_slide):
    tcga = shared_data / "slides/aperio_svs/tcga-cr-7395-01a-01-ts1.svs"
    m = write_csv(tmp_path / "m.csv", ["slide_id", "path", "patient_id", "label", "mpp", "site"],
                  [["tcga", tcga, "P1", "LUAD", 0.25, "A"], ["cmu", cmu_slide, "P2", "LUSC", "", "B"]])
    cohort = load_cohort(m)
    assert cohort["cmu"].extra == {"site": "B"} and cohort["tcga"].mpp == 0.25
    run = tmp_path / "run"
    assert segment_cohort(cohort, run, progress=False).ok
    meta = json.loads(segment_paths(run, "tcga")["geojson"].read_text())["wsi2dmamba"]
    assert meta["mpp_level0"] == 0.25 and meta["mpp_source"] == "override"
    assert json.loads(segment_paths(run, "cmu")["geojson"].read_text())["wsi2dmamba"]["mpp_source"] == "metadata"
    s = tile_cohort(cohort, run, progress=False)
    assert s.ok
    with h5py.File(tile_paths(run, "tcga")["h5"], "r") as f:
        assert f.attrs["mpp_level0"] == 0.25 and f.attrs["mpp_source"] == "override"
        # 0.25 µm/px level 0, 0.5 µm/px level 1: level 1 is read as is.
        assert f.attrs["read_level"] == 1 and f["coords"].attrs["patch_size_level0"] == 512

    # A changed override makes that slide (only) be processed again.
    write_csv(m, ["slide_id", "path", "patient_id", "label", "mpp", "site"],
              [["tcga", tcga, "P1", "LUAD", 0.3, "A"], ["cmu", cmu_slide, "P2", "LUSC", "", "B"]])
    again = segment_cohort(load_cohort(m), run, progress=False)
    assert again.done == ["tcga"] and again.skipped == ["cmu"]


def test_relative_paths_are_resolved_against_the_manifest(tmp_path, cmu_slide):
    (tmp_path / "slides").mkdir()
    os.link(cmu_slide, tmp_path / "slides" / "a.svs")
    m = write_csv(tmp_path / "m.csv", ["slide_id", "path"], [["a", "slides/a.svs"]])
    assert load_cohort(m)["a"].path == (tmp_path / "slides" / "a.svs").resolve()


def test_all_manifest_problems_are_reported_before_any_work(tmp_path, cmu_slide):
    m = write_csv(tmp_path / "m.csv", ["slide_id", "path", "mpp"],
                  [["a", cmu_slide, ""], ["a", cmu_slide, ""], ["b", tmp_path / "missing.svs", ""],
                   ["c", cmu_slide, "half"]])
    with pytest.raises(ManifestError) as err:
        load_cohort(m)
    msg = str(err.value)
    assert "duplicate slide_id 'a'" in msg and "missing.svs" in msg and "'mpp' must be a number" in msg
    run = tmp_path / "run"
    p = subprocess.run([*CLI, "segment", "--cohort", str(m), "--out", str(run), "-q"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and "duplicate slide_id" in p.stderr and "Traceback" not in p.stderr
    assert not (run / "segment").exists()  # nothing was started
