"""Time the slide stages (segment + tile) per slide, on CMU-1-Small-Region.svs and on a large slide.

The large slide is a pyramidal, tiled JPEG TIFF built from real tissue: copies of CMU-1-Small-Region
(H&E skin, scaled ×2 to 0.25 µm/px as a 40× scan would be) laid on glass, with 4×, 16× and 64× levels
like an Aperio file. It is written tile by tile, so building it needs little memory.

    python benchmarks/slides.py                       # CMU + a 60000 × 45000 slide built in /tmp
    python benchmarks/slides.py --size 100000 75000   # a bigger slide

Prints, per slide, the CPU and wall time of the work each stage does for one slide in one process
(opening, reading, segmenting, writing every output), the best of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CMU = REPO / "tests" / "data" / "CMU-1-Small-Region.svs"
TILE = 256


def tissue_block(scale: int = 2) -> np.ndarray:
    """CMU-1-Small-Region at 0.25 µm/px, cropped to whole 256-px tiles: (H, W, 3) uint8."""
    import cv2

    from wsi2dmamba.slide import open_slide

    with open_slide(CMU) as s:
        rgb = s.read_level(0)
    big = cv2.resize(rgb, (rgb.shape[1] * scale, rgb.shape[0] * scale), interpolation=cv2.INTER_CUBIC)
    h, w = (big.shape[0] // TILE) * TILE, (big.shape[1] // TILE) * TILE
    return np.ascontiguousarray(big[:h, :w])


def layout(size: tuple[int, int], block: tuple[int, int], gap: int = 2048) -> list[tuple[int, int]]:
    """Top-left corners (x, y) of the tissue blocks, tile-aligned, with glass between and around them."""
    bw, bh = block
    out = []
    y = gap
    while y + bh + gap <= size[1]:
        x = gap
        while x + bw + gap <= size[0]:
            out.append((x, y))
            x += bw + gap
        y += bh + gap
    return out


def build_tiff(path: Path, size: tuple[int, int], mpp: float = 0.25) -> None:
    """Write the large slide (see the module docstring)."""
    import cv2
    import tifffile

    block = tissue_block()
    bh, bw = block.shape[:2]
    corners = layout(size, (bw, bh))
    white = np.full((TILE, TILE, 3), 255, np.uint8)
    w0, h0 = size

    def level0_tiles():
        for ty in range(0, h0, TILE):
            for tx in range(0, w0, TILE):
                tile = white
                for x, y in corners:
                    if x <= tx < x + bw and y <= ty < y + bh:
                        tile = block[ty - y:ty - y + TILE, tx - x:tx - x + TILE]
                        break
                yield tile

    def level_image(ds: int) -> np.ndarray:
        lw, lh = w0 // ds, h0 // ds
        img = np.full((lh, lw, 3), 255, np.uint8)
        small = cv2.resize(block, (bw // ds, bh // ds), interpolation=cv2.INTER_AREA)
        for x, y in corners:
            img[y // ds:y // ds + small.shape[0], x // ds:x // ds + small.shape[1]] = small
        return img

    res = 1e4 / mpp
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(level0_tiles(), shape=(h0, w0, 3), dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
                 compression="jpeg", compressionargs={"level": 85}, resolution=(res, res),
                 resolutionunit="CENTIMETER", maxworkers=os.cpu_count())
        for ds in (4, 16, 64):
            img = level_image(ds)
            tw.write(img, tile=(TILE, TILE), photometric="rgb", compression="jpeg", compressionargs={"level": 85},
                     resolution=(res / ds, res / ds), resolutionunit="CENTIMETER", subfiletype=1,
                     maxworkers=os.cpu_count())


def time_slide(path: Path, run: Path, repeats: int) -> dict:
    """Best-of-``repeats`` CPU and wall seconds of the segment and tile work for one slide."""
    import shutil

    from wsi2dmamba.cohort import Cohort
    from wsi2dmamba.tiling import TileConfig, tile_slide
    from wsi2dmamba.tissue import SegmentConfig, segment_slide

    rec = Cohort.from_paths([path]).records[0]
    best: dict[str, tuple[float, float]] = {}
    info: dict = {}
    for _ in range(repeats):
        shutil.rmtree(run, ignore_errors=True)
        for name, fn, cfg in (("segment", segment_slide, SegmentConfig()), ("tile", tile_slide, TileConfig())):
            c, w = time.process_time(), time.perf_counter()
            info[name] = fn(rec, cfg, run)
            dt = (time.process_time() - c, time.perf_counter() - w)
            best[name] = min(best.get(name, dt), dt, key=lambda t: t[1])
    return {"best": best, "info": info}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, nargs=2, default=(60000, 45000), metavar=("W", "H"),
                    help="level-0 size of the large slide in pixels (0.25 µm/px)")
    ap.add_argument("--tiff", type=Path, default=Path(tempfile.gettempdir()) / "wsi2dmamba-bench-large.tif",
                    help="where the large slide is built (reused when it exists with this size)")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    import tifffile

    rebuild = True
    if a.tiff.is_file():
        with tifffile.TiffFile(a.tiff) as tf:
            rebuild = tuple(tf.pages[0].shape[:2]) != (a.size[1], a.size[0])
    if rebuild:
        t = time.perf_counter()
        build_tiff(a.tiff, tuple(a.size))
        print(f"built {a.tiff} ({a.tiff.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.0f} s")

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}; one process, best of {a.repeats}")
    from wsi2dmamba.slide import open_slide

    with tempfile.TemporaryDirectory() as tmp:
        for label, path in (("CMU-1-Small-Region.svs", CMU), ("large pyramidal TIFF", a.tiff)):
            with open_slide(path) as s:
                desc = (f"{s.dimensions[0]}×{s.dimensions[1]} px, {s.level_count} levels, "
                        f"{s.mpp:.3g} µm/px, {path.stat().st_size / 1e6:.0f} MB")
            r = time_slide(path, Path(tmp) / "run", a.repeats)
            seg, til = r["best"]["segment"], r["best"]["tile"]
            print(f"{label} ({desc})")
            print(f"  segment  {seg[1]:.3f} s wall, {seg[0]:.3f} s CPU   "
                  f"({r['info']['segment']['n_pieces']} pieces, {r['info']['segment']['tissue_area_mm2']} mm²)")
            print(f"  tile     {til[1]:.3f} s wall, {til[0]:.3f} s CPU   "
                  f"({r['info']['tile']['n_tiles']} tiles of 256 px at 0.5 µm/px, grid "
                  f"{r['info']['tile']['grid_shape'][0]}×{r['info']['tile']['grid_shape'][1]})")
            print(f"  total    {seg[1] + til[1]:.3f} s wall, {seg[0] + til[0]:.3f} s CPU per slide")
            print("  " + json.dumps({"segment_s": round(seg[1], 3), "tile_s": round(til[1], 3)}))


if __name__ == "__main__":
    main()
