"""Attention heatmaps of a trained model on one slide: a PNG over the thumbnail and QuPath GeoJSON tiles.

The model's attention (B, H, W) lives on the slide's grid cells. Cell (r, c) covers the level-0 box with
top-left ``origin_level0 + (c, r) · stride_level0`` and side ``tile_size_level0`` (see
``wsi2dmamba/grid/files.py``), which places each value on the thumbnail and in QuPath.

GeoJSON: one ``Feature`` per tissue tile, a level-0 pixel ``Polygon`` with ``objectType: "tile"`` and the
measurements ``attention`` (the model's weight; they sum to 1 over the slide) and ``attention_percentile``
(its rank among the slide's tiles, 0–100), which QuPath shows as detection measurements and can colour by
(File → Import objects from file, then Measure → Show measurement maps).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import run_layout as layout
from ..errors import ConfigError, SlideError, StageInputError
from ..fileio import write_text_atomic
from ..grid import FeatureGrid, read_feature_grid


@dataclass
class HeatmapResult:
    """Files written by :func:`heatmap` and the values drawn."""

    png: Path
    geojson: Path
    fold: int
    partition: str
    attention: np.ndarray  # (N,) per tile, in the order of the grid file's rows
    notes: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)  # every file written
    contributions: np.ndarray | None = None  # (N, C) per-class shares of the logits, when drawn


def _fold_for(model_dir: Path, slide_id: str, fold: int | None) -> tuple[int, str, dict[str, Any]]:
    """The fold to use: the given one, else the one whose test partition holds the slide."""
    configs = {}
    for d in sorted(model_dir.glob(layout.fold_glob())):
        if layout.fold_file(d, layout.FOLD_DONE).is_file():
            cfg = json.loads(layout.fold_file(d, layout.FOLD_CONFIG).read_text())
            configs[int(cfg["fold"])] = cfg
    if not configs:
        raise StageInputError(f"{model_dir} has no complete fold; run `wsi2dmamba train` first.")
    def where(cfg: dict[str, Any]) -> str:
        for part in ("test", "val", "train"):
            if slide_id in cfg["split"][part]:
                return part
        return "none"
    if fold is not None:
        if fold not in configs:
            raise ConfigError(f"fold {fold} of {model_dir.name} is not complete (complete: {sorted(configs)})")
        return fold, where(configs[fold]), configs[fold]
    for part in ("test", "val", "train"):
        for k, cfg in sorted(configs.items()):
            if where(cfg) == part:
                return k, part, cfg
    k = min(configs)
    return k, "none", configs[k]


def _features_file(run_dir: Path, cfg: dict[str, Any], slide_id: str) -> Path:
    candidates = []
    if cfg.get("features_dir"):
        candidates.append(layout.grid_file(cfg["features_dir"], slide_id))
    if cfg.get("features"):
        candidates.append(layout.grid_file(layout.features_dir(run_dir, cfg["features"]), slide_id))
    for c in candidates:
        if c.is_file():
            return c
    raise StageInputError(f"No feature grid for slide {slide_id!r} (looked at {', '.join(map(str, candidates))}); "
                          "extract its features first.")


def attention_on_grid(model: torch.nn.Module, grid: FeatureGrid, device: str = "cpu") -> np.ndarray:
    """(N,) attention weight of each tile of ``grid`` (rows of the grid file), from one forward pass."""
    from ..models import GridBatch

    with torch.no_grad():
        out = model.to(device).eval()(GridBatch.from_grids([grid]).to(device))
    if out.attention is None:
        name = getattr(model, "name", type(model).__name__)
        raise ConfigError(f"model {name!r} has no attention map (it pools without weights); train an attention "
                          "model (abmil, 2dmambamil, …) to draw heatmaps.")
    att = out.attention[0].float().cpu().numpy()
    return att[grid.index[:, 0], grid.index[:, 1]].astype(np.float64)


def tile_boxes(grid: FeatureGrid, *, clip: bool = False) -> np.ndarray:
    """(N, 4) level-0 boxes (x0, y0, x1, y1) of the tiles, from the lattice's origin and stride.

    With ``clip``, boxes are cut at the slide's edges (a tile at the border is read past them, padded).
    """
    ox, oy = grid.origin_level0
    x0 = ox + grid.index[:, 1] * grid.stride_level0
    y0 = oy + grid.index[:, 0] * grid.stride_level0
    s = grid.tile_size_level0
    boxes = np.stack([x0, y0, x0 + s, y0 + s], axis=1)
    if clip:
        w0, h0 = grid.level0_size
        boxes = np.clip(boxes, 0.0, np.array([w0, h0, w0, h0], np.float64))
    return boxes


def percentiles(values: np.ndarray) -> np.ndarray:
    """Rank of each value among all, scaled to 0–100 (ties share their mean rank)."""
    from scipy.stats import rankdata

    if values.size <= 1:
        return np.full(values.shape, 100.0)
    return (rankdata(values) - 1) / (values.size - 1) * 100.0


def geojson_tiles(grid: FeatureGrid, attention: np.ndarray, model_name: str,
                  contributions: np.ndarray | None = None, classes: list[str] | None = None) -> dict[str, Any]:
    """GeoJSON FeatureCollection of the tiles with their attention as QuPath measurements (tiles clipped
    to the slide)."""
    boxes = tile_boxes(grid, clip=True)
    pct = percentiles(attention)
    feats = []
    for i, (x0, y0, x1, y1) in enumerate(np.round(boxes, 2).tolist()):
        feats.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
            "properties": {
                "objectType": "tile",
                "isLocked": True,
                "name": f"r{int(grid.index[i, 0])}c{int(grid.index[i, 1])}",
                "measurements": {"attention": float(attention[i]), "attention_percentile": float(pct[i]),
                                 **({f"share of {c}": float(contributions[i, j]) for j, c in enumerate(classes)}
                                    if contributions is not None and classes else {})},
            },
        })
    return {"type": "FeatureCollection", "features": feats,
            "properties": {"slide_id": grid.slide_id, "model": model_name, "coordinates": "level-0 pixels"}}


def class_contributions(model: torch.nn.Module, grid: FeatureGrid, device: str = "cpu") -> np.ndarray | None:
    """(N, C) share of each tile in each class logit: ``a_i · (W_c · x_i)``, where ``x_i`` is the cell vector
    the attention pooling weighs, ``a_i`` its weight and ``W`` the linear head; summed over the tiles and
    added to the head's bias they give the slide's logits exactly.

    Returns None for models that do not pool grid cells with :class:`~wsi2dmamba.models.AttentionPool`
    into a linear head.
    """
    from ..models import AttentionPool, GridBatch

    pool, head = getattr(model, "pool", None), getattr(model, "head", None)
    if not isinstance(pool, AttentionPool) or not isinstance(head, torch.nn.Linear):
        return None
    seen: dict[str, torch.Tensor] = {}
    hook = pool.register_forward_hook(lambda _m, args, out: seen.update(x=args[0], w=out[1]))
    try:
        with torch.no_grad():
            model.to(device).eval()(GridBatch.from_grids([grid]).to(device))
    finally:
        hook.remove()
    x, w = seen["x"], seen["w"]
    if x.dim() != 4:  # cells in another layout than the slide's grid
        return None
    with torch.no_grad():
        per_cell = (w[..., None] * (x.float() @ head.weight.float().T))[0]  # (H, W, C)
    return per_cell[grid.index[:, 0], grid.index[:, 1]].cpu().numpy().astype(np.float64)


def _thumbnail(grid: FeatureGrid, slide_path: Path | None, explicit: bool, thumbnail_px: int,
               notes: list[str]) -> tuple[np.ndarray, float]:
    """(thumbnail (h, w, 3) uint8, level-0 pixels per thumbnail pixel): the slide's, else a blank one."""
    from ..slide import open_slide

    w0, h0 = grid.level0_size
    if slide_path is not None and (slide_path.exists() or explicit):
        with open_slide(slide_path) as slide:
            thumb = slide.thumbnail(thumbnail_px)
            w0 = slide.dimensions[0]
    else:
        notes.append(f"slide file {slide_path or '(none recorded)'} not found: attention drawn on a blank "
                     "background (pass --slide-path)")
        scale = max(w0, h0) / thumbnail_px
        thumb = np.full((max(1, round(h0 / scale)), max(1, round(w0 / scale)), 3), 255, np.uint8)
    if thumb.size == 0:
        raise SlideError(f"{slide_path}: empty thumbnail")
    return thumb, w0 / thumb.shape[1]


