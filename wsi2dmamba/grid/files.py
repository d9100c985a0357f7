"""Read, write and validate tiles files and feature grid files.

A *tiles file* (``RUN/tiles/<slide_id>.h5``) holds where the tiles of one slide are; a *feature grid
file* (``RUN/features/<encoder>/<slide_id>.h5``) holds the same plus one feature vector per tile.

Layout (both files)::

    coords            (N, 2) int64   level-0 top-left (x, y) of each tile; CLAM/TRIDENT attributes
    tissue_fraction   (N,)   float32 fraction of the tile covered by tissue (from the tissue mask)
    grid/index        (N, 2) int32   (row, col) of each tile in the lattice
    grid/mask         (H, W) uint8   1 = a tissue tile is in that cell, 0 = no tissue (padding)
    features          (N, D) float32 or float16 (feature files only)
    blank             (N,)   uint8   1 = tile could not be decoded and a blank tile was encoded instead

Rows are in row-major (raster) order of their cells. Cell (r, c) has its top-left corner at level-0
``origin_level0 + (c, r) * stride_level0`` (rounded to integer pixels in ``coords``).
"""

from __future__ import annotations

import io
import math
import os
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import GridFileError
from ..fileio import atomic_path

FORMAT_NAME = "wsi2dmamba.grid"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class TileGrid:
    """The tiles of one slide on one lattice.

    Attributes:
        slide_id: the slide's identifier.
        coords: (N, 2) int64, level-0 pixel (x, y) of each tile's top-left corner.
        index: (N, 2) int32, (row, col) of each tile's cell; unique, row-major order.
        shape: (H, W) cells of the lattice, cropped to the tissue's bounding box.
        tissue_fraction: (N,) float32 in [0, 1].
        origin_level0: level-0 (x, y) of cell (0, 0)'s top-left corner (may be fractional).
        stride_level0: distance between neighbouring cells in level-0 pixels (may be fractional).
        tile_size_level0: side of a tile's field of view in level-0 pixels (may be fractional).
        tile_px: side of a tile in pixels at the target resolution.
        stride_px: stride in pixels at the target resolution (``tile_px - overlap``).
        mpp_requested: the µm per pixel asked for.
        mpp_effective: the µm per pixel of the tiles as delivered (equal to the request unless a level
            was read without resizing within tolerance).
        mpp_level0: µm per level-0 pixel of the slide.
        read_level: pyramid level the tiles are read from.
        read_downsample: downsample of that level relative to level 0.
        level0_size: (width, height) of level 0 in pixels.
        slide_path: the slide file.
        params_hash: hash of every parameter that shaped the file.
        extra_attrs: more provenance written as root attributes (JSON-able scalars).
    """

    slide_id: str
    coords: np.ndarray
    index: np.ndarray
    shape: tuple[int, int]
    tissue_fraction: np.ndarray
    origin_level0: tuple[float, float]
    stride_level0: float
    tile_size_level0: float
    tile_px: int
    stride_px: int
    mpp_requested: float
    mpp_effective: float
    mpp_level0: float
    read_level: int
    read_downsample: float
    level0_size: tuple[int, int]
    slide_path: str = ""
    params_hash: str = ""
    extra_attrs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "coords", np.asarray(self.coords, dtype=np.int64).reshape(-1, 2))
        object.__setattr__(self, "index", np.asarray(self.index, dtype=np.int32).reshape(-1, 2))
        object.__setattr__(self, "tissue_fraction", np.asarray(self.tissue_fraction, dtype=np.float32).reshape(-1))
        object.__setattr__(self, "shape", (int(self.shape[0]), int(self.shape[1])))

    @property
    def n_tiles(self) -> int:
        return int(self.coords.shape[0])

    @property
    def mask(self) -> np.ndarray:
        """(H, W) uint8: 1 where a tissue tile is."""
        m = np.zeros(self.shape, dtype=np.uint8)
        if self.n_tiles:
            m[self.index[:, 0], self.index[:, 1]] = 1
        return m

    @property
    def is_native_level(self) -> bool:
        """True when tiles are read at ``read_level`` without any resize (CLAM can then read them)."""
        return abs(self.tile_size_level0 / self.read_downsample - self.tile_px) < 1e-6

    def validate(self, source: str = "") -> None:
        """Raise :class:`GridFileError` if shapes, ranges or the lattice are inconsistent."""
        where = f" in {source}" if source else ""
        n = self.n_tiles
        problems = []
        if self.index.shape != (n, 2):
            problems.append(f"grid/index has shape {self.index.shape}, expected ({n}, 2)")
        if self.tissue_fraction.shape != (n,):
            problems.append(f"tissue_fraction has shape {self.tissue_fraction.shape}, expected ({n},)")
        h, w = self.shape
        if h < 0 or w < 0 or (n > 0 and (h == 0 or w == 0)):
            problems.append(f"grid shape {self.shape} is invalid for {n} tiles")
        if not problems and n:
            problems += self._lattice_problems()
        if problems:
            raise GridFileError(f"Invalid tile grid{where}: " + "; ".join(problems))

    def _lattice_problems(self) -> list[str]:
        """Cells inside the grid, one tile per cell in row-major order, tissue fractions in [0, 1]
        (shapes already checked, at least one tile)."""
        n, (h, w) = self.n_tiles, self.shape
        problems = []
        r, c = self.index[:, 0], self.index[:, 1]
        if r.min() < 0 or c.min() < 0 or r.max() >= h or c.max() >= w:
            problems.append(f"grid/index has cells outside the {h}×{w} grid")
        else:
            flat = r.astype(np.int64) * w + c
            if np.unique(flat).size != n:
                problems.append(f"{n - np.unique(flat).size} tile(s) share a cell with another tile")
            elif np.any(np.diff(flat) <= 0):
                problems.append("tiles are not in row-major order of their cells")
        if not np.all(np.isfinite(self.tissue_fraction)) or self.tissue_fraction.min() < 0 \
                or self.tissue_fraction.max() > 1 + 1e-6:
            problems.append("tissue_fraction has values outside [0, 1]")
        return problems


