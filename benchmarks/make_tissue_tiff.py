"""Build a large pyramidal TIFF of real tissue for throughput measurements.

The pixels are the real H&E tissue of ``CMU-1-Small-Region.svs`` (CC0), mirrored and repeated to fill a
square canvas of ``--size`` pixels, so every tile holds real tissue texture and real background (no
synthetic pattern). The file is a generic tiled TIFF that OpenSlide reads: 256×256 JPEG tiles, level 0
then levels downsampled by 4 each, resolution tags in centimetres giving ``--mpp`` µm per pixel.

    python benchmarks/make_tissue_tiff.py --out /tmp/tissue.tif --size 40000
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

DEFAULT_SOURCES = (
    Path(__file__).resolve().parents[1] / "tests" / "data" / "CMU-1-Small-Region.svs",
    Path(__file__).resolve().parents[2] / "shared" / "data" / "slides" / "aperio_svs" / "CMU-1-Small-Region.svs",
)


def mirrored_index(n: int, period: int) -> np.ndarray:
    """0, 1, …, period-1, period-1, …, 0, 0, 1, … : indices that repeat a strip by mirroring (no seams)."""
    i = np.arange(n) % (2 * period)
    return np.where(i < period, i, 2 * period - 1 - i)


def tissue_mosaic(source_rgb: np.ndarray, size: int) -> np.ndarray:
    """(size, size, 3) uint8 canvas filled with mirrored copies of ``source_rgb``."""
    h, w = source_rgb.shape[:2]
    rows = mirrored_index(size, h)
    cols = mirrored_index(size, w)
    out = np.empty((size, size, 3), np.uint8)
    step = 4096
    for y in range(0, size, step):  # in strips, so the fancy index never doubles the memory
        out[y:y + step] = source_rgb[rows[y:y + step]][:, cols]
    return out


def write_pyramid(path: Path, level0: np.ndarray, mpp: float, tile: int = 256, quality: int = 85,
                  min_side: int = 1024, workers: int = 0) -> list[tuple[int, int]]:
    """Write ``level0`` and its 4× pyramid as a tiled JPEG TIFF; returns the levels' (width, height)."""
    import cv2
    import tifffile

    px_per_cm = 1e4 / mpp
    dims = []
    img = level0
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        while True:
            tw.write(img, tile=(tile, tile), compression="jpeg", compressionargs={"level": quality},
                     photometric="rgb", resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER",
                     maxworkers=workers or None, metadata=None,
                     subfiletype=1 if dims else 0)  # OpenSlide takes reduced-resolution pages as levels
            dims.append((img.shape[1], img.shape[0]))
            if min(img.shape[:2]) // 4 < min_side:
                break
            img = cv2.resize(img, (img.shape[1] // 4, img.shape[0] // 4), interpolation=cv2.INTER_AREA)
    return dims


def build(out: Path, size: int, mpp: float = 0.5, source: Path | None = None, quality: int = 85) -> None:
    from wsi2dmamba.slide import open_slide

    src = source or next((p for p in DEFAULT_SOURCES if p.is_file()), None)
    if src is None:
        raise SystemExit("CMU-1-Small-Region.svs not found; pass --source")
    t0 = time.perf_counter()
    with open_slide(src) as s:
        rgb = s.read_level(0)
    canvas = tissue_mosaic(rgb, size)
    dims = write_pyramid(out, canvas, mpp, quality=quality, workers=os.cpu_count() or 1)
    print(f"wrote {out}: levels {dims}, {out.stat().st_size / 1e6:.0f} MB, mpp {mpp}, "
          f"from {src.name} in {time.perf_counter() - t0:.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--size", type=int, default=40000, help="side of level 0 in pixels")
    ap.add_argument("--mpp", type=float, default=0.5, help="µm per level-0 pixel written in the file")
    ap.add_argument("--source", type=Path, default=None)
    ap.add_argument("--quality", type=int, default=85)
    a = ap.parse_args()
    build(a.out, a.size, a.mpp, a.source, a.quality)


if __name__ == "__main__":
    main()
