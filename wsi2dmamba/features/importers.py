"""Turn existing CLAM or TRIDENT feature files into feature grid files.

Both tools store ``features`` (N, D) and ``coords`` (N, 2) level-0 top-left corners per slide, but no
lattice. Import puts every tile on one lattice for the whole slide:

* the stride comes from the attributes when they give it (TRIDENT: ``patch_size_level0`` and
  ``overlap``; CLAM patch files: ``patch_size`` × ``downsample``, CLAM's default step being one patch),
  else from the greatest common divisor of the coordinate differences;
* the origin is the smallest x and y of the tiles, so the grid is cropped to the tiles' bounding box;
* each tile goes to the cell nearest its corner. CLAM starts a separate grid at every tissue region,
  so its tiles can sit off the lattice by up to half a stride; how far is recorded
  (``import_max_offset_level0``), reported, and refused beyond ``max_offset`` of a stride. Two tiles in
  one cell are refused by default, with their count.
* CLAM does not store its step: patches made with overlap (CLAM's ``--step_size`` below the patch
  size) need ``step`` (pixels at the patch level), or their stride is taken for a patch size.

The resolution: TRIDENT stores magnifications (µm/px = 10 / magnification); CLAM stores none, so
``mpp`` (µm per level-0 pixel) must be given, for all slides or per slide (a cohort's ``mpp`` column).
What was assumed is recorded in the file.

The slide is named by the ``slide_id`` attribute of ``coords`` when the file carries one (files made by
TRIDENT from wsi2dmamba's tiles do), else by the file's stem.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .. import run_layout as layout
from ..errors import ConfigError, EmptyFeatureFile, GridFileError, WsiError
from ..fileio import ensure_writable, params_hash
from ..grid import FeatureGrid, write_feature_grid
from ..slide.mpp import mpp_problem

FORMATS = ("clam", "trident")
#: Largest distance of a tile's corner from its lattice cell, as a fraction of the stride, imported
#: without being told to.
MAX_OFFSET = 0.1
_MAX_COORD = 1 << 31  # level-0 pixels: far beyond any slide (the largest scans are about 2·10^5 px wide)




@dataclass(frozen=True)
class Lattice:
    """Cells of a set of tiles on one lattice.

    Attributes:
        index: (N, 2) int32 (row, col) of each tile, in the input's order.
        shape: (H, W) cells.
        origin: level-0 (x, y) of cell (0, 0).
        stride: level-0 pixels between neighbouring cells.
        max_offset: largest distance (level-0 pixels, per axis) from a tile's corner to its cell's corner.
        collisions: tiles that share a cell with an earlier tile.
    """

    index: np.ndarray
    shape: tuple[int, int]
    origin: tuple[float, float]
    stride: float
    max_offset: float
    collisions: int


def infer_stride(coords: np.ndarray, stride_hint: float | None = None) -> float:
    """Level-0 stride of the lattice the tiles lie on.

    ``stride_hint`` (from the attributes) wins when given. Otherwise the most common gap between
    neighbouring distinct x (and y) positions is the step; it is then refined over the widest span of
    positions, so that a fractional stride whose corners were rounded to integers (e.g. 448.9 px giving
    gaps of 449 and 448) is recovered.

    Raises:
        GridFileError: a single tile (or one row and column) without attributes.
    """
    if stride_hint is not None and stride_hint > 0:
        return float(stride_hint)
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    gaps, spans = [], []
    for axis in (0, 1):
        u = np.unique(coords[:, axis])
        d = np.diff(u)
        gaps.append(d[d > 0])
        spans.append(float(u[-1] - u[0]) if u.size else 0.0)
    allgaps = np.concatenate(gaps)
    if allgaps.size == 0:
        raise GridFileError("Cannot infer the tile stride: the tiles have no two distinct positions and the "
                            "file records no patch size. Pass the patch files with --coords-dir.")
    values, counts = np.unique(allgaps, return_counts=True)
    mode = int(values[counts.argmax()])
    near = allgaps[np.abs(allgaps - mode) <= 1]  # rounding of a fractional stride: mode ± 1
    step = float(near.mean())
    span = max(spans)
    n = max(1, int(round(span / step)))
    refined = span / n
    return refined if abs(refined - step) <= 1.0 else step


def place_on_lattice(coords: np.ndarray, stride: float) -> Lattice:
    """Cells of level-0 tile corners on a lattice of ``stride`` whose origin is their smallest x and y."""
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    if len(coords) == 0:
        return Lattice(np.zeros((0, 2), np.int32), (0, 0), (0.0, 0.0), float(stride), 0.0, 0)
    origin = coords.min(axis=0)
    cell = np.rint((coords - origin) / stride).astype(np.int64)  # (col, row)
    offset = float(np.abs(coords - (origin + cell * stride)).max())
    index = cell[:, ::-1].astype(np.int32)
    shape = (int(index[:, 0].max()) + 1, int(index[:, 1].max()) + 1)
    flat = index[:, 0].astype(np.int64) * shape[1] + index[:, 1]
    collisions = int(len(flat) - np.unique(flat).size)
    return Lattice(index, shape, (float(origin[0]), float(origin[1])), float(stride), offset, collisions)


def _attrs(ds) -> dict[str, Any]:
    out = {}
    for k, v in ds.attrs.items():
        if isinstance(v, bytes):
            v = v.decode("utf-8", "replace")
        out[k] = v
    return out


def _num(attrs: dict, key: str) -> float | None:
    """The attribute as a finite number, or None when it is absent, empty or not one number."""
    v = attrs.get(key)
    try:
        if v is None or isinstance(v, str):
            x = float(v) if v not in (None, "None", "") else None
        else:
            arr = np.asarray(v).reshape(-1)
            x = float(arr[0]) if arr.size and arr.dtype.kind in "fiub" else None  # CLAM: (x, y) downsample
    except (TypeError, ValueError, OverflowError):
        return None
    return x if x is not None and math.isfinite(x) else None


def _pair(attrs: dict, key: str, path: Path) -> tuple[float, float]:
    """The attribute as two positive finite numbers (e.g. CLAM's ``level_dim``)."""
    v = attrs.get(key)
    try:
        arr = np.asarray(v).reshape(-1)
        ok = arr.size == 2 and arr.dtype.kind in "fiu" and bool(np.all(np.isfinite(arr))) and bool(np.all(arr > 0))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise GridFileError(f"{path}: attribute {key!r} must be two positive numbers (width, height), got {v!r}; "
                            f"{_NOT_IMPORTABLE}")
    return float(arr[0]), float(arr[1])


def _text_attr(attrs: dict, key: str) -> str:
    """A text attribute ('' when absent or not text)."""
    v = attrs.get(key)
    if isinstance(v, np.ndarray) and v.size == 1:
        v = v.reshape(-1)[0]
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    return v.strip() if isinstance(v, str) else ""


@dataclass(frozen=True)
class Geometry:
    """What import knows about the tiles' size and resolution, and where each fact came from."""

    tile_px: int
    tile_size_level0: float
    stride_level0: float | None
    mpp_level0: float
    read_level: int
    read_downsample: float
    level0_size: tuple[int, int] | None
    assumed: tuple[str, ...]


def _geometry(fmt: str, attrs: dict, path: Path, mpp: float | None, step: float | None = None) -> Geometry:
    if fmt == "trident":
        return _trident_geometry(attrs, path, mpp, step)
    return _clam_geometry(attrs, path, mpp, step)


def _trident_patch(attrs: dict, path: Path) -> tuple[float, float, float | None]:
    """(patch size in pixels, its size in level-0 pixels, level-0 magnification) of TRIDENT's attributes."""
    ps = _num(attrs, "patch_size")
    ps0 = _num(attrs, "patch_size_level0")
    mag0 = _num(attrs, "level0_magnification")
    magt = _num(attrs, "target_magnification")
    if ps is None or (ps0 is None and not (mag0 and magt)):
        raise GridFileError(f"{path}: the coords dataset lacks TRIDENT's attributes (patch_size with "
                            "patch_size_level0 or the magnifications); import it with --format clam.")
    return ps, ps0 if ps0 is not None else ps * mag0 / magt, mag0


def _level0_size(attrs: dict) -> tuple[int, int] | None:
    w, h = _num(attrs, "level0_width"), _num(attrs, "level0_height")
    return (int(w), int(h)) if w and h else None


def _trident_geometry(attrs: dict, path: Path, mpp: float | None, step: float | None) -> Geometry:
    ps, ps0, mag0 = _trident_patch(attrs, path)
    overlap = _num(attrs, "overlap") or 0.0
    stride = ps0 * (step if step is not None else ps - overlap) / ps
    if mpp is None and not mag0:
        raise ConfigError(f"{path} records no level-0 magnification; pass --cohort with an mpp column, "
                          "or --slide-mpp (µm per level-0 pixel).")
    mpp0 = float(mpp) if mpp is not None else 10.0 / mag0
    return Geometry(int(round(ps)), float(ps0), float(stride), mpp0, 0, 1.0, _level0_size(attrs), ())


def _level0_from_level_dim(attrs: dict, ds: float, path: Path) -> tuple[int, int] | None:
    """Level-0 (width, height) from CLAM's ``level_dim`` of the patch level and its downsample."""
    if attrs.get("level_dim") is None:
        return None
    wd, hd = _pair(attrs, "level_dim", path)
    return int(round(wd * ds)), int(round(hd * ds))


def _clam_geometry(attrs: dict, path: Path, mpp: float | None, step: float | None) -> Geometry:
    """CLAM: attributes only when the patch file is given; never a resolution."""
    assumed: list[str] = []
    if mpp is None:
        raise ConfigError(f"CLAM files record no resolution; pass --cohort (its mpp column or slide files) or "
                          f"--slide-mpp with the µm per level-0 pixel of the "
                          f"slides ({path}).")
    ps = _num(attrs, "patch_size")
    level = _num(attrs, "patch_level")
    ds = _num(attrs, "downsample")
    custom = _num(attrs, "custom_downsample") or 1.0
    if ps is None:
        assumed.append("patch size = stride at level 0 (no patch file attributes; pass --coords-dir)")
        return Geometry(0, 0.0, float(step) if step else None, float(mpp), 0, 1.0, None, tuple(assumed))
    level = int(level or 0)
    ds = float(ds or 1.0)
    size0 = ps * ds * custom
    if step is None:
        assumed.append("step = patch size (CLAM's default; the step is not stored; pass --step otherwise)")
    stride0 = float(size0 if step is None else step * ds * custom)
    level0 = _level0_from_level_dim(attrs, ds, path)
    tile_px = int(round(ps / custom)) if custom != 1.0 else int(round(ps))
    return Geometry(tile_px, float(size0), stride0, float(mpp), level if custom == 1.0 else 0,
                    ds if custom == 1.0 else 1.0, level0, tuple(assumed))


_NOT_IMPORTABLE = "the file is damaged or not a CLAM or TRIDENT feature file."


def _guard(path: Path, kind: str) -> None:
    from ..grid.guard import guard_grid_file

    guard_grid_file(path, kind, None, writer="import-features")


def _read_feature_file(path: Path) -> tuple[np.ndarray, np.ndarray, dict, dict]:
    """(features (N, D), coords (N, 2), coords attributes, features attributes) of a CLAM/TRIDENT file.

    The file is untrusted: its datasets must be stored in it (no links to other files, no virtual or
    external storage), and their dtypes and shapes are checked from metadata before anything is read.
    """
    import h5py

    from ..grid.files import MAX_FEATURE_DIM, MAX_GRID_CELLS, check_layout, reading_errors, stored_dataset

    if not path.is_file():
        raise GridFileError(f"Feature file not found: {path}")
    _guard(path, "clam-features")  # before HDF5 reads it here
    with reading_errors(path, _NOT_IMPORTABLE), h5py.File(path, "r") as f:
        fd = stored_dataset(f, "features", path, required=False)
        cd = stored_dataset(f, "coords", path, required=False)
        if fd is None or cd is None:
            raise GridFileError(f"{path} has no 'features' and 'coords' datasets; it is not a CLAM or "
                                "TRIDENT feature file.")
        if fd.size == 0 or cd.size == 0:
            raise EmptyFeatureFile(f"{path}: no tiles (features of shape {fd.shape}); the slide has no tissue.")
        check_layout(cd, path, "coords", (None, 2), "iuf")
        n = cd.shape[0]
        if n > MAX_GRID_CELLS:
            raise GridFileError(f"{path}: {n} tiles, more than the {MAX_GRID_CELLS} a slide's grid may hold; "
                                "the file is damaged or forged.")
        # CLAM squeezes the features of a one-tile slide to (D,).
        check_layout(fd, path, "features", (None,) if fd.ndim == 1 and n == 1 else (n, None), "fiu")
        dim = fd.shape[-1]
        if not 1 <= dim <= MAX_FEATURE_DIM:
            raise GridFileError(f"{path}: features have dimension {dim}, expected 1 to {MAX_FEATURE_DIM}.")
        feats = np.asarray(fd[...]).reshape(n, dim)
        coords = np.asarray(cd[...])
        return feats, coords, _attrs(cd), _attrs(fd)


def _read_coords_attrs(path: Path) -> dict[str, Any]:
    """The attributes of the ``coords`` dataset of a patch file (also untrusted: stored in the file only)."""
    import h5py

    from ..grid.files import reading_errors, stored_dataset

    if not path.is_file():
        raise GridFileError(f"Patch file not found: {path}")
    _guard(path, "clam-patches")
    with reading_errors(path, "the patch file is damaged or not a CLAM or TRIDENT patch file."), \
            h5py.File(path, "r") as f:
        cd = stored_dataset(f, "coords", path, required=False)
        if cd is None:
            raise GridFileError(f"Patch file {path} has no 'coords' dataset; it is not a CLAM or TRIDENT "
                                "patch file.")
        return _attrs(cd)


def _slide_id(fmt: str, path: Path, attrs: dict) -> str:
    """The ``slide_id`` attribute of ``coords`` when present (the cohort's id), else the file's stem."""
    given = attrs.get("slide_id")
    if isinstance(given, str) and given.strip():
        return given.strip()
    stem = path.stem
    if fmt == "trident" and stem.endswith("_patches"):
        stem = stem[: -len("_patches")]
    return stem


def _check_finite(feats: np.ndarray, path: Path) -> None:
    if len(feats) and not np.all(np.isfinite(feats)):
        bad = int((~np.isfinite(feats)).any(axis=1).sum())
        raise GridFileError(f"{path}: {bad} of {len(feats)} tile(s) have NaN or inf features; re-extract this "
                            "slide's features (the file was not imported).")


def _check_options(fmt: str, on_collision: str, step: float | None, mpp: float | None) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"Unknown format {fmt!r}; use clam or trident.")
    if on_collision not in ("refuse", "keep-first"):
        raise ConfigError(f"--on-collision must be refuse or keep-first, not {on_collision!r}.")
    if step is not None and not (math.isfinite(step) and step > 0):
        raise ConfigError(f"--step must be a finite number > 0, got {step}.")
    if mpp is not None and mpp_problem(mpp):
        raise ConfigError(f"--mpp (µm per level-0 pixel): {mpp_problem(mpp)}.")


