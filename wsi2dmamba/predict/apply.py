"""``wsi2dmamba predict``: apply a model bundle to the slides of a cohort.

Raw slides go through segment → tile → extract with the bundle's recorded parameters (slides already
done in the run folder with those parameters are skipped), then every fold model and their ensemble are
applied to each slide's feature grid as a per-slide stage: resumable, recorded in the ledger, a failing
slide recorded and the batch going on. Layout below the output run folder ``RUN2``::

    RUN2/segment, tiles, features/<encoder>     the per-slide stages, as for training
    RUN2/predictions/<model>/<slide_id>.json     one slide's fold and ensemble outputs (+ .state/)
    RUN2/predictions/<model>/heatmaps/           with heatmaps: <slide_id>.png and .geojson (QuPath)
    RUN2/predictions/<model>.csv                 one row per slide (ensemble and every fold)
    RUN2/predictions/<model>.patients.csv        one row per patient (mean over the patient's slides)
    RUN2/predict.json                            the bundles applied (with their manifests) and the cohort

The tables are rebuilt from the per-slide files after every run, sorted by slide and patient, so a run
that was stopped and resumed writes the same bytes as one that was not.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from .. import run_layout as layout
from ..cohort import Cohort, RunOptions, SlideRecord, StageSummary, run_stage
from ..errors import ConfigError, StageInputError
from ..fileio import write_json_atomic, write_text_atomic
from .bundle import DEFAULT_MPP_TOLERANCE, Bundle, grid_mismatches, load_bundle



class PredictStageConfig(BaseModel):
    """What a slide's prediction depends on (hashed: another bundle or features source redoes the slides)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    bundle_sha256: str
    features: str
    heatmaps: bool = False
    mpp_tolerance: float = DEFAULT_MPP_TOLERANCE


@dataclass
class PredictResult:
    """What :func:`predict_cohort` did.

    Attributes:
        out: the run folder of the predictions.
        bundle: the bundle applied.
        features_dir: the feature grids used.
        stages: summaries of segment, tile, extract (when run) and predict.
        slides_csv, patients_csv: the prediction tables.
        failed: slide id → stage and reason, for slides left out.
        notes: things the user should know (e.g. no heatmaps for a model without attention).
    """

    out: Path
    bundle: Bundle
    features_dir: Path
    stages: dict[str, StageSummary] = field(default_factory=dict)
    slides_csv: Path | None = None
    patients_csv: Path | None = None
    failed: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def slide_output(run_dir: Path, model: str, slide_id: str) -> Path:
    return layout.prediction_file(run_dir, model, slide_id)


def heatmap_outputs(run_dir: Path, model: str, slide_id: str) -> tuple[Path, Path]:
    names = layout.heatmap_files(layout.prediction_heatmaps_dir(run_dir, model), slide_id)
    return names["png"], names["geojson"]


def _outputs(record: SlideRecord, run_dir: Path, *, config: PredictStageConfig) -> list[Path]:
    outs = [slide_output(run_dir, config.model, record.slide_id)]
    if config.heatmaps:
        outs += list(heatmap_outputs(run_dir, config.model, record.slide_id))
    return outs


