"""Model bundles: everything needed to apply a cross-validated model to new slides, and nothing that runs.

A bundle is one folder (format in ``docs/bundles.md``)::

    BUNDLE/bundle.json            the manifest: format, model, encoder, tiling, task, folds, training summary
    BUNDLE/fold_<k>.safetensors   one fold's weights; its header holds the model configuration

:func:`load_bundle` reads the manifest, checks it against the specification (:meth:`Bundle.validate`),
then checks every weight file (safetensors magic bytes, sha256 recorded in the manifest, header
configuration equal to the manifest's) before loading any tensor. Nothing is unpickled or executed.

>>> from wsi2dmamba.predict import load_bundle
>>> bundle = load_bundle("runs/demo/classification/bundles/2dmambamil")  # doctest: +SKIP
>>> out = bundle.predict(grid)            # grid: a FeatureGrid read with wsi2dmamba.grid.read_feature_grid  # doctest: +SKIP
>>> out.probs, out.attention_map          # ensemble probabilities (C,), attention (H, W)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .. import run_layout as layout
from ..errors import ConfigError, WeightsError
from ..validation import validated

FORMAT_NAME = "wsi2dmamba.bundle"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MANIFEST = layout.BUNDLE_MANIFEST
#: Files a bundle may hold besides its fold weights.
OPTIONAL_FILES = ("README.md",)
_FOLD_FILE = re.compile(r"^fold_(\d{1,3})\.safetensors$")
_MAX_MANIFEST_BYTES = 16 << 20
#: Relative difference of µm/px between the bundle's tiles and a feature grid's beyond which it is refused.
DEFAULT_MPP_TOLERANCE = 0.05


# ------------------------------------------------------------------------------------ the manifest schema

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EncoderInfo(_Strict):
    """The encoder whose features the model was trained on."""

    name: str = Field(min_length=1)
    feature_dim: int = Field(ge=1)
    weights_sha256: str = Field("", pattern=r"^([0-9a-f]{64})?$")
    precision: str | None = None


class TilingInfo(_Strict):
    """How the training slides were tiled (``TileConfig`` without its segmentation)."""

    mpp: float = Field(gt=0)
    tile_px: int = Field(ge=1)
    overlap: int = Field(0, ge=0)
    min_tissue: float = Field(ge=0, le=1)
    mpp_tolerance: float = Field(0.02, ge=0)


class TaskInfo(_Strict):
    """What the model predicts."""

    kind: Literal["classification", "survival"]
    classes: list[str] | None = None
    n_bins: int | None = None


class FoldInfo(_Strict):
    """One fold's weights and what training chose for it."""

    fold: int = Field(ge=0)
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    checkpoint: Literal["best", "last"] = "best"
    epoch: int = Field(ge=0)
    bin_edges: list[float] | None = None
    bin_ends: list[float] | None = None
    risk_cutoff: float | None = None


class BundleManifest(_Strict):
    """``bundle.json``: see ``docs/bundles.md`` for each field."""

    format: Literal["wsi2dmamba.bundle"]
    format_version: int
    name: str = Field(min_length=1)
    software_version: str
    created: str
    model: dict[str, Any]
    encoder: EncoderInfo
    tiling: TilingInfo
    segment: dict[str, Any] | None = None
    task: TaskInfo
    folds: list[FoldInfo] = Field(min_length=1)
    ensemble: Literal["mean_probability", "mean_risk"]
    risk_cutoff: float | None = None
    training_cohort: dict[str, Any] = Field(default_factory=dict)
    cv_metrics: dict[str, Any] = Field(default_factory=dict)


# ------------------------------------------------------------------------------------------- predictions

