"""Heatmaps of many slides in one go: every test slide of every fold (each drawn by the fold's model that
did not train on it), or a given list; resumes by skipping slides already drawn with the same parameters.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import run_layout as layout
from ..cohort.options import RunOptions
from ..errors import StageInputError, WsiError
from .attention import heatmap, heatmap_params


def slides_tested_by_fold(model_dir: Path) -> dict[str, int]:
    """slide_id → the fold whose test partition holds it, over the model's complete folds."""
    out: dict[str, int] = {}
    for d in sorted(model_dir.glob(layout.fold_glob())):
        if not layout.fold_file(d, layout.FOLD_DONE).is_file():
            continue
        cfg = json.loads(layout.fold_file(d, layout.FOLD_CONFIG).read_text())
        for sid in cfg["split"]["test"]:
            out.setdefault(sid, int(cfg["fold"]))
    return out


def _is_done(out_dir: Path, slide_id: str, params: dict, checkpoint: str) -> bool:
    """The slide's record says it was drawn with these parameters, and all its files are there."""
    rec = layout.heatmap_files(out_dir, slide_id)["record"]
    try:
        info = json.loads(rec.read_text())
    except (OSError, ValueError):
        return False
    return (info.get("params") == params and info.get("checkpoint") == checkpoint
            and all((out_dir / name).is_file() for name in info.get("files", [])))


def _slides_to_draw(model_dir: Path, slides: list[str] | None) -> tuple[dict[str, int], list[str]]:
    """(slide → testing fold, the slides to draw in order): the given ones, else every tested slide."""
    folds = slides_tested_by_fold(model_dir) if model_dir.is_dir() else {}
    if not folds and slides is None:
        raise StageInputError(f"{model_dir} has no complete fold; run `wsi2dmamba train` first.")
    return folds, sorted(folds) if slides is None else list(dict.fromkeys(slides))


@dataclass
class HeatmapSummary:
    """Outcome of a batch: slides drawn, skipped (already drawn) and failed (with the reason), and notes."""

    out_dir: Path
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)

    def line(self) -> str:
        return (f"heatmap: {len(self.done)} slide(s) drawn, {len(self.skipped)} already done, "
                f"{len(self.failed)} failed → {self.out_dir}")


def heatmap_cohort(run_dir: str | os.PathLike[str], model: str, slides: list[str] | None = None, *,
                   checkpoint: str = "best", out_dir: str | os.PathLike[str] | None = None,
                   thumbnail_px: int = 2048, device: str = "auto", style=None, per_class: bool | None = None,
                   options: RunOptions | None = None, **run_settings: Any) -> HeatmapSummary:
    """Heatmaps of ``slides`` (default: every test slide of every fold), each by the fold that tested it.

    A slide already drawn with the same parameters is skipped unless ``options.force``; a slide that fails
    is recorded with its reason and the others go on. ``options`` (:class:`~wsi2dmamba.cohort.RunOptions`;
    its fields may also be given as keywords) gives ``force`` and ``progress``; the other arguments are
    those of :func:`~wsi2dmamba.heatmaps.heatmap`.
    """
    from tqdm.auto import tqdm

    from .figures import HeatmapStyle

    options = RunOptions.of(options, **run_settings)
    style = style or HeatmapStyle()
    run_dir = Path(run_dir)
    folds, todo = _slides_to_draw(layout.model_dir(run_dir, model), slides)
    out = Path(out_dir) if out_dir is not None else layout.heatmaps_dir(run_dir, model)
    summary = HeatmapSummary(out)
    params = heatmap_params(style, thumbnail_px, per_class)
    for sid in tqdm(todo, desc="heatmap", unit="slide", disable=not options.progress, dynamic_ncols=True):
        if not options.force and _is_done(out, sid, params, checkpoint):
            summary.skipped.append(sid)
            continue
        try:
            res = heatmap(run_dir, model, sid, fold=folds.get(sid), checkpoint=checkpoint, out_dir=out,
                          thumbnail_px=thumbnail_px, device=device, style=style, per_class=per_class)
        except WsiError as exc:  # this slide fails with its reason; the others go on
            summary.failed[sid] = str(exc)
            continue
        summary.done.append(sid)
        if res.notes:
            summary.notes[sid] = res.notes
    return summary