@dataclass(frozen=True)
class FeatureGrid(TileGrid):
    """A :class:`TileGrid` with one feature vector per tile.

    Attributes:
        features: (N, D) float32 or float16.
        encoder: name of the encoder that made the features.
        weights_sha256: sha256 of the encoder's weight file ("" when unknown, e.g. imported files).
        blank: (N,) bool, True where the tile could not be decoded and a blank tile was encoded.
    """

    features: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    encoder: str = ""
    weights_sha256: str = ""
    blank: np.ndarray | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        feats = np.asarray(self.features)
        if feats.dtype not in (np.float16, np.float32):
            feats = feats.astype(np.float32)
        object.__setattr__(self, "features", feats.reshape(feats.shape[0], -1) if feats.ndim != 2 else feats)
        blank = np.zeros(self.n_tiles, bool) if self.blank is None else np.asarray(self.blank, bool).reshape(-1)
        object.__setattr__(self, "blank", blank)

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[1])

    @classmethod
    def from_tiles(cls, tiles: TileGrid, features: np.ndarray, *, encoder: str, weights_sha256: str = "",
                   blank: np.ndarray | None = None, params_hash: str | None = None,
                   extra_attrs: dict[str, Any] | None = None) -> FeatureGrid:
        base = {f.name: getattr(tiles, f.name) for f in fields(TileGrid)}
        if params_hash is not None:
            base["params_hash"] = params_hash
        if extra_attrs:
            base["extra_attrs"] = {**tiles.extra_attrs, **extra_attrs}
        return cls(**base, features=features, encoder=encoder, weights_sha256=weights_sha256, blank=blank)

    def dense(self) -> tuple[np.ndarray, np.ndarray]:
        """The grid as arrays: features (H, W, D) with zeros at non-tissue cells, and mask (H, W) bool."""
        h, w = self.shape
        out = np.zeros((h, w, self.feature_dim), dtype=self.features.dtype)
        if self.n_tiles:
            out[self.index[:, 0], self.index[:, 1]] = self.features
        return out, self.mask.astype(bool)

    def validate(self, source: str = "") -> None:
        super().validate(source)
        where = f" in {source}" if source else ""
        if self.features.ndim != 2 or self.features.shape[0] != self.n_tiles:
            raise GridFileError(f"Invalid feature grid{where}: features has shape {self.features.shape}, "
                                f"expected ({self.n_tiles}, D)")
        if self.n_tiles and not np.all(np.isfinite(self.features)):
            bad = int((~np.isfinite(self.features)).any(axis=1).sum())
            raise GridFileError(f"Invalid feature grid{where}: {bad} tile(s) have NaN or inf features; "
                                "re-extract or re-import this slide")