@dataclass
class SlidePrediction:
    """What a bundle predicts for one feature grid.

    Attributes:
        slide_id: the grid's slide.
        task: ``classification`` or ``survival``.
        probs: (C,) ensemble probabilities (mean over folds), classification only.
        fold_probs: (K, C) probabilities of each fold's model.
        risk: ensemble risk (mean over folds; higher = shorter survival), survival only.
        fold_risk: (K,) risk of each fold's model.
        attention: (N,) attention per tile (rows of the grid file), mean over folds; None when the
            model pools without weights.
        shape: (H, W) of the grid; index: (N, 2) (row, col) of each tile.
    """

    slide_id: str
    task: str
    shape: tuple[int, int]
    index: np.ndarray
    probs: np.ndarray | None = None
    fold_probs: np.ndarray | None = None
    risk: float | None = None
    fold_risk: np.ndarray | None = None
    attention: np.ndarray | None = None

    @property
    def attention_map(self) -> np.ndarray | None:
        """(H, W) attention with NaN on cells without tissue, or None."""
        if self.attention is None:
            return None
        out = np.full(self.shape, np.nan)
        out[self.index[:, 0], self.index[:, 1]] = self.attention
        return out


@dataclass
class Bundle:
    """A validated bundle with its fold models loaded (on ``device``)."""

    path: Path
    manifest: BundleManifest
    models: list[Any] = field(default_factory=list)
    device: str = "cpu"

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def task(self) -> str:
        return self.manifest.task.kind

    @property
    def classes(self) -> list[str] | None:
        return self.manifest.task.classes

    @property
    def sha256(self) -> str:
        """sha256 of ``bundle.json`` (which holds every weight file's sha256): the bundle's identity."""
        from ..fileio import file_sha256

        return file_sha256(self.path / MANIFEST)

    @property
    def has_attention(self) -> bool:
        """Whether the models return an attention map (one forward pass on a small blank grid)."""
        import torch

        from ..models import GridBatch

        d = self.manifest.encoder.feature_dim
        batch = GridBatch.from_arrays([(np.zeros((2, 2, d), np.float32), np.ones((2, 2), bool))]).to(self.device)
        with torch.no_grad():
            return self.models[0](batch).attention is not None

    def check_grid(self, grid: Any, source: str = "", mpp_tolerance: float = DEFAULT_MPP_TOLERANCE) -> None:
        """Raise :class:`ConfigError` when a feature grid was not made the way the bundle's model needs.

        Compared: encoder name and weights (when the grid records them), feature dimension, and µm/px
        (relative difference above ``mpp_tolerance``).
        """
        problems = grid_mismatches(self.manifest, grid, mpp_tolerance)
        if problems:
            where = source or grid.slide_id
            raise ConfigError(f"{where} does not fit the bundle {self.path.name!r}: {'; '.join(problems)}. "
                              f"Make the features the way the model was trained: {self.recipe()}.")

    def recipe(self) -> str:
        """How the bundle's features are made, as advice for error messages."""
        m = self.manifest
        return (f"encoder {m.encoder.name} ({m.encoder.feature_dim}-d), tiles of {m.tiling.tile_px} px at "
                f"{m.tiling.mpp:g} µm/px (run `wsi2dmamba predict` without --features to have it segment, tile and "
                "extract with these parameters)")

    def predict(self, grid: Any, *, check: bool = True) -> SlidePrediction:
        """Apply every fold's model and their ensemble to one :class:`~wsi2dmamba.grid.FeatureGrid`."""
        import torch

        from ..models import GridBatch, survival_risk

        if check:
            self.check_grid(grid)
        if grid.n_tiles == 0:
            raise ConfigError(f"slide {grid.slide_id!r} has no tissue tile in its feature grid; nothing to predict.")
        batch = GridBatch.from_grids([grid]).to(self.device)
        logits, attention = [], []
        with torch.no_grad():
            for net in self.models:
                out = net(batch)
                logits.append(out.logits.float().cpu()[0])
                if out.attention is not None:
                    att = out.attention[0].float().cpu().numpy()
                    attention.append(att[grid.index[:, 0], grid.index[:, 1]].astype(np.float64))
        stacked = torch.stack(logits)
        if not bool(torch.isfinite(stacked).all()):
            raise ConfigError(f"slide {grid.slide_id!r}: the model's output is NaN or inf; check its features.")
        pred = SlidePrediction(grid.slide_id, self.task, tuple(grid.shape), np.asarray(grid.index),
                               attention=np.mean(attention, axis=0) if len(attention) == len(self.models) else None)
        if self.task == "survival":
            pred.fold_risk = survival_risk(stacked).double().numpy()
            pred.risk = float(pred.fold_risk.mean())
        else:
            pred.fold_probs = torch.softmax(stacked.double(), dim=1).numpy()
            pred.probs = pred.fold_probs.mean(axis=0)
        return pred


