"""The ``segment`` stage: every slide of a cohort → ``RUN/segment/<slide_id>.geojson`` + mask + overlay."""

from __future__ import annotations

import json
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

from .. import run_layout as layout
from .. import __version__
from ..cohort import Cohort, SlideRecord, SlideState, StageSummary, config_hash, read_state, run_stage
from ..cohort.options import RunOptions
from ..errors import SlideError, StageInputError
from ..fileio import atomic_path, write_json_atomic, write_text_atomic
from .config import SegmentConfig
from .geojson import dumps, to_geojson
from .pictures import mask_picture, overlay_picture, save_png
from .segment import THUMBNAIL_MAX_PX, TissueMap, TissueSegmenter

STAGE = "segment"
OVERLAY_MAX_PX = THUMBNAIL_MAX_PX
CONFIG_FILE = layout.STAGE_CONFIG


def segment_paths(run_dir: str | Path, slide_id: str) -> dict[str, Path]:
    """Output files of one slide: ``geojson``, ``mask`` (PNG at the segmentation level), ``overlay`` (PNG)."""
    return layout.segment_files(run_dir, slide_id)


def segment_outputs(record: SlideRecord, run_dir: Path) -> list[Path]:
    return list(segment_paths(run_dir, record.slide_id).values())


def segment_params_hash(config: SegmentConfig) -> str:
    """The hash written into every GeoJSON; the tile stage compares it with its own segment parameters."""
    return config_hash(STAGE, config)


def write_segmentation(paths: dict[str, Path], tissue: TissueMap, thumb, *, slide_id: str, slide_path: str,
                       mpp: float, mpp_source: str, config: SegmentConfig) -> None:
    """Write the mask and overlay pictures, then the GeoJSON (last, so it marks a complete slide)."""
    with atomic_path(paths["mask"]) as tmp:
        save_png(tmp, mask_picture(tissue))
    if thumb is not None:
        with atomic_path(paths["overlay"]) as tmp:
            save_png(tmp, overlay_picture(thumb, tissue, tissue.level0_size))
    if tissue.is_empty:
        return
    props = {"slide_id": slide_id, "slide_path": slide_path, "mpp_level0": mpp, "mpp_source": mpp_source,
             "params_hash": segment_params_hash(config), "params": config.model_dump(mode="json"),
             "software_version": __version__}
    write_text_atomic(paths["geojson"], dumps(to_geojson(tissue, properties=props)))


def segment_slide(record: SlideRecord, config: SegmentConfig, run_dir: Path) -> dict:
    """Work function of the stage (runs in a worker process)."""
    from ..slide import open_slide

    paths = segment_paths(run_dir, record.slide_id)
    with open_slide(record.path, mpp_override=record.mpp) as slide:
        tissue, thumb = TissueSegmenter(config).segment_with_thumbnail(slide, OVERLAY_MAX_PX)
        mpp, mpp_source = slide.mpp, slide.mpp_source
    paths["geojson"].unlink(missing_ok=True)  # a stale file from other parameters must not survive a failure
    write_segmentation(paths, tissue, thumb, slide_id=record.slide_id, slide_path=str(record.path), mpp=mpp,
                       mpp_source=mpp_source, config=config)
    if tissue.is_empty:
        raise SlideError(f"No tissue found on {record.path} (slide {record.slide_id!r}); see "
                         f"{paths['overlay']}. If there is tissue, lower --saturation-threshold or "
                         "--min-tissue-area, or check that this is a brightfield (H&E) slide.")
    return {"n_pieces": len(tissue.polygons), "n_holes": tissue.n_holes,
            "tissue_area_mm2": round(tissue.tissue_area_um2 / 1e6, 4), "mpp": mpp, "mpp_source": mpp_source,
            "pen_fraction": round(float(tissue.pen.mean()), 4) if tissue.pen is not None else 0.0}


def read_segment_config(run_dir: str | Path) -> SegmentConfig | None:
    """The segment parameters of the segmentation in ``run_dir`` (None when segment has not run there).

    ``RUN/segment/config.json`` holds the parameters of the last segment run that held the stage's lock.
    When none of the finished slides was made with them (that run was interrupted before finishing a
    slide, or the file is missing), the parameters the finished slides were made with are used, read from
    their GeoJSON: those are the contours a later stage can use.
    """
    run_dir = Path(run_dir)
    recorded = _read_config_file(layout.stage_config(run_dir, layout.SEGMENT_DIR))
    finished = [st for st in _segment_states(run_dir) if st.status == "done"]
    made_with = Counter(st.params_hash for st in finished)
    if recorded is not None and (not made_with or segment_params_hash(recorded) in made_with):
        return recorded
    for phash, _ in made_with.most_common():
        config = _params_of_finished(run_dir, [st for st in finished if st.params_hash == phash])
        if config is not None:
            return config
    return recorded


def _read_config_file(p: Path) -> SegmentConfig | None:
    if not p.is_file():
        return None
    try:
        return SegmentConfig.model_validate_json(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StageInputError(f"{p} is not a valid segment configuration ({exc}); delete it and rerun "
                              "`wsi2dmamba segment`.") from exc


def _segment_states(run_dir: Path) -> list[SlideState]:
    """The recorded states of the segment stage's slides (unreadable ones left out)."""
    paths = sorted(layout.state_dir(run_dir, layout.SEGMENT_DIR).glob("*.json"))
    return [st for st in (read_state(run_dir, layout.SEGMENT_DIR, p.stem) for p in paths) if st is not None]


def _params_of_finished(run_dir: Path, states: list[SlideState]) -> SegmentConfig | None:
    """The parameters the slides of ``states`` (all finished with one parameter hash) were made with,
    from the first of their GeoJSON files that records them."""
    for st in states:
        geo = segment_paths(run_dir, st.slide_id)["geojson"]
        try:
            meta = json.loads(geo.read_text(encoding="utf-8")).get("wsi2dmamba") or {}
            config = SegmentConfig.model_validate(meta.get("params"))
        except (OSError, ValueError, AttributeError):
            continue  # missing, edited or damaged: another slide may still say
        if segment_params_hash(config) == st.params_hash:
            return config
    return None


def _record_config(path: Path, data: dict) -> None:
    """Write the stage's parameters unless ``path`` already holds them (a rerun changes no file)."""
    try:
        if json.loads(path.read_text(encoding="utf-8")) == data:
            return
    except (OSError, ValueError):
        pass
    write_json_atomic(path, data)


def segment_cohort(cohort: Cohort, run_dir: str | Path, config: SegmentConfig | None = None,
                   options: RunOptions | None = None, **settings: Any) -> StageSummary:
    """Segment every slide of ``cohort`` into ``run_dir/segment`` (resumable; see :func:`run_stage`).

    ``options`` (or its fields as keywords, e.g. ``workers=4``) say how the stage runs (:class:`RunOptions`).

    The parameters are recorded in ``run_dir/segment/config.json`` once the stage's lock is held, so a
    run refused because another one is running leaves them as they are.
    """
    config = config or SegmentConfig()
    run_dir = Path(run_dir)
    record = partial(_record_config, layout.stage_config(run_dir, layout.SEGMENT_DIR), config.model_dump(mode="json"))
    return run_stage(STAGE, cohort, run_dir, config, segment_slide, segment_outputs,
                     RunOptions.of(options, **settings), on_locked=record,
                     editable=(".geojson",))  # contours are corrected by hand, e.g. in QuPath