# ----------------------------------------------------------------------------------------------- writing

def _coords_attrs(g: TileGrid) -> dict[str, Any]:
    """CLAM and TRIDENT attributes of the ``coords`` dataset (``grid-h5.md``)."""
    attrs: dict[str, Any] = {
        "patch_size": int(g.tile_px),
        "patch_size_level0": int(round(g.tile_size_level0)),
        # Floats from the true mpp (10 / mpp), so that TRIDENT's footprint
        # patch_size * level0_magnification / target_magnification is exactly ours, not a bucket's.
        "level0_magnification": float(10.0 / g.mpp_level0),
        "target_magnification": float(10.0 / g.mpp_effective),
        "overlap": int(g.tile_px - g.stride_px),
        "name": g.slide_id,
        # The cohort's slide id: TRIDENT copies these attributes into the feature files it writes (which it
        # names by the slide file's stem), so import-features can name the slide as the cohort does.
        "slide_id": g.slide_id,
        "savetodir": "",
        "save_path": "",
        "level0_width": int(g.level0_size[0]),
        "level0_height": int(g.level0_size[1]),
    }
    if g.is_native_level:
        # CLAM reads patch_size pixels at patch_level without resizing: only true for a native level.
        lw = int(round(g.level0_size[0] / g.read_downsample))
        lh = int(round(g.level0_size[1] / g.read_downsample))
        attrs.update({
            "patch_level": int(g.read_level),
            "downsample": np.array([g.read_downsample, g.read_downsample], dtype=np.float64),
            "downsampled_level_dim": np.array([lw, lh], dtype=np.int64),
            "level_dim": np.array([lw, lh], dtype=np.int64),
        })
    else:
        attrs["readers"] = ("TRIDENT and wsi2dmamba. Not CLAM's Whole_Slide_Bag_FP: the tiles are resized from "
                            "level 0, so there is no patch_level; `wsi2dmamba export-features --format clam` "
                            "writes them as level-0 patches with target_patch_size.")
    return attrs


def _root_attrs(g: TileGrid, kind: str) -> dict[str, Any]:
    from .. import __version__

    attrs = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "slide_id": g.slide_id,
        "slide_path": str(g.slide_path),
        "mpp_requested": float(g.mpp_requested),
        "mpp_effective": float(g.mpp_effective),
        "mpp_level0": float(g.mpp_level0),
        "tile_px": int(g.tile_px),
        "stride_px": int(g.stride_px),
        "tile_size_level0": float(g.tile_size_level0),
        "read_level": int(g.read_level),
        "read_downsample": float(g.read_downsample),
        "level0_width": int(g.level0_size[0]),
        "level0_height": int(g.level0_size[1]),
        "params_hash": g.params_hash,
        "software_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    for k, v in g.extra_attrs.items():
        attrs[f"x_{k}" if k in attrs else k] = v
    return attrs