def grid_mismatches(manifest: BundleManifest, grid: Any, mpp_tolerance: float = DEFAULT_MPP_TOLERANCE) -> list[str]:
    """What differs between a feature grid and the features a bundle's model was trained on."""
    enc = manifest.encoder
    problems = []
    if grid.encoder and grid.encoder != enc.name:
        problems.append(f"encoder {grid.encoder!r}, the bundle's model needs {enc.name!r}")
    elif grid.weights_sha256 and enc.weights_sha256 and grid.weights_sha256 != enc.weights_sha256:
        problems.append(f"encoder {enc.name!r} with other weights (sha256 {grid.weights_sha256[:12]}…, the "
                        f"bundle's {enc.weights_sha256[:12]}…)")
    if grid.feature_dim != enc.feature_dim:
        problems.append(f"feature dimension {grid.feature_dim}, the bundle's model needs {enc.feature_dim}")
    mpp, want = float(grid.mpp_effective), manifest.tiling.mpp
    if abs(mpp - want) / want > mpp_tolerance:
        problems.append(f"tiles at {mpp:.4g} µm/px, the bundle's model was trained at {want:g} µm/px "
                        f"(more than {mpp_tolerance:.0%} apart)")
    return problems


# -------------------------------------------------------------------------------------------- validation

