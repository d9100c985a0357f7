"""Turn existing CLAM or TRIDENT feature files into feature grid files.

Both tools store ``features`` (N, D) and ``coords`` (N, 2) level-0 top-left corners per slide, but no
lattice. Import puts every tile on one lattice for the whole slide:

* the stride comes from the attributes when they give it (TRIDENT: ``patch_size_level0`` and
  ``overlap``; CLAM patch files: ``patch_size`` × ``downsample``, CLAM's default step being one patch),
  else from the greatest common divisor of the coordinate differences;
* the origin is the smallest x and y of the tiles, so the grid is cropped to the tiles' bounding box;
* each tile goes to the cell nearest its corner. CLAM starts a separate grid at every tissue region,
  so its tiles can sit off the lattice by up to half a stride; how far is recorded
  (``import_max_offset_level0``). Two tiles in one cell are refused by default, with their count.

The resolution: TRIDENT stores magnifications (µm/px = 10 / magnification); CLAM stores none, so
``mpp`` (µm per level-0 pixel) must be given. What was assumed is recorded in the file.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import ConfigError, GridFileError
from ..fileio import params_hash
from ..grid import FeatureGrid, write_feature_grid

FORMATS = ("clam", "trident")


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
    v = attrs.get(key)
    if v is None or isinstance(v, str):
        try:
            return float(v) if v not in (None, "None", "") else None
        except ValueError:
            return None
    arr = np.asarray(v, dtype=np.float64).reshape(-1)
    return float(arr[0]) if arr.size else None


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


def _geometry(fmt: str, attrs: dict, path: Path, mpp: float | None) -> Geometry:
    assumed: list[str] = []
    if fmt == "trident":
        ps = _num(attrs, "patch_size")
        ps0 = _num(attrs, "patch_size_level0")
        mag0 = _num(attrs, "level0_magnification")
        magt = _num(attrs, "target_magnification")
        if ps is None or (ps0 is None and not (mag0 and magt)):
            raise GridFileError(f"{path}: the coords dataset lacks TRIDENT's attributes (patch_size with "
                                "patch_size_level0 or the magnifications); import it with --format clam.")
        if ps0 is None:
            ps0 = ps * mag0 / magt
        overlap = _num(attrs, "overlap") or 0.0
        stride = ps0 * (ps - overlap) / ps
        if mpp is not None:
            mpp0 = float(mpp)
        elif mag0:
            mpp0 = 10.0 / mag0
        else:
            raise ConfigError(f"{path} records no level-0 magnification; pass --mpp (µm per level-0 pixel).")
        w, h = _num(attrs, "level0_width"), _num(attrs, "level0_height")
        level0 = (int(w), int(h)) if w and h else None
        return Geometry(int(round(ps)), float(ps0), float(stride), mpp0, 0, 1.0, level0, tuple(assumed))
    # CLAM: attributes only when the patch file is given; never a resolution.
    if mpp is None:
        raise ConfigError(f"CLAM files record no resolution; pass --mpp with the µm per level-0 pixel of the "
                          f"slides ({path}).")
    ps = _num(attrs, "patch_size")
    level = _num(attrs, "patch_level")
    ds = _num(attrs, "downsample")
    custom = _num(attrs, "custom_downsample") or 1.0
    if ps is None:
        assumed.append("patch size = stride at level 0 (no patch file attributes; pass --coords-dir)")
        return Geometry(0, 0.0, None, float(mpp), 0, 1.0, None, tuple(assumed))
    level = int(level or 0)
    ds = float(ds or 1.0)
    size0 = ps * ds * custom
    assumed.append("step = patch size (CLAM's default; the step is not stored)")
    lvl_dim = attrs.get("level_dim")
    level0 = None
    if lvl_dim is not None:
        wd, hd = np.asarray(lvl_dim, dtype=np.float64).reshape(-1)[:2]
        level0 = (int(round(wd * ds)), int(round(hd * ds)))
    tile_px = int(round(ps / custom)) if custom != 1.0 else int(round(ps))
    return Geometry(tile_px, float(size0), float(size0), float(mpp), level if custom == 1.0 else 0,
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
    stem = path.stem
    if fmt == "trident" and stem.endswith("_patches"):
        stem = stem[: -len("_patches")]
    return stem


def import_feature_file(path: str | os.PathLike[str], fmt: Literal["clam", "trident"], *,
                        mpp: float | None = None, coords_file: str | os.PathLike[str] | None = None,
                        encoder: str | None = None, on_collision: str = "refuse") -> FeatureGrid:
    """Read one CLAM or TRIDENT feature file as a feature grid.

    Args:
        path: the ``.h5`` with ``features`` (N, D) and ``coords`` (N, 2).
        fmt: ``"clam"`` or ``"trident"``.
        mpp: µm per level-0 pixel (required for CLAM; overrides TRIDENT's magnification).
        coords_file: the matching patch (coords) file whose ``coords`` attributes give the patch size
            and level (CLAM feature files have none).
        encoder: encoder name to record (default: the file's ``encoder`` attribute, else ``<fmt>-import``).
        on_collision: ``"refuse"`` (default) or ``"keep-first"`` when two tiles fall in one cell.

    Raises:
        GridFileError: unreadable, inconsistent or untrusted file (a link to another file, data stored
            outside it, NaN or inf features), or tiles sharing a cell (with their count).
        ConfigError: a needed resolution is missing.
    """
    path = Path(path)
    if fmt not in FORMATS:
        raise ConfigError(f"Unknown format {fmt!r}; use clam or trident.")
    if on_collision not in ("refuse", "keep-first"):
        raise ConfigError(f"--on-collision must be refuse or keep-first, not {on_collision!r}.")
    feats, coords, attrs, feat_attrs = _read_feature_file(path)
    if coords_file is not None:
        attrs = {**_read_coords_attrs(Path(coords_file)), **attrs}
    if len(feats) and not np.all(np.isfinite(feats)):
        bad = int((~np.isfinite(feats)).any(axis=1).sum())
        raise GridFileError(f"{path}: {bad} of {len(feats)} tile(s) have NaN or inf features; re-extract this "
                            "slide's features (the file was not imported).")
    geo = _geometry(fmt, attrs, path, mpp)
    stride = infer_stride(coords, geo.stride_level0)
    assumed = list(geo.assumed)
    tile_px, size0 = geo.tile_px, geo.tile_size_level0
    if tile_px == 0:  # CLAM without attributes: a tile is one stride wide, read at level 0
        tile_px, size0 = int(round(stride)), float(stride)
    lat = place_on_lattice(coords, stride)
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
    index = lat.index[keep]
    order = np.lexsort((index[:, 1], index[:, 0]))  # row-major order of cells
    sel = keep[order]
    index = index[order]
    slide_id = _slide_id(fmt, path, feat_attrs or attrs)
    level0 = geo.level0_size or (int(coords[:, 0].max() + size0), int(coords[:, 1].max() + size0))
    mpp_target = geo.mpp_level0 * size0 / tile_px
    enc = encoder or str(feat_attrs.get("encoder") or "") or f"{fmt}-import"
    extra = {
        "imported_from": str(path.resolve()),
        "imported_format": fmt,
        "import_max_offset_level0": float(lat.max_offset),
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


@dataclass
class ImportSummary:
    """Outcome of an import: files written and files refused, with the reason."""

    written: dict[str, Path]
    failed: dict[str, str]
    encoder: str

    def line(self) -> str:
        return (f"import-features: {len(self.written)} file(s) written to features/{self.encoder}, "
                f"{len(self.failed)} refused")


def import_features(src: str | os.PathLike[str], run_dir: str | os.PathLike[str],
                    fmt: Literal["clam", "trident"], *, mpp: float | None = None,
                    coords_dir: str | os.PathLike[str] | None = None, encoder: str | None = None,
                    on_collision: str = "refuse") -> ImportSummary:
    """Import every CLAM/TRIDENT feature file of ``src`` into ``RUN/features/<encoder>/<slide_id>.h5``.

    A file that cannot be imported is reported in ``failed`` and the others go on. ``coords_dir`` is the
    folder of patch files (``<slide_id>.h5`` for CLAM, ``<slide_id>_patches.h5`` for TRIDENT).
    """
    from .extract import feature_path

    written: dict[str, Path] = {}
    failed: dict[str, str] = {}
    enc_used = encoder or ""
    from ..errors import WsiError

    for fp in find_feature_files(src):
        cf = None
        if coords_dir is not None:
            for name in (f"{fp.stem}.h5", f"{fp.stem}_patches.h5"):
                if (Path(coords_dir) / name).is_file():
                    cf = Path(coords_dir) / name
                    break
        try:
            grid = import_feature_file(fp, fmt, mpp=mpp, coords_file=cf, encoder=encoder,
                                       on_collision=on_collision)
            out = feature_path(run_dir, enc_used or grid.encoder, grid.slide_id)
            write_feature_grid(out, grid)
        except WsiError as exc:  # this file is refused, with its reason; the others go on
            failed[fp.stem] = str(exc)
            continue
        enc_used = enc_used or grid.encoder
        written[grid.slide_id] = out
    return ImportSummary(written, failed, enc_used or f"{fmt}-import")