def _write(path: str | os.PathLike[str], g: TileGrid, kind: str) -> None:
    import h5py

    g.validate(str(path))
    # The file is built in memory and written to disk in one plain write: a full disk or a quota then
    # fails as an ordinary OSError (atomic_path turns it into a clear error and leaves nothing behind),
    # while HDF5 itself, when a write fails as it closes a file, can crash the whole process.
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        for k, v in _root_attrs(g, kind).items():
            f.attrs[k] = v
        n = g.n_tiles
        d = f.create_dataset("coords", data=g.coords, dtype=np.int64, maxshape=(None, 2),
                             chunks=(max(1, min(n, 4096)), 2))
        for k, v in _coords_attrs(g).items():
            d.attrs[k] = v
        f.create_dataset("tissue_fraction", data=g.tissue_fraction, dtype=np.float32)
        grp = f.create_group("grid")
        grp.create_dataset("index", data=g.index, dtype=np.int32)
        grp.create_dataset("mask", data=g.mask, dtype=np.uint8, compression="gzip", compression_opts=1)
        grp.attrs["shape"] = np.array(g.shape, dtype=np.int64)
        grp.attrs["origin_level0"] = np.array(g.origin_level0, dtype=np.float64)
        grp.attrs["stride_level0"] = float(g.stride_level0)
        grp.attrs["tile_size_level0"] = float(g.tile_size_level0)
        grp.attrs["order"] = "row-major"
        if isinstance(g, FeatureGrid):
            dim = g.feature_dim
            fd = f.create_dataset("features", data=g.features, maxshape=(None, dim),
                                  chunks=(max(1, min(n, 1024)), max(dim, 1)) if n else None)
            fd.attrs["name"] = g.slide_id
            fd.attrs["savetodir"] = ""
            fd.attrs["encoder"] = g.encoder
            f.attrs["encoder"] = g.encoder
            f.attrs["weights_sha256"] = g.weights_sha256
            f.attrs["feature_dim"] = dim
            f.create_dataset("blank", data=g.blank.astype(np.uint8))
            f.attrs["n_blank_tiles"] = int(g.blank.sum())
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(buf.getbuffer())


def write_tile_grid(path: str | os.PathLike[str], grid: TileGrid) -> None:
    """Write a tiles file atomically (validated first)."""
    _write(path, grid, "tiles")


def write_feature_grid(path: str | os.PathLike[str], grid: FeatureGrid) -> None:
    """Write a feature grid file atomically (validated first)."""
    _write(path, grid, "features")


# ----------------------------------------------------------------------------------------------- reading
#
# Grid files are passed between labs, so a file is treated as untrusted: its layout, shapes, dtypes and
# sizes are checked from metadata before any array is read (no allocation driven by a forged shape), links
# to other files, virtual and externally stored datasets are refused (they would read data the file does
# not hold), and every h5py or numpy error while reading becomes a GridFileError naming the file.

#: Largest lattice (H × W cells) a file may declare; far above any slide (a 200k × 200k px slide at
#: 32 px stride has 4·10^7 cells) and small enough that a forged shape cannot exhaust memory.
MAX_GRID_CELLS = 1 << 26
#: Largest feature dimension a file may declare.
MAX_FEATURE_DIM = 1 << 16
#: How many times its stored size a dataset may expand to when read: deflate, the strongest compressor
#: HDF5 files use, cannot exceed about 1,032 to 1. A dataset (or a lattice, whose mask is stored) that
#: declares more than this many bytes per byte of file is forged: it is refused before any allocation.
MAX_EXPANSION = 1100

_REAL_KINDS = "fiub"


def _open(path: str | os.PathLike[str]):
    import h5py

    p = Path(path)
    if not p.is_file():
        raise GridFileError(f"Grid file not found: {p}")
    try:
        return h5py.File(p, "r")
    except OSError as exc:
        raise GridFileError(f"Cannot open {p} as HDF5 ({exc}); the file is damaged or not HDF5. "
                            "Delete it and rerun the stage that made it.") from exc


def _dataset(f, name: str, path: Path, required: bool = True):
    """The dataset ``name`` of ``f`` if it is stored in the file itself; None if absent and not required."""
    import h5py

    node = f
    parts = name.split("/")
    for i, part in enumerate(parts):
        link = node.get(part, getlink=True) if isinstance(node, h5py.Group) else None
        if link is None:
            if not required:
                return None
            raise GridFileError(f"{path} has no '{name}' dataset; it is not a complete wsi2dmamba grid file "
                                "(use `wsi2dmamba import-features` for CLAM or TRIDENT files).")
        if not isinstance(link, h5py.HardLink):
            raise GridFileError(f"{path}: '{'/'.join(parts[:i + 1])}' is a link ({type(link).__name__}), not data "
                                "stored in the file; only data a file holds itself is read. Refusing to read it.")
        node = node[part]
    if not isinstance(node, h5py.Dataset):
        raise GridFileError(f"{path}: '{name}' is a group, expected a dataset")
    if node.is_virtual or node.external:
        raise GridFileError(f"{path}: dataset '{name}' keeps its data outside the file (virtual or external "
                            "storage); refusing to read it.")
    return node


