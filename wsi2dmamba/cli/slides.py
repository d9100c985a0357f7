"""Commands of the slide stages: ``segment``, ``tile``, and ``doctor`` (what is installed and usable)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..tiling.config import TileConfig
from ..tissue.config import SegmentConfig
from .common import (CohortOpt, ExecutorOpt, ForceOpt, OutOpt, QuietOpt, RayAddressOpt, ShardOpt,
                     SlidesDirOpt, WorkersOpt, cohort_from_args, config_options, process_count, report_summary,
                     run_options)

SlidesArg = Annotated[Optional[list[Path]], typer.Argument(
    help="Slide files (or DICOM folders) to process instead of a --cohort manifest; the slide id is the "
    "file name without its extension.", show_default=False)]
SlideMppOpt = Annotated[Optional[float], typer.Option(
    "--slide-mpp", help="µm per level-0 pixel of the slide files given on the command line (for slides "
    "whose metadata lacks it; in a manifest use the 'mpp' column).")]

# Segmentation options: None means "the SegmentConfig default", so defaults live in one place; the help
# shows them in brackets.
_SEG = SegmentConfig()
SegMppOpt = Annotated[Optional[float], typer.Option("--seg-mpp", help=f"µm/px of the image segmented "
                                                   f"[{_SEG.seg_mpp:g}].")]


class Threshold(str, Enum):
    """How the saturation threshold is chosen."""

    fixed = "fixed"
    otsu = "otsu"


ThresholdOpt = Annotated[Optional[Threshold], typer.Option("--threshold", help="A fixed saturation threshold or "
                                                           f"Otsu's [{_SEG.threshold}].", show_default=False)]
SatOpt = Annotated[Optional[int], typer.Option("--saturation-threshold", help="HSV saturation (0-255) above "
                                               f"which a pixel is tissue [{_SEG.saturation_threshold}].")]
MinValueOpt = Annotated[Optional[int], typer.Option("--min-value", help="Darker pixels (HSV value 0-255) are "
                                                    f"not tissue [{_SEG.min_value}].")]
MedianOpt = Annotated[Optional[float], typer.Option("--median-um", help=f"Median blur window in µm "
                                                  f"[{_SEG.median_um:g}].")]
CloseOpt = Annotated[Optional[float], typer.Option("--close-um", help=f"Morphological closing window "
                                                f"in µm [{_SEG.close_um:g}].")]
MinAreaOpt = Annotated[Optional[float], typer.Option("--min-tissue-area", help="Smallest piece of tissue "
                                                     f"kept, µm² [{_SEG.min_tissue_area_um2:g}].")]
MinHoleOpt = Annotated[Optional[float], typer.Option("--min-hole-area", help="Smallest hole kept, µm² "
                                                     f"[{_SEG.min_hole_area_um2:g}].")]
PenOpt = Annotated[Optional[bool], typer.Option("--remove-pen/--keep-pen", help="Remove red, green and blue "
                                                f"pen marks [{'remove' if _SEG.remove_pen else 'keep'}].")]
PenColorsOpt = Annotated[Optional[str], typer.Option("--pen-colors", help="Ink colours to remove, comma-"
                                                     "separated: red,green,blue.")]


def _segment_config(**given: Any):
    from ..tissue import SegmentConfig

    values = {k: v for k, v in given.items() if v is not None}
    if "pen_colors" in values:
        values["pen_colors"] = tuple(c.strip() for c in values["pen_colors"].split(",") if c.strip())
    return _validated(SegmentConfig, values)


def _validated(cls, values: dict[str, Any]):
    from ..validation import validated

    return validated(cls, values, "Invalid option(s)")


def segment(
    out: OutOpt,
    slides: SlidesArg = None,
    cohort: CohortOpt = None,
    workers: WorkersOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    shard: ShardOpt = None,
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    slides_dir: SlidesDirOpt = None,
    slide_mpp: SlideMppOpt = None,
    seg_mpp: SegMppOpt = None,
    threshold: ThresholdOpt = None,
    saturation_threshold: SatOpt = None,
    min_value: MinValueOpt = None,
    median_um: MedianOpt = None,
    close_um: CloseOpt = None,
    min_tissue_area: MinAreaOpt = None,
    min_hole_area: MinHoleOpt = None,
    remove_pen: PenOpt = None,
    pen_colors: PenColorsOpt = None,
) -> None:
    """Find the tissue on every slide: RUN/segment/<slide_id>.geojson (QuPath), _mask.png, _overlay.png."""
    from ..tissue import segment_cohort

    config = _segment_config(seg_mpp=seg_mpp, threshold=threshold.value if threshold else None,
                             saturation_threshold=saturation_threshold,
                             min_value=min_value, median_um=median_um, close_um=close_um,
                             min_tissue_area_um2=min_tissue_area, min_hole_area_um2=min_hole_area,
                             remove_pen=remove_pen, pen_colors=pen_colors)
    c = cohort_from_args(cohort, slides, slides_dir=slides_dir, mpp=slide_mpp)
    options = run_options(executor, ray_address, force=force, quiet=quiet, shard=shard,
                          workers=process_count(workers))
    summary = segment_cohort(c, out, config, options)
    report_summary(summary)


@config_options(TileConfig, exclude=("segment",), context="Invalid tiling options")
def tile(
    out: OutOpt,
    slides: SlidesArg = None,
    cohort: CohortOpt = None,
    workers: WorkersOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    shard: ShardOpt = None,
    executor: ExecutorOpt = "local",
    ray_address: RayAddressOpt = None,
    slides_dir: SlidesDirOpt = None,
    slide_mpp: SlideMppOpt = None,
    config: TileConfig = TileConfig(),
) -> None:
    """Tile every slide on one lattice at an exact µm/px: RUN/tiles/<slide_id>.h5 (+ _grid.png).

    Reads the contours of RUN/segment (made by `wsi2dmamba segment`, with the parameters recorded in
    RUN/segment/config.json; a GeoJSON edited in QuPath is used as it is).
    """
    from ..tiling import tile_cohort
    from ..tissue import SegmentConfig, read_segment_config

    config = config.model_copy(update={"segment": read_segment_config(out) or SegmentConfig()})
    c = cohort_from_args(cohort, slides, slides_dir=slides_dir, mpp=slide_mpp)
    options = run_options(executor, ray_address, force=force, quiet=quiet, shard=shard,
                          workers=process_count(workers))
    summary = tile_cohort(c, out, config, options)
    report_summary(summary)


# (distribution or module, what it is for, stages that cannot run without it)
_COMPONENTS = (
    ("openslide", "slide reading (OpenSlide library)", ("segment", "tile", "extract")),
    ("cv2", "image processing (OpenCV)", ("segment", "tile", "extract")),
    ("PIL", "PNG/JPEG images (Pillow)", ("segment", "tile")),
    ("tifffile", "plain TIFF images", ()),
    ("imagecodecs", "TIFF codecs (JPEG, JPEG 2000)", ()),
    ("h5py", "tiles and feature grid files (HDF5)", ("tile", "extract", "train")),
    ("torch", "feature extraction and models (PyTorch)", ("extract", "train", "evaluate")),
    ("timm", "encoders", ("extract",)),
    ("sklearn", "metrics and splits (scikit-learn)", ("train", "evaluate")),
    ("sksurv", "survival metrics (scikit-survival)", ("evaluate",)),
    ("matplotlib", "report plots", ("report",)),
    ("cupy", "2D selective-scan GPU kernels (optional: a PyTorch path runs on CPU)", ()),
    ("ray", "--executor ray (optional)", ()),
)


def _version(module: str) -> tuple[bool, str]:
    """(importable, version or the import error)."""
    import importlib

    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # a broken install can raise anything on import
        return False, f"missing ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    version = str(getattr(mod, "__version__", getattr(mod, "VERSION", "")) or "installed")
    if module == "openslide":
        version += f" (library {getattr(mod, '__library_version__', '?')})"
    elif module == "h5py":
        version += f" (HDF5 {mod.version.hdf5_version})"
    elif module == "imagecodecs":
        version += f" (JPEG 2000: {'yes' if getattr(mod, 'JPEG2K', None) and mod.JPEG2K.available else 'no'})"
    return True, version


def _gpu_lines() -> list[str]:
    lines = []
    try:
        import torch

        cuda = torch.version.cuda or "none (CPU build)"
        if torch.cuda.is_available():
            names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
            lines.append(f"torch CUDA {cuda}: {torch.cuda.device_count()} GPU(s): {names}")
        else:
            lines.append(f"torch CUDA {cuda}: no usable GPU (extraction and training run on the CPU, slowly)")
    except Exception as exc:
        lines.append(f"torch: cannot query CUDA ({type(exc).__name__})")
    try:
        import cupy

        n = cupy.cuda.runtime.getDeviceCount()
        rt = cupy.cuda.runtime.runtimeGetVersion()
        lines.append(f"CuPy CUDA runtime {rt // 1000}.{rt % 1000 // 10}: {n} GPU(s)")
    except Exception as exc:
        lines.append(f"CuPy: no GPU kernels ({type(exc).__name__}); the 2D scans use the PyTorch path")
    return lines


def doctor() -> None:
    """Show versions of OpenSlide, torch, CUDA/GPU and CuPy, and what is missing for which stage."""
    import platform

    from .. import __version__

    typer.echo(f"wsi2dmamba {__version__}, Python {platform.python_version()} on {platform.platform()}")
    missing: dict[str, list[str]] = {}
    for module, what, stages in _COMPONENTS:
        ok, version = _version(module)
        typer.echo(f"  {'ok ' if ok else 'NO '} {module:<12} {version:<40} {what}")
        if not ok:
            for st in stages:
                missing.setdefault(st, []).append(module)
    for line in _gpu_lines():
        typer.echo(f"  {line}")
    stages = ("segment", "tile", "extract", "train", "evaluate", "report")
    for st in stages:
        if st in missing:
            typer.secho(f"  {st:<9} cannot run: install {', '.join(missing[st])}", fg=typer.colors.RED)
        else:
            typer.echo(f"  {st:<9} ready")
    if missing:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("segment")(segment)
    app.command("tile")(tile)
    app.command("doctor")(doctor)
