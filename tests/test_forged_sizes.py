"""Small files that declare huge sizes are refused from their headers, before any allocation: grid files
whose datasets or lattice cannot fit in the file, and plain images (strip TIFF, PNG) of gigapixels.

Each file is opened in a child process whose address space is capped (``RLIMIT_AS``); the child reports
the error it got and its peak resident memory (``VmHWM``), which must stay far below what the declared
sizes need."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from wsi2dmamba.grid import write_feature_grid
from wsi2dmamba.grid.files import MAX_EXPANSION

pytest_plugins = ["conftest_reliability"]

ROOT = Path(__file__).resolve().parents[1]
ADDRESS_SPACE_CAP = 2 << 30  # the child may map 2 GiB in all: the declared sizes need more
PEAK_RSS_MB = 400

_CHILD = """
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap}))
from wsi2dmamba.errors import WsiError
from wsi2dmamba.grid import read_feature_grid
from wsi2dmamba.slide import open_slide
t = time.perf_counter()
try:
    if sys.argv[1] == "grid":
        read_feature_grid(sys.argv[2])
    else:
        open_slide(sys.argv[2], mpp_override=0.5).close()
    err = ("none", "")
except WsiError as exc:
    err = (type(exc).__name__, str(exc))
except MemoryError as exc:
    err = ("MemoryError", str(exc))
# VmHWM is the peak of this process's own memory; ru_maxrss would also count the parent's (kept across exec).
try:
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
except OSError:
    hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"error": err[0], "message": err[1], "seconds": time.perf_counter() - t, "peak_mb": hwm / 1024}}))
"""


def _open_in_capped_child(kind: str, path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _CHILD.format(cap=ADDRESS_SPACE_CAP), kind, str(path)], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _grid(n_rows=4, n_cols=4, dim=8):
    from test_bad_input import _feature_grid

    return _feature_grid(dim=dim, n_rows=n_rows, n_cols=n_cols)


def _forged_grid(path: Path, *, lattice_only: bool = False) -> None:
    """A valid feature grid file whose datasets are replaced by chunked ones of 2^26 - 1 tiles that hold
    no chunk at all (read as zeros), on an 8192 × 8192 lattice: about 20 KB that declare over 4 GB.
    With ``lattice_only`` only the lattice's shape attribute is forged (no mask)."""
    write_feature_grid(path, _grid())
    n = (1 << 26) - 1
    with h5py.File(path, "r+") as f:
        f["grid"].attrs["shape"] = np.array([8192, 8192])
        del f["grid/mask"]
        if lattice_only:
            return
        for name, dtype, shape in (("coords", np.int64, (n, 2)), ("grid/index", np.int32, (n, 2)),
                                   ("tissue_fraction", np.float32, (n,)), ("features", np.float32, (n, 8)),
                                   ("blank", np.uint8, (n,))):
            del f[name]
            f.create_dataset(name, shape=shape, dtype=dtype, chunks=True)
        f.create_dataset("grid/mask", shape=(8192, 8192), dtype=np.uint8, chunks=True, compression="gzip")


@pytest.mark.parametrize("lattice_only", [False, True], ids=["datasets", "lattice"])
def test_forged_grid_sizes_are_refused_before_allocating(tmp_path, lattice_only, counts):
    p = tmp_path / "forged.h5"
    _forged_grid(p, lattice_only=lattice_only)
    assert p.stat().st_size < 40_000
    counts("inputs")
    out = _open_in_capped_child("grid", p)
    assert out["error"] == "GridFileError", out
    assert str(p) in out["message"] and "damaged or forged" in out["message"]
    assert ("more than a file of" in out["message"]) != lattice_only
    assert out["peak_mb"] < PEAK_RSS_MB and out["seconds"] < 5, out


