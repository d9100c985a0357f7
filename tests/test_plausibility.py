"""No silent nonsense: a one-class cohort, absurd resolutions, duplicated or ragged manifest columns, and
pipeline options that can only fail late are refused (or reported as undefined, with the reason) before
any work is done."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from training_data import make_cohort as make_training_cohort

from wsi2dmamba.cohort import Cohort, load_cohort
from wsi2dmamba.errors import ConfigError, ManifestError, SlideError, WeightsError

pytest_plugins = ["conftest_reliability"]

SLIDE = Path(__file__).parent / "data" / "CMU-1-Small-Region.svs"


# ------------------------------------------------------------------------------------------- one class

def test_one_class_cohort_is_refused_before_training(tmp_path, counts):
    import pandas as pd

    from wsi2dmamba.training import TrainConfig, train_cohort

    manifest, features = make_training_cohort(tmp_path / "c", n_patients=6, seed=1)
    df = pd.read_csv(manifest)
    df["label"] = "tumour"
    df.to_csv(manifest, index=False)
    counts("inputs")
    with pytest.raises(ConfigError, match=r"cohort\.csv: the 'label' column holds 1 class \('tumour'\).*two classes"):
        train_cohort(load_cohort(manifest, require_path=False), features, tmp_path / "run", "meanpool",
                     TrainConfig(folds=2, epochs=1, device="cpu"), {"hidden": 8}, progress=False)
    assert not (tmp_path / "run" / "train" / "meanpool").exists()


def test_undefined_auc_is_reported_with_its_reason_and_no_library_warning(counts):
    from wsi2dmamba.evaluation import format_summary
    from wsi2dmamba.evaluation.metrics import classification_metrics

    y = np.zeros(6, np.int64)
    probs = np.tile([0.9, 0.1], (6, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scikit-learn's own warnings must not reach the user
        m = classification_metrics(y, probs)
    counts("inputs")
    assert math.isnan(m["auc"]) and m["notes"] == ["AUC undefined: only one class present"]
    entry = {"folds": [{"fold": 0, **m}], "mean": {k: (None if k == "auc" else m[k]) for k in
                                                  ("auc", "balanced_accuracy", "accuracy", "f1")},
             "std": dict.fromkeys(("auc", "balanced_accuracy", "accuracy", "f1")),
             "pooled": {**{k: (None if k == "auc" else m[k]) for k in ("auc", "balanced_accuracy", "accuracy", "f1")},
                        "ci": {}, "notes": m["notes"]}}
    metrics = {"models": {"abmil": {"task": "classification",
                                    "results": {"patient": {"best": {"test": entry}, "last": {}}}}}}
    text = format_summary(metrics, "patient")
    assert "auc undefined (only one class present)" in text, text


# ------------------------------------------------------------------------------------------- resolutions

ABSURD_MPP = ["1e300", "1e-300", "0", "-0.5", "nan", "inf", "0.001", "1000"]


@pytest.mark.parametrize("mpp", ABSURD_MPP)
def test_absurd_mpp_in_a_manifest_is_refused_with_its_line(tmp_path, mpp, counts):
    m = tmp_path / "m.csv"
    m.write_text(f"slide_id,path,mpp\na,a.svs,0.5\nb,b.svs,{mpp}\n")
    counts("inputs")
    with pytest.raises(ManifestError, match=r"line 3: column 'mpp'"):
        load_cohort(m, check_files=False)


@pytest.mark.parametrize("mpp", [1e300, 1e-300, 0.0, -1.0, float("nan"), float("inf")])
def test_absurd_mpp_is_refused_wherever_it_is_given(tmp_path, mpp, counts):
    """--slide-mpp, a slide's metadata, the tile and segmentation resolutions: one clear error each."""
    from pydantic import ValidationError

    from wsi2dmamba.slide import Resolution, resolve_mpp
    from wsi2dmamba.tiling import TileConfig
    from wsi2dmamba.tissue.config import SegmentConfig

    counts("inputs", 4)
    with pytest.raises(ManifestError, match="--slide-mpp"):
        Cohort.from_paths([SLIDE], mpp=mpp)
    with pytest.raises(SlideError, match=r"s\.svs: the resolution in the slide's metadata is implausible"):
        resolve_mpp(None, Resolution(mpp, "metadata"), path="s.svs")
    with pytest.raises(SlideError, match=r"s\.svs: the given mpp"):
        resolve_mpp(mpp, None, path="s.svs")
    with pytest.raises(ValidationError):
        TileConfig(mpp=mpp)
    with pytest.raises(ValidationError):
        SegmentConfig(seg_mpp=mpp)