def _check_layout(ds, path: Path, name: str, shape: tuple, kinds: str = _REAL_KINDS) -> None:
    """Check dtype, shape (``shape`` may hold None for a free dimension) and declared size against the file."""
    if ds.dtype.kind not in kinds or ds.dtype.names is not None:
        raise GridFileError(f"{path}: dataset '{name}' has dtype {ds.dtype}, expected "
                            f"{'integers' if kinds == 'iu' else 'real numbers'}")
    if len(ds.shape) != len(shape) or any(e is not None and s != e for s, e in zip(ds.shape, shape)):
        want = "(" + ", ".join("*" if e is None else str(e) for e in shape) + ")"
        raise GridFileError(f"{path}: dataset '{name}' has shape {ds.shape}, expected {want}")
    _check_declared_size(ds, path, name)


def _check_declared_size(ds, path: Path, name: str) -> None:
    """Refuse a dataset that declares more bytes than the file can hold: all of its bytes if it is stored
    as is, :data:`MAX_EXPANSION` times them if it is compressed (a forged shape over unwritten chunks
    would otherwise be allocated in full, and read as zeros)."""
    declared = math.prod(ds.shape) * ds.dtype.itemsize
    size = path.stat().st_size
    filtered = ds.chunks is not None and ds.id.get_create_plist().get_nfilters() > 0
    room = size * (MAX_EXPANSION if filtered else 1)
    if declared > room:
        raise GridFileError(f"{path}: dataset '{name}' declares {ds.shape} {ds.dtype} ({declared / 1e6:,.1f} MB), "
                            f"more than a file of {size / 1e6:,.3f} MB can hold"
                            f"{' compressed' if filtered else ''}; the file is damaged or forged. It was not "
                            "read. Delete it and rerun the stage that made it.")


def _attrs(obj, keys_types: dict[str, str], path: Path, where: str) -> dict[str, Any]:
    """Read scalar attributes, each ``"int"``, ``"pos_int"``, ``"nonneg_int"``, ``"pos_float"``, ``"float"``
    or ``"str"``; raise GridFileError naming the attribute when missing or invalid."""
    out: dict[str, Any] = {}
    for key, kind in keys_types.items():
        if key not in obj.attrs:
            raise GridFileError(f"{path} lacks the {where}attribute '{key}'; rerun the stage that made it.")
        raw = obj.attrs[key]
        try:
            if kind == "str":
                value: Any = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
            else:
                arr = np.asarray(raw)
                if arr.size != 1 or arr.dtype.kind not in "fiub":
                    raise ValueError(f"not a number: {raw!r}")
                x = float(arr.reshape(()))
                if not np.isfinite(x):
                    raise ValueError(f"not finite: {x}")
                if "int" in kind:
                    if x != round(x) or abs(x) > 2**53:
                        raise ValueError(f"not an integer: {x}")
                    value = int(x)
                else:
                    value = x
                if kind.startswith("pos") and value <= 0 or kind.startswith("nonneg") and value < 0:
                    raise ValueError(f"must be {'> 0' if kind.startswith('pos') else '≥ 0'}, got {value}")
        except (ValueError, TypeError, UnicodeDecodeError) as exc:
            raise GridFileError(f"{path}: {where}attribute '{key}' is invalid ({exc}); rerun the stage "
                                "that made it.") from None
        out[key] = value
    return out