def _check_coords(coords: np.ndarray, path: Path) -> None:
    if coords.size and (not np.all(np.isfinite(coords)) or coords.min() < 0 or coords.max() >= _MAX_COORD):
        raise GridFileError(f"{path}: tile coordinates must be finite level-0 pixels from 0 to {_MAX_COORD - 1}; "
                            f"{_NOT_IMPORTABLE}")


def _check_geometry(geo: Geometry, path: Path) -> None:
    """The tile size, stride and resolution an import derived are plausible (else the file is damaged)."""
    problems = []
    if not 0 <= geo.tile_px <= 65536:
        problems.append(f"patch size {geo.tile_px} px")
    if not (math.isfinite(geo.tile_size_level0) and 0 <= geo.tile_size_level0 < _MAX_COORD):
        problems.append(f"patch size {geo.tile_size_level0} level-0 px")
    if geo.stride_level0 is not None and not (math.isfinite(geo.stride_level0) and 0 < geo.stride_level0 < _MAX_COORD):
        problems.append(f"step {geo.stride_level0} level-0 px")
    if mpp_problem(geo.mpp_level0):
        problems.append(f"resolution: {mpp_problem(geo.mpp_level0)}")
    if not (math.isfinite(geo.read_downsample) and 0 < geo.read_downsample < 1e6) or not 0 <= geo.read_level < 64:
        problems.append(f"level {geo.read_level} / downsample {geo.read_downsample}")
    if problems:
        raise GridFileError(f"{path}: implausible {'; '.join(problems)} (from its attributes, or --mpp); "
                            f"{_NOT_IMPORTABLE}")