def draw_scores(thumb: np.ndarray, downsample: float, grid: FeatureGrid, unit: np.ndarray, style,
                cmap: str | None = None) -> np.ndarray:
    """Blend per-tile values in [0, 1] onto the thumbnail: averaged where tiles overlap, optionally blurred."""
    from .figures import blend, blurred, score_map

    mean, count = score_map(thumb.shape[:2], tile_boxes(grid, clip=True) / downsample, unit)
    covered = count > 0
    mean = blurred(mean, covered, style.blur * grid.stride_level0 / downsample)
    return blend(thumb, mean, covered, style, cmap)


def _montage(slide_path: Path | None, grid: FeatureGrid, att: np.ndarray, k: int, out: Path, title: str) -> Path:
    """Top-k / bottom-k attended tiles as a picture, and their coordinates as CSV next to it."""
    import csv
    import io

    from ..slide import open_slide
    from ..tiling import read_tile
    from .figures import extreme_tiles, montage

    top, bottom = extreme_tiles(att, k)
    pct = percentiles(att)
    with open_slide(slide_path) as slide:
        pix = {int(i): read_tile(slide, grid, int(i)) for i in np.concatenate([top, bottom])}
    def label(i: int) -> str:
        x, y = grid.coords[i]
        return f"x={int(x)} y={int(y)}\n{att[i]:.2e} ({pct[i]:.0f}%)"
    png = out.with_name(f"{out.name}_top{k}.png")
    montage(png, [pix[int(i)] for i in top], [pix[int(i)] for i in bottom], [label(int(i)) for i in top],
            [label(int(i)) for i in bottom], title)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["kind", "rank", "x_level0", "y_level0", "size_level0", "row", "col", "attention", "percentile"])
    for kind, idx in (("top", top), ("bottom", bottom)):
        for rank, i in enumerate(idx, 1):
            w.writerow([kind, rank, int(grid.coords[i, 0]), int(grid.coords[i, 1]), f"{grid.tile_size_level0:g}",
                        int(grid.index[i, 0]), int(grid.index[i, 1]), f"{att[i]:.6g}", f"{pct[i]:.2f}"])
    write_text_atomic(png.with_suffix(".csv"), buf.getvalue())
    return png


