"""The ``tile`` stage: tissue contours of every slide → ``RUN/tiles/<slide_id>.h5`` + a picture of the grid."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from .. import run_layout as layout
from ..cohort import Cohort, SlideRecord, StageSummary, config_hash, read_state, run_stage
from ..cohort.ledger import write_state
from ..cohort.options import RunOptions
from ..cohort.shards import select_shard
from ..errors import SlideError, StageInputError
from ..fileio import atomic_path, params_hash
from ..grid import write_tile_grid
from ..tissue.config import SegmentConfig
from ..tissue.geojson import read_geojson
from ..tissue.pictures import load_rgb, save_png
from ..tissue.segment import TissueSegmenter
from ..tissue.stage import (OVERLAY_MAX_PX, read_segment_config, segment_params_hash, segment_paths,
                            write_segmentation)
from .config import TileConfig
from .pictures import grid_picture
from .tiler import Tiler

STAGE = "tile"
FOLDER = layout.TILES_DIR

log = logging.getLogger(__name__)


def tile_paths(run_dir: str | Path, slide_id: str) -> dict[str, Path]:
    """Output files of one slide: ``h5`` (the tiles file) and ``picture`` (PNG of the grid)."""
    return layout.tiles_files(run_dir, slide_id)


def tile_outputs(record: SlideRecord, run_dir: Path) -> list[Path]:
    return list(tile_paths(run_dir, record.slide_id).values())


def _tissue_for(record: SlideRecord, slide, config: TileConfig, run_dir: Path):
    """The slide's tissue map from the run's GeoJSON (or a fresh segmentation when allowed).

    Returns (tissue, how it was obtained).
    """
    geo = segment_paths(run_dir, record.slide_id)["geojson"]
    expected = segment_params_hash(config.segment)
    if geo.is_file():
        tissue, meta = read_geojson(geo, level0_size=slide.dimensions, mpp=slide.mpp,
                                    default_seg_mpp=config.segment.seg_mpp)
        found = meta.get("params_hash")
        if found is None:  # edited and exported by hand (e.g. QuPath): used as given
            return tissue, "geojson (edited)"
        if found == expected:
            return tissue, "geojson"
        if not config.segment_missing:
            raise StageInputError(
                f"{geo} was made with other segmentation parameters (hash {found}, expected {expected}); "
                "rerun `wsi2dmamba segment` on this run folder, or pass --segment-missing to segment again here.")
    elif not config.segment_missing:
        st = read_state(run_dir, layout.SEGMENT_DIR, record.slide_id)
        why = f" (segmentation failed: {st.reason})" if st is not None and st.status == "failed" else ""
        raise StageInputError(f"No tissue contours for slide {record.slide_id!r}{why}: {geo} does not exist. "
                              "Run `wsi2dmamba segment` first, or pass --segment-missing.")
    tissue, thumb = TissueSegmenter(config.segment).segment_with_thumbnail(slide, OVERLAY_MAX_PX)
    # Written like the segment stage does, so the contours can be looked at and edited.
    write_segmentation(segment_paths(run_dir, record.slide_id), tissue, thumb, slide_id=record.slide_id,
                       slide_path=str(record.path), mpp=slide.mpp, mpp_source=slide.mpp_source,
                       config=config.segment)
    return tissue, "segmented while tiling"


def tile_slide(record: SlideRecord, config: TileConfig, run_dir: Path) -> dict:
    """Work function of the stage (runs in a worker process)."""
    from ..slide import open_slide

    paths = tile_paths(run_dir, record.slide_id)
    with open_slide(record.path, mpp_override=record.mpp) as slide:
        tissue, source = _tissue_for(record, slide, config, Path(run_dir))
        if tissue.is_empty:
            raise SlideError(f"No tissue on slide {record.slide_id!r} ({record.path}); nothing to tile.")
        extra = {"tissue_source": source, "segment_params_hash": segment_params_hash(config.segment),
                 "min_tissue": float(config.min_tissue), "mpp_source": slide.mpp_source,
                 "tissue_area_um2": round(tissue.tissue_area_um2, 1)}
        grid = Tiler(config).tile(slide, tissue, slide_id=record.slide_id,
                                  params_hash=config_hash(STAGE, config), extra_attrs=extra)
        if grid.n_tiles == 0:
            raise SlideError(f"Slide {record.slide_id!r}: no tile of {config.tile_px} px at {config.mpp} µm/px "
                             f"holds at least {config.min_tissue:.0%} tissue; lower --min-tissue or --tile-px.")
        # The segmentation overlay is this slide's thumbnail with its contours: drawing the tiles over it
        # shows both, and spares reading the slide again.
        thumb = load_rgb(segment_paths(run_dir, record.slide_id)["overlay"])
        expect = slide.downsampled_size(max(max(slide.dimensions) / OVERLAY_MAX_PX, 1.0))
        if thumb is None or (thumb.shape[1], thumb.shape[0]) != expect:
            thumb = slide.thumbnail(OVERLAY_MAX_PX)
    write_tile_grid(paths["h5"], grid)
    with atomic_path(paths["picture"]) as tmp:
        save_png(tmp, grid_picture(thumb, grid))
    return {"n_tiles": grid.n_tiles, "grid_shape": list(grid.shape), "mpp_effective": grid.mpp_effective,
            "read_level": grid.read_level, "tissue_source": source}


def tile_cohort(cohort: Cohort, run_dir: str | Path, config: TileConfig | None = None,
                options: RunOptions | None = None, **settings: Any) -> StageSummary:
    """Tile every slide of ``cohort`` into ``run_dir/tiles`` (resumable; see :func:`run_stage`).

    ``options`` (or its fields as keywords, e.g. ``workers=4``) say how the stage runs (:class:`RunOptions`).

    Without ``config``, the segmentation parameters recorded by the segment stage in ``run_dir`` (or the
    defaults) are used with default tiling parameters.
    """
    run_dir = Path(run_dir)
    if config is None:
        config = TileConfig(segment=read_segment_config(run_dir) or SegmentConfig())
    options = RunOptions.of(options, **settings)
    mine = select_shard(cohort, options.shard) if options.shard is not None else cohort
    return run_stage(STAGE, cohort, run_dir, config, tile_slide, tile_outputs, options, stage_dir=FOLDER,
                     on_locked=lambda: adopt_hashes_with_segment_missing(mine, run_dir, config))


def adopt_hashes_with_segment_missing(cohort: Cohort, run_dir: Path, config: TileConfig) -> list[str]:
    """Give today's parameter hash to the finished slides whose recorded hash counted ``segment_missing``.

    ``segment_missing`` is a runtime field, so it is not hashed; states recorded when it was hashed (with
    either value) are the same tiles and keep them. The tiles files keep the hash they were written with,
    which their feature files were made from, so no slide is tiled or extracted again. Returns the slide ids
    whose state was rewritten (one line says how many).
    """
    data = config.model_dump(mode="json")
    counted = {params_hash({"stage": STAGE, "config": {**data, "segment_missing": v}}) for v in (False, True)}
    today = config_hash(STAGE, config)
    adopted = []
    for rec in cohort:
        st = read_state(run_dir, FOLDER, rec.slide_id)
        if st is not None and st.status == "done" and st.params_hash in counted:
            write_state(run_dir, dataclasses.replace(st, params_hash=today))
            adopted.append(rec.slide_id)
    if adopted:
        log.warning("tile: %d finished slide(s) were recorded with a parameter hash that counted "
                    "--segment-missing; their tiles are kept and their states now carry hash %s",
                    len(adopted), today)
    return adopted