def _kept_tiles(lat: Lattice, coords: np.ndarray, path: Path, slide_id: str, on_collision: str,
                max_offset: float, assumed: list[str]) -> tuple[np.ndarray, float]:
    """The tiles kept on the lattice (all, or the first of each cell) and their largest offset from their
    cell in level-0 pixels; refuses collisions (unless told) and offsets beyond ``max_offset`` of a stride."""
    stride = lat.stride
    keep = np.arange(len(coords))
    if lat.collisions:
        if on_collision == "refuse":
            raise GridFileError(
                f"{path}: {lat.collisions} tile(s) would share a grid cell with another tile on the lattice of "
                f"stride {stride:g} level-0 px (the tiles come from grids that do not line up, e.g. CLAM's "
                "per-region grids with overlap). Re-tile the slide with `wsi2dmamba tile`, or pass "
                "--on-collision keep-first to keep the first tile of each cell.")
        flat = lat.index[:, 0].astype(np.int64) * lat.shape[1] + lat.index[:, 1]
        _, first = np.unique(flat, return_index=True)
        keep = np.sort(first)
        assumed.append(f"{lat.collisions} colliding tile(s) dropped (kept the first of each cell)")
    offset = float(np.abs(coords[keep] - (np.asarray(lat.origin) + lat.index[keep][:, ::-1] * stride)).max()) \
        if len(keep) else 0.0
    if offset > max_offset * stride:
        raise GridFileError(
            f"{path}: slide {slide_id}: tiles sit up to {offset:g} level-0 px "
            f"({offset / stride:.0%} of the stride {stride:g}) off one lattice, more than the "
            f"{max_offset:.0%} accepted. The patches were made on several grids or with another step: pass "
            "--step with the step they were made with, or --max-offset to move them onto the lattice.")
    return keep, offset