def test_compressed_grid_files_within_the_expansion_bound_still_read(tmp_path):
    """The control: a real file whose mask compresses well (a sparse lattice) is not refused."""
    from wsi2dmamba.grid import FeatureGrid, read_feature_grid

    rng = np.random.default_rng(0)
    cells = np.sort(rng.choice(2000 * 2000, size=300, replace=False))
    index = np.stack([cells // 2000, cells % 2000], 1)
    g = _grid()
    sparse = FeatureGrid(**{**{f: getattr(g, f) for f in ("slide_id", "origin_level0", "stride_level0",
                                                          "tile_size_level0", "tile_px", "stride_px", "mpp_requested",
                                                          "mpp_effective", "mpp_level0", "read_level",
                                                          "read_downsample", "level0_size")},
                            "coords": index[:, ::-1] * 256, "index": index, "shape": (2000, 2000),
                            "tissue_fraction": np.ones(300), "features": rng.standard_normal((300, 8))})
    p = tmp_path / "sparse.h5"
    write_feature_grid(p, sparse)
    assert 2000 * 2000 > p.stat().st_size * 50  # the mask expands far more than raw data would
    assert 2000 * 2000 < p.stat().st_size * MAX_EXPANSION
    assert read_feature_grid(p).n_tiles == 300


def _aliased_strip_tiff(path: Path, width: int, height: int, rows_per_strip: int = 16) -> None:
    """A valid deflate strip TIFF (RGB, 8 bits) whose strips all point at one compressed strip of white:
    a few tens of KB that decode to ``width × height × 3`` bytes."""
    n = -(-height // rows_per_strip)
    strip = zlib.compress(b"\xff" * (width * 3 * rows_per_strip), 9)
    entries = 10
    ifd_size = 2 + 12 * entries + 4
    bps_at = 8 + ifd_size
    offsets_at = bps_at + 6
    counts_at = offsets_at + 4 * n
    data_at = counts_at + 4 * n

    def entry(tag, typ, count, value):
        packed = struct.pack("<HH", value, 0) if typ == 3 and count == 1 else struct.pack("<I", value)
        return struct.pack("<HHI", tag, typ, count) + packed

    ifd = struct.pack("<H", entries) + b"".join([
        entry(256, 4, 1, width), entry(257, 4, 1, height), entry(258, 3, 3, bps_at), entry(259, 3, 1, 8),
        entry(262, 3, 1, 2), entry(273, 4, n, offsets_at), entry(277, 3, 1, 3), entry(278, 4, 1, rows_per_strip),
        entry(279, 4, n, counts_at), entry(284, 3, 1, 1)]) + struct.pack("<I", 0)
    body = (struct.pack("<HHH", 8, 8, 8) + struct.pack(f"<{n}I", *([data_at] * n))
            + struct.pack(f"<{n}I", *([len(strip)] * n)) + strip)
    path.write_bytes(b"II" + struct.pack("<HI", 42, 8) + ifd + body)


def test_strip_tiff_declaring_gigapixels_is_refused_before_decoding(tmp_path, counts):
    import tifffile

    small = tmp_path / "small.tif"
    _aliased_strip_tiff(small, 640, 480)
    with tifffile.TiffFile(small) as tf:  # the construction is a valid TIFF: it decodes to white
        assert tf.pages[0].asarray().shape == (480, 640, 3) and tf.pages[0].asarray().min() == 255
    big = tmp_path / "big.tif"
    _aliased_strip_tiff(big, 30_000, 30_000)
    assert big.stat().st_size < 200_000  # declares 2.7 GB of pixels
    counts("inputs")
    out = _open_in_capped_child("slide", big)
    assert out["error"] == "SlideError", out
    assert str(big) in out["message"] and "30000×30000" in out["message"] and "pyramidal TIFF" in out["message"]
    assert out["peak_mb"] < PEAK_RSS_MB and out["seconds"] < 5, out
    ok = _open_in_capped_child("slide", small)
    assert ok["error"] == "none", ok


def test_png_declaring_gigapixels_is_refused_before_decoding(tmp_path, counts):
    """A 12,000 × 12,000 grey PNG (under Pillow's own bomb limit, above the plain-image limit)."""
    width = height = 12_000
    comp = zlib.compressobj(9)
    row = b"\x00" + b"\xff" * width
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    p = tmp_path / "big.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                  + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    assert p.stat().st_size < 400_000
    counts("inputs")
    out = _open_in_capped_child("slide", p)
    assert out["error"] == "SlideError", out
    assert str(p) in out["message"] and "12000×12000" in out["message"]
    assert out["peak_mb"] < PEAK_RSS_MB and out["seconds"] < 5, out