def _vector_attr(obj, key: str, n: int, path: Path, integer: bool) -> tuple:
    raw = obj.attrs.get(key) if key in obj.attrs else None
    arr = np.asarray(raw) if raw is not None else np.zeros(0)
    if arr.shape != (n,) or arr.dtype.kind not in ("iu" if integer else "fiu") or not np.all(np.isfinite(arr)):
        raise GridFileError(f"{path}: attribute 'grid/{key}' must be {n} {'integers' if integer else 'numbers'}, "
                            f"got {raw!r}; rerun the stage that made it.")
    return tuple(int(x) for x in arr) if integer else tuple(float(x) for x in arr)


def _read_common(f, path: Path) -> dict[str, Any]:
    import h5py

    fmt = f.attrs.get("format")
    fmt = fmt.decode("utf-8", "replace") if isinstance(fmt, bytes) else fmt
    if not isinstance(fmt, str) or fmt != FORMAT_NAME:
        raise GridFileError(f"{path} is not a wsi2dmamba grid file (attribute 'format' is {fmt!r}); use "
                            "`wsi2dmamba import-features` for CLAM/TRIDENT files.")
    version = _attrs(f, {"format_version": "nonneg_int"}, path, "")["format_version"]
    if version > FORMAT_VERSION:
        raise GridFileError(f"{path} was written by a newer wsi2dmamba (format version {version}); upgrade "
                            "wsi2dmamba to read it.")
    a = _attrs(f, {"slide_id": "str", "tile_px": "pos_int", "stride_px": "pos_int",
                   "mpp_requested": "pos_float", "mpp_effective": "pos_float", "mpp_level0": "pos_float",
                   "read_level": "nonneg_int", "read_downsample": "pos_float", "level0_width": "pos_int",
                   "level0_height": "pos_int"}, path, "")
    coords = _dataset(f, "coords", path)
    _check_layout(coords, path, "coords", (None, 2), "iu")
    n = coords.shape[0]
    index = _dataset(f, "grid/index", path)
    _check_layout(index, path, "grid/index", (n, 2), "iu")
    tf = _dataset(f, "tissue_fraction", path)
    _check_layout(tf, path, "tissue_fraction", (n,))
    grp = f["grid"]
    if not isinstance(grp, h5py.Group):
        raise GridFileError(f"{path}: 'grid' is not a group")
    shape = _vector_attr(grp, "shape", 2, path, integer=True)
    if min(shape) < 0 or shape[0] * shape[1] > MAX_GRID_CELLS or n > shape[0] * shape[1]:
        raise GridFileError(f"{path}: grid shape {shape} cannot hold {n} tiles (at most {MAX_GRID_CELLS} cells, "
                            "one tile per cell); the file is damaged or forged.")
    if shape[0] * shape[1] > MAX_EXPANSION * path.stat().st_size:
        raise GridFileError(f"{path}: grid shape {shape} has more cells than a file of {path.stat().st_size:,} "
                            "bytes can describe (its mask takes at least one byte per "
                            f"{MAX_EXPANSION} cells); the file is damaged or forged.")
    g = _attrs(grp, {"stride_level0": "pos_float", "tile_size_level0": "pos_float"}, path, "grid/")
    mask = _dataset(f, "grid/mask", path, required=False)
    if mask is not None:
        _check_layout(mask, path, "grid/mask", shape)
    kwargs = dict(
        slide_id=a["slide_id"],
        coords=np.asarray(coords[...], dtype=np.int64),
        index=np.asarray(index[...], dtype=np.int64),
        shape=shape,
        tissue_fraction=np.asarray(tf[...], dtype=np.float32),
        origin_level0=_vector_attr(grp, "origin_level0", 2, path, integer=False),
        stride_level0=g["stride_level0"],
        tile_size_level0=g["tile_size_level0"],
        tile_px=a["tile_px"],
        stride_px=a["stride_px"],
        mpp_requested=a["mpp_requested"],
        mpp_effective=a["mpp_effective"],
        mpp_level0=a["mpp_level0"],
        read_level=a["read_level"],
        read_downsample=a["read_downsample"],
        level0_size=(a["level0_width"], a["level0_height"]),
        slide_path=_attrs(f, {"slide_path": "str"}, path, "")["slide_path"] if "slide_path" in f.attrs else "",
        params_hash=_attrs(f, {"params_hash": "str"}, path, "")["params_hash"] if "params_hash" in f.attrs else "",
    )
    idx = kwargs["index"]
    if n and (idx.min() < 0 or idx[:, 0].max() >= shape[0] or idx[:, 1].max() >= shape[1]):
        raise GridFileError(f"{path}: grid/index has cells outside the {shape[0]}×{shape[1]} grid")
    if mask is not None:
        expect = np.zeros(shape, np.uint8)
        expect[idx[:, 0], idx[:, 1]] = 1
        if not np.array_equal(expect, (np.asarray(mask[...]) != 0).astype(np.uint8)):
            raise GridFileError(f"{path}: grid/mask does not match grid/index; the file is inconsistent")
    return kwargs