def import_feature_file(path: str | os.PathLike[str], fmt: Literal["clam", "trident"], *,
                        mpp: float | None = None, coords_file: str | os.PathLike[str] | None = None,
                        encoder: str | None = None, on_collision: str = "refuse", step: float | None = None,
                        max_offset: float = MAX_OFFSET, mpp_by_slide: dict[str, float] | None = None,
                        ) -> FeatureGrid:
    """Read one CLAM or TRIDENT feature file as a feature grid.

    Args:
        path: the ``.h5`` with ``features`` (N, D) and ``coords`` (N, 2).
        fmt: ``"clam"`` or ``"trident"``.
        mpp: µm per level-0 pixel (required for CLAM; overrides TRIDENT's magnification).
        coords_file: the matching patch (coords) file whose ``coords`` attributes give the patch size
            and level (CLAM feature files have none).
        encoder: encoder name to record (default: the file's ``encoder`` attribute, else ``<fmt>-import``).
        on_collision: ``"refuse"`` (default) or ``"keep-first"`` when two tiles fall in one cell.
        step: CLAM's step between patches in pixels at the patch level (its ``--step_size``; default: the
            patch size), or TRIDENT's (default: patch size − overlap); level-0 pixels without attributes.
        max_offset: largest distance of a tile from its lattice cell, as a fraction of the stride,
            accepted; tiles further off are refused with the slide and the offset.
        mpp_by_slide: µm per level-0 pixel of each slide (e.g. a cohort's ``mpp`` column); wins over
            ``mpp`` for the slides it holds.

    Raises:
        GridFileError: unreadable, inconsistent or untrusted file (a link to another file, data stored
            outside it, NaN or inf features), tiles sharing a cell (with their count), or tiles off the
            lattice by more than ``max_offset``. :class:`EmptyFeatureFile` for a file without tiles.
        ConfigError: a needed resolution is missing.
    """
    path = Path(path)
    _check_options(fmt, on_collision, step, mpp)
    feats, coords, attrs, feat_attrs = _read_feature_file(path)
    if coords_file is not None:
        attrs = {**_read_coords_attrs(Path(coords_file)), **attrs}
    _check_finite(feats, path)
    _check_coords(coords, path)
    slide_id = _slide_id(fmt, path, attrs)
    mpp = float(mpp_by_slide[slide_id]) if mpp_by_slide and mpp_by_slide.get(slide_id) else mpp
    try:
        return _to_grid(path, fmt, feats, coords, attrs, feat_attrs, slide_id, mpp, encoder, on_collision, step,
                        max_offset)
    except (ValueError, TypeError, OverflowError, ZeroDivisionError, IndexError, FloatingPointError) as exc:
        # A combination of attributes and coordinates no check above foresaw: still this file's fault.
        raise GridFileError(f"{path}: its attributes and coordinates do not describe a tile lattice "
                            f"({type(exc).__name__}: {exc}); {_NOT_IMPORTABLE}") from exc


