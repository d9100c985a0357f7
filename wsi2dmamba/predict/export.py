"""``wsi2dmamba export``: a trained model of a run → a model bundle (see :mod:`.bundle`).

What goes in, and where it is read from:

* each fold's checkpoint chosen on validation (``RUN/train/<name>/fold_<k>/best.safetensors``), copied
  byte for byte, with its sha256;
* the task, classes, survival bins and the risk cut-off of each fold (the median of that fold's
  cross-validated test risks: a cut-off of the training cohort, never of a cohort the bundle is applied to);
* the encoder, its feature dimension and weight hash, µm/px, tile size, overlap and minimum tissue,
  read from the training feature grids (what the model really saw), and the segmentation parameters
  of the run that made them;
* a summary of the training cohort and the cross-validated metrics (patient level, 95% CIs).

Exporting again an unchanged model leaves the bundle as it is, so its identity (the sha256 of
``bundle.json``) stays and ``predict`` resumes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import run_layout as layout
from ..errors import StageInputError, WsiError
from ..fileio import file_sha256, params_hash, temporary_sibling, write_json_atomic
from .bundle import FORMAT_NAME, FORMAT_VERSION, read_manifest

_CV_METRIC_LEVEL = "patient"


def _fold_configs(model_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    from ..evaluation.evaluate import complete_folds

    if not model_dir.is_dir():
        trained = ", ".join(p.parent.name for p in sorted(model_dir.parent.glob(str(layout.fold_dir("*", 0))))) or "none"
        raise StageInputError(f"No trained model {model_dir.name!r} in {model_dir.parent} (trained: {trained}).")
    done = complete_folds(model_dir)
    unfinished = sorted({p.name for p in model_dir.glob(layout.fold_glob())} - {p.name for p in done})
    if not done or unfinished:
        raise StageInputError(f"{model_dir}: fold(s) {', '.join(unfinished) or 'all'} not finished; finish training "
                              "(`wsi2dmamba train` resumes) before exporting the model.")
    return [(d, json.loads(layout.fold_file(d, layout.FOLD_CONFIG).read_text())) for d in done]


def _grid_attrs(path: Path) -> dict[str, Any]:
    import h5py

    with h5py.File(path, "r") as f:
        return {k: (v.decode() if isinstance(v, bytes) else v.item() if hasattr(v, "item") else v)
                for k, v in f.attrs.items()}


def _features_file(cfg: dict[str, Any], run_dir: Path) -> Path:
    sid = cfg["split"]["train"][0]
    for folder in (Path(cfg.get("features_dir") or ""), layout.features_dir(run_dir, cfg.get("features", ""))):
        if str(folder) and layout.grid_file(folder, sid).is_file():
            return layout.grid_file(folder, sid)
    raise StageInputError(f"The feature grid of training slide {sid!r} is gone (looked in {cfg.get('features_dir')}); "
                          "the bundle records the tiling and the encoder from it. Restore the features folder.")


def _tiling(features_file: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """(encoder, tiling, segmentation) of the training features, read from one of their grid files."""
    from ..grid import read_feature_grid

    grid = read_feature_grid(features_file)
    attrs = _grid_attrs(features_file)
    stage_run = features_file.parent.parent.parent  # RUN/features/<encoder>/<slide>.h5 → RUN
    tiles_file = layout.tiles_files(stage_run, features_file.stem)["h5"]
    if tiles_file.is_file() and _grid_attrs(tiles_file).get("params_hash") == attrs.get("tiles_params_hash"):
        # The tiles file the features were made from holds the tiling's provenance (minimum tissue,
        # segmentation hash), which feature files do not copy.
        attrs = {**_grid_attrs(tiles_file), **attrs}
    encoder = {"name": grid.encoder or "unknown", "feature_dim": grid.feature_dim,
               "weights_sha256": grid.weights_sha256, "precision": attrs.get("encoder_precision")}
    tiling = {"mpp": float(grid.mpp_requested), "tile_px": int(grid.tile_px),
              "overlap": int(grid.tile_px - grid.stride_px), "min_tissue": float(attrs.get("min_tissue", 0.25)),
              "mpp_tolerance": 0.02}
    segment = None
    try:
        from ..tissue.stage import read_segment_config, segment_params_hash

        seg = read_segment_config(stage_run)
        if seg is not None and segment_params_hash(seg) == attrs.get("segment_params_hash"):
            segment = seg.model_dump(mode="json")
            tiling["mpp_tolerance"] = _mpp_tolerance(tiling, seg, attrs.get("tiles_params_hash"))
    except (OSError, ValueError):
        segment = None
    return encoder, tiling, segment


def _mpp_tolerance(tiling: dict[str, Any], segment: Any, tiles_hash: str | None) -> float:
    """The tiles' ``mpp_tolerance``: the default unless another value reproduces their parameter hash."""
    from ..cohort.batch import config_hash
    from ..tiling import TileConfig

    fields = {k: tiling[k] for k in ("mpp", "tile_px", "overlap", "min_tissue")}
    for tol in (0.02, 0.0, 0.01, 0.05, 0.1, 0.2):
        if config_hash("tile", TileConfig(**fields, mpp_tolerance=tol, segment=segment)) == tiles_hash:
            return tol
    return 0.02


def _risk_cutoff(fold_dir: Path) -> float:
    """Median cross-validated risk of a fold's test partition (checkpoint chosen on validation)."""
    import pandas as pd

    df = pd.read_csv(layout.fold_file(fold_dir, layout.FOLD_PREDICTIONS))
    test = df[(df["checkpoint"] == "best") & (df["partition"] == "test")]
    return float(np.median(test["risk"].to_numpy(np.float64)))