def _fingerprint(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _json_ready(values: np.ndarray | None) -> Any:
    return None if values is None else np.asarray(values, np.float64).tolist()


def predict_slide(record: SlideRecord, config: PredictStageConfig, run_dir: Path, *, bundle: Bundle,
                  features_dir: Path, thumbnail_px: int = 1024) -> dict:
    """Work function of the predict stage: one slide's feature grid → its prediction file (and heatmap)."""
    from ..grid import read_feature_grid

    path = layout.grid_file(features_dir, record.slide_id)
    if not path.is_file():
        raise StageInputError(f"No feature grid for slide {record.slide_id!r} in {features_dir}; extract it first "
                              "(or run `wsi2dmamba predict` without --features).")
    grid = read_feature_grid(path)
    bundle.check_grid(grid, str(path), config.mpp_tolerance)
    pred = bundle.predict(grid, check=False)
    data = {"slide_id": record.slide_id, "model": config.model, "bundle_sha256": config.bundle_sha256,
            "features": {"path": str(path), **_fingerprint(path)}, "n_tiles": int(grid.n_tiles),
            "task": pred.task, "probs": _json_ready(pred.probs), "fold_probs": _json_ready(pred.fold_probs),
            "risk": pred.risk, "fold_risk": _json_ready(pred.fold_risk)}
    if config.heatmaps:
        _write_heatmap(record, grid, pred.attention, run_dir, config.model, thumbnail_px)
    write_json_atomic(slide_output(run_dir, config.model, record.slide_id), data)
    return {"n_tiles": int(grid.n_tiles)}


def _write_heatmap(record: SlideRecord, grid: Any, attention: np.ndarray | None, run_dir: Path, model: str,
                   thumbnail_px: int) -> None:
    from PIL import Image

    from ..fileio import atomic_path
    from ..heatmaps.attention import draw_scores, geojson_tiles
    from ..heatmaps.figures import HeatmapStyle, scale_scores

    if attention is None:
        raise ConfigError(f"model {model!r} has no attention map; predict without --heatmaps.")
    png, geo = heatmap_outputs(run_dir, model, record.slide_id)
    write_text_atomic(geo, json.dumps(geojson_tiles(grid, attention, model)))
    slide_path = record.path or (Path(grid.slide_path) if grid.slide_path else None)
    w0, h0 = grid.level0_size
    if slide_path is not None and Path(slide_path).exists():
        from ..slide import open_slide

        with open_slide(slide_path, mpp_override=record.mpp) as slide:
            thumb = slide.thumbnail(thumbnail_px)
    else:  # features imported without their slide: the attention on a blank background
        scale = max(w0, h0) / thumbnail_px
        thumb = np.full((max(1, round(h0 / scale)), max(1, round(w0 / scale)), 3), 255, np.uint8)
    style = HeatmapStyle()
    unit, _ = scale_scores(attention, style)
    img = draw_scores(thumb, w0 / thumb.shape[1], grid, unit, style)
    with atomic_path(png) as tmp:
        Image.fromarray(img).save(tmp, format="PNG")


# ------------------------------------------------------------------------------------ checks before a run

def _grid_header(path: Path) -> Any:
    """The attributes of a feature grid file that a bundle is checked against (no features read)."""
    from types import SimpleNamespace

    import h5py

    def text(v: Any) -> str:
        return v.decode() if isinstance(v, bytes) else str(v)

    try:
        with h5py.File(path, "r") as f:
            a = f.attrs
            dim = int(a["feature_dim"]) if "feature_dim" in a else int(f["features"].shape[1])
            return SimpleNamespace(slide_id=path.stem, encoder=text(a.get("encoder", "")),
                                   weights_sha256=text(a.get("weights_sha256", "")), feature_dim=dim,
                                   mpp_effective=float(a["mpp_effective"]))
    except (OSError, KeyError, ValueError, IndexError):
        return None  # unreadable: the slide fails in the stage with the reader's message


def check_features(bundle: Bundle, cohort: Cohort, features_dir: Path, mpp_tolerance: float) -> None:
    """Refuse, before any slide is done, feature grids made otherwise than the bundle's model needs."""
    bad = []
    for rec in cohort:
        header = _grid_header(layout.grid_file(features_dir, rec.slide_id))
        if header is not None:
            problems = grid_mismatches(bundle.manifest, header, mpp_tolerance)
            if problems:
                bad.append(f"{rec.slide_id}: {'; '.join(problems)}")
    if bad:
        more = f" (and {len(bad) - 5} more slides)" if len(bad) > 5 else ""
        raise ConfigError(f"The feature grids in {features_dir} do not fit the bundle {bundle.path.name!r}: "
                          f"{' | '.join(bad[:5])}{more}. Make the features the way the model was trained: "
                          f"{bundle.recipe()}.")


def drop_stale_predictions(cohort: Cohort, run_dir: Path, model: str, features_dir: Path) -> list[str]:
    """Delete slide predictions whose feature grid changed since (or is gone), so they are made again."""
    stale = []
    for rec in cohort:
        out = slide_output(run_dir, model, rec.slide_id)
        if not out.is_file():
            continue
        feats = layout.grid_file(features_dir, rec.slide_id)
        try:
            recorded = json.loads(out.read_text(encoding="utf-8")).get("features", {})
            current = {"path": str(feats), **_fingerprint(feats)}
        except (OSError, ValueError, AttributeError):
            recorded, current = None, {}
        if recorded != current:
            out.unlink(missing_ok=True)
            stale.append(rec.slide_id)
    return stale


# ------------------------------------------------------------------------------------------- raw slides

def _stage_configs(bundle: Bundle, cohort: Cohort, device: str) -> tuple[Any, Any, Any, Any]:
    """(segment, tile, extract configurations, loaded encoder) of the bundle; refused when the slides or the
    encoder weights at hand cannot make the features the bundle's model needs."""
    from ..features import ExtractConfig, load_encoder
    from ..tiling import TileConfig
    from ..tissue.config import SegmentConfig

    m = bundle.manifest
    if m.segment is None:
        raise ConfigError(f"The bundle {bundle.path} records no segmentation parameters (its model was trained on "
                          "imported features), so it cannot segment and tile raw slides the same way. Make the "
                          "features as the training features were made and pass them with --features DIR.")
    missing = [r.slide_id for r in cohort if r.path is None]
    if missing:
        raise ConfigError(f"{len(missing)} slide(s) have no path in the manifest (e.g. {missing[0]}); predicting from "
                          "raw slides reads them. Give the 'path' column, or pass existing features with --features.")
    seg = SegmentConfig(**m.segment)
    tile = TileConfig(**m.tiling.model_dump(), segment=seg)
    encoder = load_encoder(m.encoder.name, device=device,
                           precision=(m.encoder.precision or None) if device.startswith("cuda") else "fp32")
    if m.encoder.weights_sha256 and encoder.weights_sha256 != m.encoder.weights_sha256:
        raise ConfigError(f"The weights of encoder {m.encoder.name!r} found here (sha256 {encoder.weights_sha256[:12]}…) "
                          f"are not those the bundle's model was trained with ({m.encoder.weights_sha256[:12]}…). "
                          "Install the same encoder weights (see `wsi2dmamba encoders`).")
    return seg, tile, ExtractConfig(encoder=m.encoder.name, device=device), encoder


def _slide_stages(bundle: Bundle, cohort: Cohort, out: Path, *, device: str, options: RunOptions,
                  result: PredictResult) -> tuple[Cohort, Path]:
    """segment → tile → extract with the bundle's parameters; returns the slides left and their features."""
    from ..features import extract_cohort
    from ..features.extract import encoder_dirname
    from ..tiling import tile_cohort
    from ..tissue.stage import segment_cohort

    seg, tile, extract, encoder = _stage_configs(bundle, cohort, device)
    steps = (("segment", lambda c: segment_cohort(c, out, seg, options)),
             ("tile", lambda c: tile_cohort(c, out, tile, options)),
             ("extract", lambda c: extract_cohort(c, out, extract, RunOptions.of(options, workers=1), encoder=encoder)))
    for name, run in steps:
        summary = run(cohort)
        result.stages[name] = summary
        result.failed.update({sid: f"{name}: {why}" for sid, why in summary.failed.items()})
        cohort = Cohort(tuple(r for r in cohort if r.slide_id not in summary.failed), cohort.source)
        if len(cohort) == 0:
            raise StageInputError(f"Every slide failed the {name} stage; see {layout.ledger(out)}.")
    return cohort, layout.features_dir(out, encoder_dirname(extract.encoder))


# ------------------------------------------------------------------------------------------------ tables

def _slide_row(bundle: Bundle, rec: SlideRecord, data: dict[str, Any]) -> dict[str, Any]:
    """One slide's row: its known outcome, the ensemble and every fold's output."""
    row: dict[str, Any] = {"slide_id": rec.slide_id, "patient_id": rec.patient_id}
    folds = bundle.manifest.folds
    if bundle.task == "survival":
        if rec.time is not None and rec.event is not None:
            row.update(time=rec.time, event=rec.event)
        row["risk"] = data["risk"]
        row.update({f"fold{f.fold}_risk": v for f, v in zip(folds, data["fold_risk"])})
        return row
    return {**row, **_class_columns(bundle, rec, data)}


def _class_columns(bundle: Bundle, rec: SlideRecord, data: dict[str, Any]) -> dict[str, Any]:
    classes = bundle.classes or []
    row: dict[str, Any] = {}
    if rec.label is not None:
        row.update(label=rec.label, target=classes.index(rec.label) if rec.label in classes else "")
    row.update({f"prob_{k}": v for k, v in enumerate(data["probs"])})
    for f, probs in zip(bundle.manifest.folds, data["fold_probs"]):
        row.update({f"fold{f.fold}_prob_{k}": v for k, v in enumerate(probs)})
    return row


def _slide_rows(bundle: Bundle, cohort: Cohort, out: Path) -> list[dict[str, Any]]:
    rows = []
    for rec in sorted(cohort, key=lambda r: r.slide_id):
        p = slide_output(out, bundle.name, rec.slide_id)
        if p.is_file():
            rows.append(_slide_row(bundle, rec, json.loads(p.read_text(encoding="utf-8"))))
    return rows


def _decide(df: Any, bundle: Bundle) -> Any:
    """Add the predicted class, or the risk group of the training cohort's cut-off."""
    if bundle.task == "survival":
        cut = bundle.manifest.risk_cutoff
        df["risk_group"] = np.where(df["risk"] > cut, "high", "low") if cut is not None else ""
    else:
        probs = df[[f"prob_{k}" for k in range(len(bundle.classes or []))]].to_numpy()
        df["pred"] = probs.argmax(axis=1)
        df["pred_label"] = [bundle.classes[i] for i in df["pred"]]
    return df


def write_tables(bundle: Bundle, cohort: Cohort, out: Path) -> tuple[Path, Path]:
    """Rebuild ``predictions/<model>.csv`` and ``.patients.csv`` from the per-slide files."""
    import pandas as pd

    rows = _slide_rows(bundle, cohort, out)
    slides = pd.DataFrame(rows)
    if slides.empty:
        raise StageInputError(f"No slide could be predicted; see {layout.ledger(out)} for the reasons.")
    slides = _decide(slides, bundle)
    values = [c for c in slides.columns if c.startswith(("prob_", "fold")) or c == "risk"]
    first = [c for c in ("time", "event", "label", "target") if c in slides.columns]
    agg = {**dict.fromkeys(values, "mean"), **dict.fromkeys(first, "first"), "slide_id": "count"}
    patients = slides.groupby("patient_id", sort=True, as_index=False).agg(agg).rename(columns={"slide_id": "n_slides"})
    patients = _decide(patients, bundle)
    slides_csv, patients_csv = layout.prediction_tables(out, bundle.name)
    write_text_atomic(slides_csv, slides.to_csv(index=False, float_format="%.9g"))
    write_text_atomic(patients_csv, patients.to_csv(index=False, float_format="%.9g"))
    return slides_csv, patients_csv


def _record(out: Path, bundle: Bundle, cohort: Cohort, features_dir: Path) -> None:
    """Add the bundle applied to ``RUN2/predict.json`` (the record evaluate and report read)."""
    path = layout.predict_record(out)
    try:
        record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError:
        record = {}
    models = dict(record.get("models", {}))
    models[bundle.name] = {"bundle": str(bundle.path), "bundle_sha256": bundle.sha256,
                           "features_dir": str(features_dir), "manifest": bundle.manifest.model_dump(mode="json")}
    write_json_atomic(path, {"kind": "external", "cohort": str(cohort.source) if cohort.source else None,
                             "n_slides": len(cohort), "models": dict(sorted(models.items()))})


# -------------------------------------------------------------------------------------------- the command

def predict_cohort(bundle: Bundle | str | os.PathLike[str], cohort: Cohort, out: str | os.PathLike[str], *,
                   features: str | os.PathLike[str] | None = None, heatmaps: bool = False, device: str = "auto",
                   mpp_tolerance: float = DEFAULT_MPP_TOLERANCE, options: RunOptions | None = None,
                   **run_settings: Any) -> PredictResult:
    """Apply a bundle to every slide of ``cohort``; write the predictions below ``out`` (see the module docstring).

    Args:
        bundle: a loaded bundle or its folder.
        cohort: the slides (labels or survival, when present, are copied into the tables for evaluation).
        out: the run folder of the predictions (RUN2).
        features: a folder of ``<slide_id>.h5`` feature grids (e.g. imported CLAM/TRIDENT files) to use
            instead of segmenting, tiling and extracting.
        heatmaps: also write each slide's attention as PNG and QuPath GeoJSON.
        device: where the encoder and the models run (``auto``, ``cpu``, ``cuda``…).
        mpp_tolerance: relative µm/px difference between the features and the bundle that is refused.
        options: how the stages run (:class:`~wsi2dmamba.cohort.RunOptions`: ``workers`` of segment and
            tile, ``force`` to redo every slide, ``progress`` bars); its fields may also be given as keywords.

    Raises:
        ConfigError: the bundle is invalid, or the features do not fit it (the message says what differs).
        WeightsError: a weight file of the bundle is damaged, changed, or not safetensors.
    """
    from ..devices import resolve_device

    options = RunOptions.of(options, **run_settings)
    out = Path(out).expanduser().resolve()
    dev = str(resolve_device(device))
    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle, device=dev)
    result = PredictResult(out, bundle, Path())
    out.mkdir(parents=True, exist_ok=True)
    if features is not None:
        features_dir = Path(features).expanduser().resolve()
        if not features_dir.is_dir():
            raise StageInputError(f"Feature folder not found: {features_dir}")
    else:
        cohort, features_dir = _slide_stages(bundle, cohort, out, device=dev, options=options, result=result)
    result.features_dir = features_dir
    check_features(bundle, cohort, features_dir, mpp_tolerance)
    draw = heatmaps and bundle.has_attention
    if heatmaps and not draw:
        result.notes.append(f"model {bundle.name!r} pools without attention: no heatmaps drawn")
    config = PredictStageConfig(model=bundle.name, bundle_sha256=bundle.sha256,
                                features="run" if features is None else str(features_dir), heatmaps=draw,
                                mpp_tolerance=mpp_tolerance)
    drop_stale_predictions(cohort, out, bundle.name, features_dir)
    fn = functools.partial(predict_slide, bundle=bundle, features_dir=features_dir)
    summary = run_stage("predict", cohort, out, config, fn, functools.partial(_outputs, config=config),
                        RunOptions.of(options, workers=1), stage_dir=layout.predictions_stage(bundle.name))
    result.stages["predict"] = summary
    result.failed.update({sid: f"predict: {why}" for sid, why in summary.failed.items()})
    result.slides_csv, result.patients_csv = write_tables(bundle, cohort, out)
    _record(out, bundle, cohort, features_dir)
    return result
