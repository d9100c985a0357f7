"""Write a run's feature grids in CLAM's or TRIDENT's own layout, so that their trainers read them.

CLAM (``main.py`` / ``eval.py`` with ``--data_root_dir``)::

    DIR/h5_files/<slide_id>.h5   features (N, D) float32, coords (N, 2) int64 (level-0 top-left corners)
    DIR/pt_files/<slide_id>.pt   the features as one plain (N, D) float32 tensor (``torch.save``)
    DIR/slides.csv               case_id, slide_id, label (CLAM's ``Generic_MIL_Dataset`` csv)

The ``coords`` attributes are those CLAM's ``Whole_Slide_Bag_FP`` reads (``patch_level``, ``patch_size``)
plus TRIDENT's. Tiles read at a native pyramid level are described as they are. Tiles resized from
level 0 (the target µm/px is no pyramid level of the slide) are described as level-0 patches of the
same field of view: ``patch_level = 0``, ``patch_size`` = the tile's side in level-0 pixels, with
``target_patch_size`` = the tile's side in pixels, the value to pass to ``Whole_Slide_Bag_FP``.

TRIDENT::

    DIR/features_<encoder>/<slide_id>.h5   features (N, D), coords (N, 2) with TRIDENT's attributes

Every ``coords`` dataset carries the cohort's ``slide_id``: TRIDENT copies those attributes into the
feature files it writes, and ``import-features`` names the slide by it (TRIDENT itself names files by the
slide file's stem).
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .. import run_layout as layout
from ..errors import ConfigError, StageInputError, WsiError
from ..fileio import atomic_path, write_text_atomic
from ..grid import FeatureGrid, read_feature_grid
from ..grid.files import _coords_attrs

EXPORT_FORMATS = ("clam", "trident")
CLAM_CSV = "slides.csv"


def clam_coords_attrs(grid: FeatureGrid) -> dict[str, Any]:
    """Attributes of an exported ``coords`` dataset: TRIDENT's, and CLAM's patch attributes for every grid
    (level-0 patches of the same field of view when the tiles were resized)."""
    attrs = _coords_attrs(grid)
    if "patch_level" not in attrs:
        w0, h0 = grid.level0_size
        size0 = round(grid.tile_size_level0)
        attrs.update({
            "patch_level": 0,
            # CLAM reads patch_size pixels at patch_level, then resizes to target_patch_size.
            "patch_size": size0,
            "target_patch_size": int(grid.tile_px),
            "downsample": np.array([1.0, 1.0], dtype=np.float64),
            "downsampled_level_dim": np.array([w0, h0], dtype=np.int64),
            "level_dim": np.array([w0, h0], dtype=np.int64),
        })
    else:
        attrs["target_patch_size"] = int(grid.tile_px)
    return attrs


def _h5_bytes(grid: FeatureGrid, coords_attrs: dict[str, Any]) -> bytes:
    import h5py

    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        fd = f.create_dataset("features", data=grid.features.astype(np.float32))
        fd.attrs["name"] = grid.slide_id
        fd.attrs["encoder"] = grid.encoder
        cd = f.create_dataset("coords", data=grid.coords.astype(np.int64))
        for k, v in coords_attrs.items():
            cd.attrs[k] = v
        f.attrs["slide_id"] = grid.slide_id
        f.attrs["exported_from"] = "wsi2dmamba feature grid"
    return buf.getvalue()


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def _write_pt(path: Path, features: np.ndarray) -> None:
    import torch

    buf = io.BytesIO()
    torch.save(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)), buf)
    _write_bytes(path, buf.getvalue())


def export_grid(grid: FeatureGrid, out_dir: str | os.PathLike[str], fmt: Literal["clam", "trident"],
                encoder: str) -> list[Path]:
    """Write one slide's feature grid in ``fmt``'s layout below ``out_dir``; returns the files written."""
    out_dir = Path(out_dir)
    attrs = clam_coords_attrs(grid)
    if fmt == "trident":
        path = out_dir / f"features_{encoder}" / f"{grid.slide_id}.h5"
        _write_bytes(path, _h5_bytes(grid, attrs))
        return [path]
    h5 = out_dir / "h5_files" / f"{grid.slide_id}.h5"
    pt = out_dir / "pt_files" / f"{grid.slide_id}.pt"
    _write_bytes(h5, _h5_bytes(grid, attrs))
    _write_pt(pt, grid.features)
    return [h5, pt]


def _clam_csv(slide_ids: list[str], cohort) -> str:
    """CLAM's dataset csv: ``case_id`` (the patient), ``slide_id``, ``label``."""
    records = {r.slide_id: r for r in cohort.records} if cohort is not None else {}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["case_id", "slide_id", "label"])
    for sid in slide_ids:
        r = records.get(sid)
        w.writerow([r.patient_id if r else sid, sid, (r.label or "") if r else ""])
    return buf.getvalue()