def _training_summary(folds: list[tuple[Path, dict[str, Any]]], task: str) -> dict[str, Any]:
    import pandas as pd

    frames = [pd.read_csv(layout.fold_file(d, layout.FOLD_PREDICTIONS), dtype={"slide_id": str, "patient_id": str, "label": str})
              for d, _ in folds]
    df = pd.concat(frames)
    test = df[(df["checkpoint"] == "best") & (df["partition"] == "test")]
    split = folds[0][1]["split"]
    out: dict[str, Any] = {"n_slides": sum(len(split[p]) for p in ("train", "val", "test")),
                           "n_patients": int(test["patient_id"].nunique()), "n_folds": len(folds),
                           "features": folds[0][1].get("features", "")}
    if task == "survival":
        out.update(events=int(test["event"].sum()), median_time=float(test["time"].median()))
    else:
        out["class_counts"] = {str(k): int(v) for k, v in test["label"].value_counts().sort_index().items()}
    return out


def _cv_metrics(model_dir: Path) -> dict[str, Any]:
    from ..evaluation.evaluate import evaluate_model

    res = evaluate_model(model_dir, n_boot=1000, seed=0)["results"][_CV_METRIC_LEVEL]["best"]["test"]
    return {"level": _CV_METRIC_LEVEL, "checkpoint": "best", "pooled": res["pooled"], "mean": res["mean"],
            "std": res["std"], "folds": [{k: v for k, v in f.items() if k != "ci"} for f in res["folds"]]}


def build_manifest(run_dir: str | os.PathLike[str], model: str) -> tuple[dict[str, Any], list[Path]]:
    """The manifest of a bundle of ``RUN/train/<model>`` and the weight files it lists (not yet copied)."""
    from .. import __version__
    from ..models.checkpoint import read_checkpoint_config

    run_dir = Path(run_dir).expanduser().resolve()
    model_dir = layout.model_dir(run_dir, model)
    folds = _fold_configs(model_dir)
    first = folds[0][1]
    task = first["task"]
    weights = [layout.checkpoint_file(d, "best") for d, _ in folds]
    config = read_checkpoint_config(weights[0])
    encoder, tiling, segment = _tiling(_features_file(first, run_dir))
    fold_entries = []
    for (d, cfg), w in zip(folds, weights):
        if read_checkpoint_config(w) != config:
            raise StageInputError(f"{w} holds another model configuration than fold {first['fold']}; retrain "
                                  "the model so that every fold is the same model.")
        best = json.loads(layout.checkpoint_sidecar(layout.checkpoint_file(d, "best")).read_text())
        entry = {"fold": int(cfg["fold"]), "file": layout.bundle_fold_file(int(cfg["fold"])),
                 "sha256": file_sha256(w), "checkpoint": "best", "epoch": int(best.get("epoch", 0))}
        if task == "survival":
            entry.update(bin_edges=cfg["bin_edges"], bin_ends=cfg["bin_ends"], risk_cutoff=_risk_cutoff(d))
        fold_entries.append(entry)
    cutoffs = [f["risk_cutoff"] for f in fold_entries if f.get("risk_cutoff") is not None]
    manifest = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "name": model, "software_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": config, "encoder": encoder,
        "tiling": tiling, "segment": segment,
        "task": {"kind": task, "classes": first.get("classes"),
                 "n_bins": first["train"].get("n_bins") if task == "survival" else None},
        "folds": fold_entries, "ensemble": "mean_risk" if task == "survival" else "mean_probability",
        "risk_cutoff": float(np.mean(cutoffs)) if cutoffs else None,
        "training_cohort": _training_summary(folds, task), "cv_metrics": _cv_metrics(model_dir),
    }
    return manifest, weights


def _same_bundle(out: Path, manifest: dict[str, Any]) -> bool:
    """True when ``out`` already holds a valid bundle of exactly this model (``created`` aside)."""
    try:
        read_manifest(out)
        old = json.loads(layout.bundle_manifest(out).read_text(encoding="utf-8"))
    except (WsiError, OSError, ValueError):  # not a bundle, damaged, another version: it is replaced
        return False
    new = json.loads(json.dumps(manifest))
    return params_hash({**old, "created": ""}) == params_hash({**new, "created": ""}) and all(
        (out / f["file"]).is_file() and file_sha256(out / f["file"]) == f["sha256"] for f in manifest["folds"])


def export_bundle(run_dir: str | os.PathLike[str], model: str, out: str | os.PathLike[str] | None = None) -> Path:
    """Write the bundle of ``RUN/train/<model>`` to ``out`` (default ``RUN/bundles/<model>``); return its folder.

    The bundle is assembled in a temporary folder beside ``out`` and moved into place, so a stopped
    export leaves either the old bundle or the new one. An unchanged model leaves ``out`` untouched.

    Raises:
        StageInputError: the model does not exist, a fold is unfinished, or its features are gone.
    """
    from .bundle import validate

    run_dir = Path(run_dir).expanduser()
    out = Path(out).expanduser() if out is not None else layout.bundle_dir(run_dir, model)
    manifest, weights = build_manifest(run_dir, model)
    if _same_bundle(out, manifest):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(out, "bundle")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for f, w in zip(manifest["folds"], weights):
        shutil.copyfile(w, tmp / f["file"])
    write_json_atomic(layout.bundle_manifest(tmp), manifest)
    validate(tmp)  # the bundle written is one the reader accepts
    old = temporary_sibling(out, "old")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out