def _model_and_fold(run_dir: Path, model: str, slide_id: str, fold: int | None,
                    checkpoint: str) -> tuple[Path, int, str, dict[str, Any]]:
    model_dir = layout.model_dir(run_dir, model)
    train = layout.train_dir(run_dir)
    if not model_dir.is_dir():
        avail = sorted(p.name for p in train.glob("*") if p.is_dir() and p.name != layout.SPLITS_DIR) \
            if train.is_dir() else []
        raise StageInputError(f"No trained model {model!r} in {train} "
                              f"(trained: {', '.join(avail) or 'none'}).")
    if checkpoint not in ("best", "last"):
        raise ConfigError(f"--checkpoint must be best or last, got {checkpoint!r}")
    k, partition, cfg = _fold_for(model_dir, slide_id, fold)
    return model_dir, k, partition, cfg


def _partition_notes(slide_id: str, partition: str, fold: int) -> list[str]:
    if partition not in ("train", "none"):
        return []
    return [f"slide {slide_id} was in the {partition} partition of fold {fold}: the model "
            + ("trained on it" if partition == "train" else "never saw it in any fold")]


def _slide_file(grid: FeatureGrid, slide_path: str | os.PathLike[str] | None) -> Path | None:
    """The slide file given, else the one the feature grid records (None when it records none)."""
    if slide_path is not None:
        return Path(slide_path)
    return Path(grid.slide_path) if grid.slide_path else None