@dataclass
class ExportSummary:
    """Outcome of an export: slides written, slides that failed (with the reason), and notes."""

    fmt: str
    out_dir: Path
    written: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"export-features: {len(self.written)} slide(s) written to {self.out_dir} ({self.fmt}), "
                f"{len(self.failed)} failed")


def features_dir_of(run_dir: Path, encoder: str | None) -> tuple[Path, str]:
    """The run's feature folder of ``encoder``, or its only one when not given."""
    from .extract import encoder_dirname

    base = layout.features_root(run_dir)
    found = sorted(p.name for p in base.iterdir() if p.is_dir() and any(p.glob("*.h5"))) if base.is_dir() else []
    if encoder is not None:
        name = encoder_dirname(encoder)
        if name not in found:
            raise StageInputError(f"{base / name} holds no feature grids (found: {', '.join(found) or 'none'}); "
                                  "run `wsi2dmamba extract` first.")
        return base / name, name
    if len(found) != 1:
        raise ConfigError(f"{base} holds features of {len(found)} encoders ({', '.join(found) or 'none'}); "
                          "pass --encoder.")
    return base / found[0], found[0]


def _grid_files(feat_dir: Path, cohort, notes: list[str]) -> list[Path]:
    """The grid files to export: all, or the cohort's (noting the cohort's slides without one)."""
    files = sorted(feat_dir.glob("*.h5"))
    if cohort is None:
        return files
    wanted = {r.slide_id for r in cohort.records}
    missing = sorted(wanted - {p.stem for p in files})
    if missing:
        notes.append(f"{len(missing)} slide(s) of the cohort have no feature grid: "
                     f"{', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
    return [p for p in files if p.stem in wanted]


def export_features(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                    fmt: Literal["clam", "trident"], *, encoder: str | None = None, cohort=None,
                    progress: bool = True) -> ExportSummary:
    """Export every feature grid of ``RUN/features/<encoder>`` in CLAM's or TRIDENT's layout.

    Args:
        run_dir: the run folder.
        out_dir: where the CLAM or TRIDENT folders are written.
        fmt: ``"clam"`` or ``"trident"``.
        encoder: which encoder's features (default: the run's only one).
        cohort: the cohort (:class:`~wsi2dmamba.cohort.Cohort`) whose patients and labels go into CLAM's
            csv and which selects the slides; default: every grid, ``case_id`` = ``slide_id``, no label.
        progress: show a progress bar.
    """
    from tqdm.auto import tqdm

    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"--format must be clam or trident, not {fmt!r}.")
    feat_dir, enc_name = features_dir_of(Path(run_dir), encoder)
    summary = ExportSummary(fmt, Path(out_dir))
    files = _grid_files(feat_dir, cohort, summary.notes)
    for path in tqdm(files, desc=f"export {fmt}", unit="slide", disable=not progress, dynamic_ncols=True):
        try:
            grid = read_feature_grid(path)
            export_grid(grid, out_dir, fmt, enc_name)
        except WsiError as exc:  # this slide fails with its reason; the others go on
            summary.failed[path.stem] = str(exc)
            continue
        summary.written.append(grid.slide_id)
    if fmt == "clam":
        write_text_atomic(Path(out_dir) / CLAM_CSV, _clam_csv(summary.written, cohort))
        if cohort is None:
            summary.notes.append(f"no --cohort: {CLAM_CSV} has case_id = slide_id and no labels")
    return summary