def _to_grid(path: Path, fmt: str, feats: np.ndarray, coords: np.ndarray, attrs: dict, feat_attrs: dict,
             slide_id: str, mpp: float | None, encoder: str | None, on_collision: str, step: float | None,
             max_offset: float) -> FeatureGrid:
    """The feature grid of a file's features and level-0 corners (see :func:`import_feature_file`)."""
    from ..grid.files import MAX_GRID_CELLS

    geo = _geometry(fmt, attrs, path, mpp, step)
    _check_geometry(geo, path)
    stride = infer_stride(coords, geo.stride_level0)
    assumed = list(geo.assumed)
    tile_px, size0 = geo.tile_px, geo.tile_size_level0
    if tile_px == 0:  # CLAM without attributes: a tile is one stride wide, read at level 0
        tile_px, size0 = int(round(stride)), float(stride)
    lat = place_on_lattice(coords, stride)
    if lat.shape[0] * lat.shape[1] > MAX_GRID_CELLS:
        raise GridFileError(f"{path}: its tiles span {lat.shape[0]}×{lat.shape[1]} cells of stride {stride:g} level-0 "
                            f"px, more than the {MAX_GRID_CELLS} a slide's grid may hold; {_NOT_IMPORTABLE}")
    keep, offset = _kept_tiles(lat, coords, path, slide_id, on_collision, max_offset, assumed)
    index = lat.index[keep]
    order = np.lexsort((index[:, 1], index[:, 0]))  # row-major order of cells
    sel = keep[order]
    index = index[order]
    level0 = geo.level0_size or (int(coords[:, 0].max() + size0), int(coords[:, 1].max() + size0))
    mpp_target = geo.mpp_level0 * size0 / tile_px
    enc = encoder or _text_attr(feat_attrs, "encoder") or f"{fmt}-import"
    extra = {
        "imported_from": str(path.resolve()),
        "imported_format": fmt,
        "import_max_offset_level0": offset,
        "import_collisions": int(lat.collisions),
        "import_assumptions": "; ".join(assumed) if assumed else "none",
        "tissue_fraction_known": False,
    }
    ph = params_hash({"import": fmt, "source": str(path.resolve()), "mpp": geo.mpp_level0, "stride": stride,
                      "on_collision": on_collision})
    return FeatureGrid(
        slide_id=slide_id, coords=coords[sel], index=index, shape=lat.shape,
        tissue_fraction=np.ones(len(sel), np.float32), origin_level0=lat.origin, stride_level0=stride,
        tile_size_level0=size0, tile_px=tile_px, stride_px=int(round(stride * tile_px / size0)),
        mpp_requested=mpp_target, mpp_effective=mpp_target, mpp_level0=geo.mpp_level0,
        read_level=geo.read_level, read_downsample=geo.read_downsample, level0_size=level0,
        slide_path="", params_hash=ph, extra_attrs=extra,
        features=feats[sel], encoder=enc, weights_sha256="")