def read_manifest(path: str | os.PathLike[str]) -> BundleManifest:
    """Read and validate ``bundle.json`` (the weight files are not read). See :func:`validate`."""
    root = Path(path).expanduser()
    if not root.is_dir():
        hint = " (a bundle is a folder; pass the folder, not a file in it)" if root.is_file() else ""
        raise ConfigError(f"Model bundle not found: {root}{hint}. Make one with `wsi2dmamba export RUN --model NAME`.")
    mpath = layout.bundle_manifest(root)
    if not mpath.is_file():
        raise ConfigError(f"{root} is not a model bundle: it has no {MANIFEST}. Make one with `wsi2dmamba export`.")
    if mpath.stat().st_size > _MAX_MANIFEST_BYTES:
        raise ConfigError(f"{mpath} is {mpath.stat().st_size} bytes, far more than a bundle manifest; refused.")
    try:
        data = json.loads(mpath.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ConfigError(f"{mpath} is not valid JSON ({exc}); the bundle is damaged. Export it again.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{mpath} holds a JSON {type(data).__name__}, not an object; the bundle is damaged.")
    return _check_manifest(data, mpath)


def _check_manifest(data: dict[str, Any], mpath: Path) -> BundleManifest:
    if data.get("format") != FORMAT_NAME:
        raise ConfigError(f"{mpath}: 'format' is {data.get('format')!r}, not {FORMAT_NAME!r}; this is not a "
                          "wsi2dmamba model bundle.")
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version not in SUPPORTED_VERSIONS:
        raise ConfigError(f"{mpath}: format_version {version!r} is unknown to this wsi2dmamba (it reads "
                          f"{', '.join(map(str, SUPPORTED_VERSIONS))}). A newer version of wsi2dmamba wrote it: "
                          "upgrade wsi2dmamba, or export the bundle again with this one.")
    manifest = validated(BundleManifest, data, f"{mpath} does not follow the bundle format", limit=8)
    _check_consistency(manifest, mpath)
    return manifest


def _check_consistency(m: BundleManifest, mpath: Path) -> None:
    """Cross-field rules of the format (one fold per file, model fits encoder and task)."""
    problems = _fold_problems(m) + _task_problems(m)
    if m.model.get("in_dim") != m.encoder.feature_dim:
        problems.append(f"the model takes {m.model.get('in_dim')!r}-d features but encoder.feature_dim is "
                        f"{m.encoder.feature_dim}")
    if problems:
        raise ConfigError(f"{mpath} is not a consistent bundle: " + "; ".join(problems) + ". Export it again.")


def _fold_problems(m: BundleManifest) -> list[str]:
    problems = []
    files = [f.file for f in m.folds]
    for f in m.folds:
        match = _FOLD_FILE.match(f.file)
        if match is None or int(match.group(1)) != f.fold:
            problems.append(f"fold {f.fold}: file {f.file!r} must be named {layout.bundle_fold_file(f.fold)}")
    if len(set(files)) != len(files) or len({f.fold for f in m.folds}) != len(m.folds):
        problems.append("a fold or a file is listed twice")
    return problems


def _task_problems(m: BundleManifest) -> list[str]:
    problems = []
    if m.model.get("task", "classification") != m.task.kind:
        problems.append(f"the model is a {m.model.get('task')!r} model but task.kind is {m.task.kind!r}")
    if m.task.kind == "classification":
        if not m.task.classes or m.model.get("n_classes") != len(m.task.classes):
            problems.append(f"task.classes {m.task.classes!r} does not match the model's n_classes "
                            f"{m.model.get('n_classes')!r}")
        if m.ensemble != "mean_probability":
            problems.append("a classification bundle's ensemble is mean_probability")
    elif m.ensemble != "mean_risk":
        problems.append("a survival bundle's ensemble is mean_risk")
    return problems


def _check_files(root: Path, m: BundleManifest) -> None:
    """Only the files the manifest names (plus README.md), each a safetensors file with the recorded sha256
    and the manifest's model configuration in its header."""
    from ..fileio import file_sha256
    from ..models.checkpoint import _refuse_foreign_format, read_checkpoint_config

    allowed = {MANIFEST, *OPTIONAL_FILES, *(f.file for f in m.folds)}
    extra = sorted(p.name for p in root.iterdir() if p.name not in allowed)
    if extra:
        raise ConfigError(f"{root} holds file(s) a bundle does not: {', '.join(extra[:10])}. A bundle holds "
                          f"{MANIFEST} and the fold files it lists; remove the others.")
    for f in m.folds:
        p = root / f.file
        if not p.is_file() or p.is_symlink():
            raise WeightsError(f"{p} is missing (or not a plain file); the bundle is incomplete. Export it again.")
        _refuse_foreign_format(p)
        actual = file_sha256(p)
        if actual != f.sha256:
            raise WeightsError(f"{p}: its sha256 ({actual[:16]}…) differs from the one bundle.json records "
                               f"({f.sha256[:16]}…); the weights were changed after export. Do not use this "
                               "bundle; export it again from the training run.")
        header = read_checkpoint_config(p)
        if header != m.model:
            raise WeightsError(f"{p}: the model configuration in its header differs from bundle.json's 'model'; "
                               "the bundle was edited. Export it again.")


def validate(path: str | os.PathLike[str]) -> BundleManifest:
    """Check a bundle against the specification without loading any tensor; return its manifest.

    Raises:
        ConfigError: no manifest, not JSON, another format, an unknown format version, a field missing,
            of the wrong type or inconsistent with another, or a file the format does not allow.
        WeightsError: a weight file missing, not safetensors (e.g. a pickle), changed since export (sha256),
            or with another model configuration in its header.
    """
    root = Path(path).expanduser()
    manifest = read_manifest(root)
    _check_files(root, manifest)
    return manifest


def load_bundle(path: str | os.PathLike[str], device: str = "cpu") -> Bundle:
    """Validate a bundle (:func:`validate`) and load its fold models on ``device`` (no pickle involved)."""
    from ..devices import resolve_device
    from ..models.checkpoint import load_checkpoint

    root = Path(path).expanduser().resolve()
    manifest = validate(root)
    dev = str(resolve_device(device))
    models = [load_checkpoint(root / f.file, dev).eval() for f in sorted(manifest.folds, key=lambda f: f.fold)]
    return Bundle(root, manifest, models, dev)