def test_absurd_mpp_on_the_command_line_is_one_clear_error(tmp_path, monkeypatch, capsys, counts):
    from wsi2dmamba.cli import main

    os.symlink(SLIDE, tmp_path / "a.svs")
    for args in (["segment", str(tmp_path / "a.svs"), "--slide-mpp", "1e300"],
                 ["tile", str(tmp_path / "a.svs"), "--mpp", "1e-300"],
                 ["segment", str(tmp_path / "a.svs"), "--seg-mpp", "1e300"]):
        monkeypatch.setattr("sys.argv", ["wsi2dmamba", *args, "--out", str(tmp_path / "run")])
        with pytest.raises(SystemExit) as exc:
            main()
        err = capsys.readouterr().err
        counts("inputs")
        assert exc.value.code == 2 and "mpp" in err and "Traceback" not in err, err
    assert not (tmp_path / "run" / "segment" / ".state").exists()


# ------------------------------------------------------------------------------------------- manifest shape

@pytest.mark.parametrize("header", ["slide_id,path,label,label", "slide_id,path,slide_id", "slide_id, path,path "])
def test_duplicated_manifest_column_is_refused(tmp_path, header, counts):
    m = tmp_path / "m.csv"
    width = len(header.split(","))
    m.write_text(header + "\n" + ",".join(["a", "a.svs", "x", "y"][:width]) + "\n")
    counts("inputs")
    with pytest.raises(ManifestError, match=r"m\.csv: column\(s\) .* appear more than once in the header"):
        load_cohort(m, check_files=False)


@pytest.mark.parametrize("rows,line,cells", [
    ("a,a.svs,x\nb,b.svs,y,extra\n", 3, 4),    # one cell too many: used to shift every column silently
    ("a,a.svs,x,1\nb,b.svs,y,2\n", 2, 4),      # every row one too many: used to become the index
    ("a,a.svs,x\nb,b.svs\n", 3, 2),            # one cell missing
    ("a,a.svs,x\n\nb\n", 4, 1),                # blank lines are skipped, the line number stays right
])
def test_ragged_rows_are_refused_with_line_and_counts(tmp_path, rows, line, cells, counts):
    m = tmp_path / "m.csv"
    m.write_text("slide_id,path,label\n" + rows)
    counts("inputs")
    with pytest.raises(ManifestError, match=rf"m\.csv, line {line}: {cells} cell\(s\), but the header has 3 column"):
        load_cohort(m, check_files=False)


def test_trailing_separators_of_spreadsheets_are_accepted(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("slide_id,path,label,,\na,a.svs,x,,\nb,b.svs,y\n")
    cohort = load_cohort(m, check_files=False)
    assert [(r.slide_id, r.label) for r in cohort] == [("a", "x"), ("b", "y")]


# ------------------------------------------------------------------------------------------- `run` checks first

@pytest.mark.parametrize("table,key,value,error", [
    ("extract", "encoder", '"no-such-encoder"', ConfigError),
    ("extract", "device", '"cuda:7"', ConfigError),
    ("extract", "device", '"tpu"', ConfigError),
    ("train", "device", '"cuda:7"', ConfigError),
    ("extract", "weights", '"missing-weights.pth"', WeightsError),
])
def test_run_checks_every_stage_option_before_any_work(tmp_path, table, key, value, error, counts):
    """An unknown encoder, an unusable device or a missing weight file is refused before segmenting
    (it used to surface after the whole cohort was segmented and tiled)."""
    import torch

    from wsi2dmamba.pipeline import load_pipeline, run_pipeline

    if "cuda" in value and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    os.symlink(SLIDE, tmp_path / "a.svs")
    (tmp_path / "m.csv").write_text("slide_id,path,label\na,a.svs,x\n")
    extra = {"extract": "", "train": ""}
    extra[table] = f"{key} = {value}\n"
    (tmp_path / "p.toml").write_text(f'[cohort]\nmanifest = "m.csv"\n[extract]\n{extra["extract"]}'
                                     f'[train]\nmodels = ["abmil"]\n{extra["train"]}')
    counts("inputs")
    with pytest.raises(error, match=rf"p\.toml: \[{table}\] {key}: .*Nothing was run"):
        run_pipeline(load_pipeline(tmp_path / "p.toml", out=tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("model,preset,overrides,match", [
    ("no-such-model", None, {}, "no-such-model"), ("abmil", "no-such-preset", {}, "no preset"),
    ("abmil", None, {"hidden": "big"}, "hidden"),
])
def test_train_checks_the_model_before_writing_anything(tmp_path, model, preset, overrides, match, counts):
    from wsi2dmamba.training import TrainConfig, train_cohort

    manifest, features = make_training_cohort(tmp_path / "c", n_patients=6, seed=1)
    counts("inputs")
    with pytest.raises(ConfigError, match=match):
        train_cohort(load_cohort(manifest, require_path=False), features, tmp_path / "run", model,
                     TrainConfig(folds=2, epochs=1, device="cpu"), overrides, preset=preset, progress=False)
    assert not (tmp_path / "run" / "train" / "splits").exists()