def _reading(path: Path, advice: str = "the file is damaged. Delete it and rerun the stage that made it."):
    """Turn any library error while reading into a GridFileError naming the file (and ``advice``)."""
    import contextlib

    @contextlib.contextmanager
    def guard():
        try:
            yield
        except GridFileError:
            raise
        except (OSError, KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:
            raise GridFileError(f"Cannot read {path} ({type(exc).__name__}: {exc}); {advice}") from exc

    return guard()


# The same checks for other untrusted HDF5 files (CLAM and TRIDENT feature files, when imported).
stored_dataset = _dataset
check_layout = _check_layout
reading_errors = _reading


def read_tile_grid(path: str | os.PathLike[str]) -> TileGrid:
    """Read and validate a tiles file (a feature grid file also reads as its tiles).

    Raises:
        GridFileError: the file is missing, damaged, not a grid file, or inconsistent (names the file).
    """
    path = Path(path)
    with _reading(path), _open(path) as f:
        g = TileGrid(**_read_common(f, path))
    g.validate(str(path))
    return g


def read_feature_grid(path: str | os.PathLike[str], *, dtype: Any = None) -> FeatureGrid:
    """Read and validate a feature grid file.

    Args:
        path: the ``.h5`` file.
        dtype: convert features to this numpy dtype (default: as stored).

    Raises:
        GridFileError: the file is missing, damaged, not a feature grid, or inconsistent, or holds NaN or
            inf features (names the file).
    """
    path = Path(path)
    with _reading(path), _open(path) as f:
        kwargs = _read_common(f, path)
        n = kwargs["coords"].shape[0]
        fd = _dataset(f, "features", path, required=False)
        if fd is None:
            raise GridFileError(f"{path} is a tiles file without features; run `wsi2dmamba extract` first.")
        _check_layout(fd, path, "features", (n, None), "f")
        if not 1 <= fd.shape[1] <= MAX_FEATURE_DIM:
            raise GridFileError(f"{path}: features have dimension {fd.shape[1]}, expected 1 to {MAX_FEATURE_DIM}")
        feats = np.asarray(fd[...])
        if dtype is not None:
            feats = feats.astype(dtype)
        bd = _dataset(f, "blank", path, required=False)
        blank = None
        if bd is not None:
            _check_layout(bd, path, "blank", (n,))
            blank = np.asarray(bd[...]).astype(bool)
        attrs = _attrs(f, {k: "str" for k in ("encoder", "weights_sha256") if k in f.attrs}, path, "")
        g = FeatureGrid(**kwargs, features=feats, encoder=attrs.get("encoder", ""),
                        weights_sha256=attrs.get("weights_sha256", ""), blank=blank)
    g.validate(str(path))
    return g


def check_grid_file(path: str | os.PathLike[str]) -> str | None:
    """What is wrong with a grid file (tiles or features, read and validated in full), or None."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            kind = f.attrs.get("kind", "")
            has_features = "features" in f
    except OSError as exc:
        return f"not a readable HDF5 file ({exc})"
    try:
        if kind == "features" or has_features:
            read_feature_grid(path)
        else:
            read_tile_grid(path)
    except GridFileError as exc:
        return str(exc)
    return None


def with_params_hash(grid: TileGrid, params_hash: str) -> TileGrid:
    """A copy of ``grid`` with another parameter hash."""
    return replace(grid, params_hash=params_hash)