def _scores(checkpoint: Path, grid: FeatureGrid, device: str, per_class: bool,
            ) -> tuple[np.ndarray, np.ndarray | None]:
    """(N,) attention and, when asked and the model allows, (N, C) per-class shares of the logits."""
    from ..devices import resolve_device
    from ..models.checkpoint import load_checkpoint

    dev = str(resolve_device(device))
    net = load_checkpoint(checkpoint, dev)
    att = attention_on_grid(net, grid, dev)
    return att, class_contributions(net, grid, dev) if per_class else None


def heatmap(run_dir: str | os.PathLike[str], model: str, slide_id: str, *, fold: int | None = None,
            checkpoint: str = "best", slide_path: str | os.PathLike[str] | None = None,
            out_dir: str | os.PathLike[str] | None = None, thumbnail_px: int = 2048,
            device: str = "auto", style=None, per_class: bool | None = None) -> HeatmapResult:
    """Draw the attention of a trained model on one slide.

    Files (in ``out_dir``): ``<slide>.png`` (the overlay, the thumbnail's size), ``<slide>.geojson``
    (QuPath tiles with their attention), ``<slide>_figure.png`` (with a colour bar), ``<slide>_top<k>.png``
    and ``.csv`` (the k highest and lowest attended tiles with their level-0 coordinates), per-class maps
    ``<slide>_class-<name>.png`` and ``<slide>.json`` (what was drawn, with which parameters).

    Args:
        run_dir: the run folder.
        model: the model's folder name in ``RUN/train``.
        slide_id: the slide (its feature grid must exist).
        fold: which fold's model; default: the fold whose test partition holds the slide (so the model
            did not train on it), else validation, else training (noted).
        checkpoint: "best" (chosen on validation) or "last".
        slide_path: the slide file; default: the path recorded in the feature grid.
        out_dir: default ``RUN/heatmaps/<model>``.
        thumbnail_px: longer side of the PNG in pixels.
        device: where to run the model (auto, cpu, cuda, cuda:N).
        style: a :class:`~wsi2dmamba.heatmaps.figures.HeatmapStyle` (scaling, blur, colour bar,
            montage size).
        per_class: draw each class's share of its logit (:func:`class_contributions`); default: for
            models of more than two classes.

    Returns:
        The PNG and GeoJSON paths, the fold used and the per-tile attention.
    """
    from .figures import HeatmapStyle

    style = style or HeatmapStyle()
    run_dir = Path(run_dir)
    model_dir, k, partition, cfg = _model_and_fold(run_dir, model, slide_id, fold, checkpoint)
    notes = _partition_notes(slide_id, partition, k)
    from ..cohort.ledger import recorded_sha256
    from ..grid.guard import guard_grid_file

    features_file = _features_file(run_dir, cfg, slide_id)
    guard_grid_file(features_file, "features", recorded_sha256(features_file), writer="extract")
    grid = read_feature_grid(features_file)
    classes = [str(c) for c in cfg.get("classes") or []]
    params = heatmap_params(style, thumbnail_px, per_class)
    per_class = len(classes) > 2 if per_class is None else per_class
    att, contrib = _scores(layout.checkpoint_file(layout.fold_dir(model_dir, k), checkpoint), grid, device,
                           per_class and bool(classes))
    if per_class and contrib is None:
        notes.append(f"model {model!r} has no per-class maps (they need attention pooling into a linear head "
                     "and class labels)")

    out_dir = Path(out_dir or layout.heatmaps_dir(run_dir, model))
    names = layout.heatmap_files(out_dir, slide_id)
    geo_path = names["geojson"]
    write_text_atomic(geo_path, json.dumps(geojson_tiles(grid, att, model, contrib, classes)))

    path = _slide_file(grid, slide_path)
    thumb, downsample = _thumbnail(grid, path, slide_path is not None, thumbnail_px, notes)
    title = f"{slide_id} — {model}, fold {k} ({partition})"
    files = [geo_path] + _attention_pictures(names["stem"], thumb, downsample, grid, att, style, title,
                                             path, notes)
    if contrib is not None:
        files += _class_maps(names["stem"], thumb, downsample, grid, contrib, classes, style, title)
    png_path = names["png"]
    write_text_atomic(names["record"], json.dumps({
        "slide_id": slide_id, "model": model, "fold": k, "partition": partition, "checkpoint": checkpoint,
        "params": params, "files": [f.name for f in files],
        "notes": notes}, indent=1))
    return HeatmapResult(png_path, geo_path, k, partition, att, notes, files=files, contributions=contrib)