def find_feature_files(src: str | os.PathLike[str]) -> list[Path]:
    """The ``.h5`` files of ``src`` (a file, or a folder searched one level deep)."""
    p = Path(src).expanduser()
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise ConfigError(f"{p} does not exist; give a feature file or a folder of them.")
    files = sorted(p.glob("*.h5"))
    if not files:
        raise ConfigError(f"{p} holds no .h5 files (CLAM keeps them in h5_files/, TRIDENT in features_<encoder>/).")
    return files


def offset_note(grid: FeatureGrid) -> str | None:
    """A warning when an imported grid's tiles were moved onto the lattice by more than rounding."""
    off = float(grid.extra_attrs.get("import_max_offset_level0", 0.0))
    if off <= 1.0:  # corners of a fractional stride rounded to whole pixels
        return None
    return (f"slide {grid.slide_id}: tiles moved up to {off:g} level-0 px ({off / grid.stride_level0:.1%} of the "
            "stride) onto the lattice")


@dataclass
class ImportSummary:
    """Outcome of an import: files written, slides without tiles, files refused (with the reason), and
    warnings (tiles moved onto the lattice)."""

    written: dict[str, Path]
    failed: dict[str, str]
    encoder: str
    empty: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"import-features: {len(self.written)} file(s) written to features/{self.encoder}, "
                f"{len(self.empty)} slide(s) without tiles, {len(self.failed)} refused")


