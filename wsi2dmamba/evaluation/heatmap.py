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

from ..errors import ConfigError, SlideError, StageInputError
from ..fileio import atomic_path, write_text_atomic
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


def _fold_for(model_dir: Path, slide_id: str, fold: int | None) -> tuple[int, str, dict[str, Any]]:
    """The fold to use: the given one, else the one whose test partition holds the slide."""
    configs = {}
    for d in sorted(model_dir.glob("fold_*")):
        if (d / "done.json").is_file():
            cfg = json.loads((d / "config.json").read_text())
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
        candidates.append(Path(cfg["features_dir"]) / f"{slide_id}.h5")
    if cfg.get("features"):
        candidates.append(run_dir / "features" / cfg["features"] / f"{slide_id}.h5")
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


def tile_boxes(grid: FeatureGrid) -> np.ndarray:
    """(N, 4) level-0 boxes (x0, y0, x1, y1) of the tiles, from the lattice's origin and stride."""
    ox, oy = grid.origin_level0
    x0 = ox + grid.index[:, 1] * grid.stride_level0
    y0 = oy + grid.index[:, 0] * grid.stride_level0
    s = grid.tile_size_level0
    return np.stack([x0, y0, x0 + s, y0 + s], axis=1)


def percentiles(values: np.ndarray) -> np.ndarray:
    """Rank of each value among all, scaled to 0–100 (ties share their mean rank)."""
    from scipy.stats import rankdata

    if values.size <= 1:
        return np.full(values.shape, 100.0)
    return (rankdata(values) - 1) / (values.size - 1) * 100.0


def geojson_tiles(grid: FeatureGrid, attention: np.ndarray, model_name: str) -> dict[str, Any]:
    """GeoJSON FeatureCollection of the tiles with their attention as QuPath measurements."""
    boxes = tile_boxes(grid)
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
                "measurements": {"attention": float(attention[i]), "attention_percentile": float(pct[i])},
            },
        })
    return {"type": "FeatureCollection", "features": feats,
            "properties": {"slide_id": grid.slide_id, "model": model_name, "coordinates": "level-0 pixels"}}


def overlay(thumb: np.ndarray, downsample: float, grid: FeatureGrid, values: np.ndarray, alpha: float = 0.5,
            cmap: str = "jet") -> np.ndarray:
    """Blend per-tile ``values`` in [0, 1] onto an RGB thumbnail.

    Args:
        thumb: (h, w, 3) uint8 thumbnail of the slide.
        downsample: level-0 pixels per thumbnail pixel.
        grid: the tiles (level-0 boxes).
        values: (N,) in [0, 1].
        alpha: opacity of the colour over tissue tiles.
    """
    import matplotlib

    colours = (matplotlib.colormaps[cmap](np.clip(values, 0, 1))[:, :3] * 255.0)
    img = thumb.astype(np.float32).copy()
    h, w = img.shape[:2]
    for (x0, y0, x1, y1), col in zip(tile_boxes(grid) / downsample, colours):
        c0, r0 = max(int(np.floor(x0)), 0), max(int(np.floor(y0)), 0)
        c1, r1 = min(int(np.ceil(x1)), w), min(int(np.ceil(y1)), h)
        if c1 > c0 and r1 > r0:
            img[r0:r1, c0:c1] = (1 - alpha) * thumb[r0:r1, c0:c1] + alpha * col
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def heatmap(run_dir: str | os.PathLike[str], model: str, slide_id: str, *, fold: int | None = None,
            checkpoint: str = "best", slide_path: str | os.PathLike[str] | None = None,
            out_dir: str | os.PathLike[str] | None = None, thumbnail_px: int = 2048,
            device: str = "cpu") -> HeatmapResult:
    """Draw the attention of a trained model on one slide.

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
        device: where to run the model.

    Returns:
        The PNG and GeoJSON paths, the fold used and the per-tile attention.
    """
    from PIL import Image

    from ..slide import open_slide
    from ..training.checkpoint import load_checkpoint

    run_dir = Path(run_dir)
    model_dir = run_dir / "train" / model
    if not model_dir.is_dir():
        avail = sorted(p.name for p in (run_dir / "train").glob("*") if p.is_dir() and p.name != "splits") \
            if (run_dir / "train").is_dir() else []
        raise StageInputError(f"No trained model {model!r} in {run_dir / 'train'} "
                              f"(trained: {', '.join(avail) or 'none'}).")
    if checkpoint not in ("best", "last"):
        raise ConfigError(f"--checkpoint must be best or last, got {checkpoint!r}")
    k, partition, cfg = _fold_for(model_dir, slide_id, fold)
    notes = []
    if partition in ("train", "none"):
        notes.append(f"slide {slide_id} was in the {partition} partition of fold {k}: the model "
                     + ("trained on it" if partition == "train" else "never saw it in any fold"))
    from ..cohort.ledger import recorded_sha256
    from ..grid.guard import guard_grid_file

    features_file = _features_file(run_dir, cfg, slide_id)
    guard_grid_file(features_file, "features", recorded_sha256(features_file), writer="extract")
    grid = read_feature_grid(features_file)
    net = load_checkpoint(model_dir / f"fold_{k}" / f"{checkpoint}.safetensors", device)
    att = attention_on_grid(net, grid, device)

    out_dir = Path(out_dir) if out_dir is not None else run_dir / "heatmaps" / model
    geo_path = out_dir / f"{slide_id}.geojson"
    write_text_atomic(geo_path, json.dumps(geojson_tiles(grid, att, model)))

    path = Path(slide_path) if slide_path is not None else (Path(grid.slide_path) if grid.slide_path else None)
    w0, h0 = grid.level0_size
    if path is not None and (path.exists() or slide_path is not None):
        with open_slide(path) as slide:
            thumb = slide.thumbnail(thumbnail_px)
            w0 = slide.dimensions[0]
    else:
        notes.append(f"slide file {path or '(none recorded)'} not found: attention drawn on a blank background "
                     "(pass --slide-path)")
        scale = max(w0, h0) / thumbnail_px
        thumb = np.full((max(1, round(h0 / scale)), max(1, round(w0 / scale)), 3), 255, np.uint8)
    if thumb.size == 0:
        raise SlideError(f"{path}: empty thumbnail")
    downsample = w0 / thumb.shape[1]
    img = overlay(thumb, downsample, grid, percentiles(att) / 100.0)
    png_path = out_dir / f"{slide_id}.png"
    with atomic_path(png_path) as tmp:
        Image.fromarray(img).save(tmp, format="PNG")
    return HeatmapResult(png_path, geo_path, k, partition, att, notes)