def _attention_pictures(stem: Path, thumb: np.ndarray, downsample: float, grid: FeatureGrid, att: np.ndarray,
                        style, title: str, slide_path: Path | None, notes: list[str]) -> list[Path]:
    """The overlay ``<stem>.png``, its figure with a colour bar, and the tile montage with its CSV."""
    from .figures import colorbar_figure, save_png, scale_scores

    unit, ends = scale_scores(att, style)
    img = draw_scores(thumb, downsample, grid, unit, style)
    files = [stem.with_name(f"{stem.name}.png")]
    save_png(files[0], img)
    label = {"rank": "attention rank (% of tiles below)",
             "percentile": f"attention (clipped to percentiles {style.clip[0]:g}–{style.clip[1]:g})",
             "linear": "attention"}[style.scale]
    if style.colorbar:
        files.append(stem.with_name(f"{stem.name}_figure.png"))
        colorbar_figure(files[-1], img, style, ends, title, label)
    if style.top_k and slide_path is not None and slide_path.exists():
        png = _montage(slide_path, grid, att, style.top_k, stem, title)
        files += [png, png.with_suffix(".csv")]
    elif style.top_k:
        notes.append("no tile montage: the slide file is not at hand (pass --slide-path)")
    return files


def _class_maps(stem: Path, thumb: np.ndarray, downsample: float, grid: FeatureGrid, contrib: np.ndarray,
                classes: list[str], style, title: str) -> list[Path]:
    """One map per class of the tiles' shares of its logit (diverging colours, 0 in the middle)."""
    from .figures import colorbar_figure, save_png

    files = []
    for c, name in enumerate(classes):
        v = contrib[:, c]
        bound = float(np.abs(v).max()) or 1.0
        img = draw_scores(thumb, downsample, grid, 0.5 + 0.5 * v / bound, style, "RdBu_r")
        files.append(stem.with_name(f"{stem.name}_class-{_safe(name)}.png"))
        save_png(files[-1], img)
        if style.colorbar:
            files.append(stem.with_name(f"{stem.name}_class-{_safe(name)}_figure.png"))
            colorbar_figure(files[-1], img, style, (-bound, bound), f"{title}: class {name}",
                            f"share of the logit of {name}", "RdBu_r")
    return files


def heatmap_params(style, thumbnail_px: int, per_class: bool | None) -> dict[str, Any]:
    """What decides a heatmap's pictures (a batch redraws a slide whose parameters changed)."""
    return {**style.to_dict(), "clip": list(style.clip), "thumbnail_px": int(thumbnail_px),
            "per_class": per_class}


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