def _coords_file(fp: Path, coords_dir: str | os.PathLike[str] | None) -> Path | None:
    if coords_dir is None:
        return None
    for name in (f"{fp.stem}.h5", f"{fp.stem}_patches.h5"):
        if (Path(coords_dir) / name).is_file():
            return Path(coords_dir) / name
    return None


def cohort_mpps(cohort) -> dict[str, float]:
    """µm per level-0 pixel of each slide of ``cohort``: the manifest's ``mpp`` column, else the slide
    file's metadata where the file is at hand."""
    from ..slide import open_slide

    out: dict[str, float] = {}
    for r in cohort.records:
        if r.mpp:
            out[r.slide_id] = float(r.mpp)
        elif r.path is not None and Path(r.path).exists():
            try:
                with open_slide(r.path) as slide:
                    out[r.slide_id] = float(slide.mpp)
            except WsiError:
                continue  # no µm/px in the file: --mpp, if given, applies
    return out


def import_features(src: str | os.PathLike[str], run_dir: str | os.PathLike[str],
                    fmt: Literal["clam", "trident"], *, mpp: float | None = None,
                    coords_dir: str | os.PathLike[str] | None = None, encoder: str | None = None,
                    on_collision: str = "refuse", step: float | None = None, max_offset: float = MAX_OFFSET,
                    cohort=None, progress: bool = False) -> ImportSummary:
    """Import every CLAM/TRIDENT feature file of ``src`` into ``RUN/features/<encoder>/<slide_id>.h5``.

    A file that cannot be imported is reported in ``failed`` and the others go on; a file without tiles
    (a slide without tissue) is listed in ``empty``. ``coords_dir`` is the folder of patch files
    (``<slide_id>.h5`` for CLAM, ``<slide_id>_patches.h5`` for TRIDENT). With ``cohort``, each slide's
    µm/px comes from the manifest's ``mpp`` column or the slide file (``mpp`` is the fallback). ``step``
    and ``max_offset``: see :func:`import_feature_file`.
    """
    from tqdm.auto import tqdm

    from .extract import feature_path

    summary = ImportSummary({}, {}, encoder or "")
    mpps = cohort_mpps(cohort) if cohort is not None else None
    files = find_feature_files(src)
    ensure_writable(layout.features_root(run_dir))
    for fp in tqdm(files, desc="import-features", unit="file", disable=not progress, dynamic_ncols=True):
        try:
            grid = import_feature_file(fp, fmt, mpp=mpp, coords_file=_coords_file(fp, coords_dir),
                                       encoder=encoder, on_collision=on_collision, step=step,
                                       max_offset=max_offset, mpp_by_slide=mpps)
            out = feature_path(run_dir, summary.encoder or grid.encoder, grid.slide_id)
            write_feature_grid(out, grid)
        except EmptyFeatureFile:
            summary.empty.append(fp.stem)
            continue
        except WsiError as exc:  # this file is refused, with its reason; the others go on
            summary.failed[fp.stem] = str(exc)
            continue
        summary.encoder = summary.encoder or grid.encoder
        summary.written[grid.slide_id] = out
        note = offset_note(grid)
        if note:
            summary.warnings.append(note)
    summary.encoder = summary.encoder or f"{fmt}-import"
    return summary
