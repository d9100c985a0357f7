"""Cost of checking grid files before they are read: sha256 against the recorded hash, or a child read.

    python benchmarks/integrity.py                        # 3 file sizes, best of 3
    python benchmarks/integrity.py --tiles 50000 --dim 1536

For feature grid files of a few sizes (written by the project's writer, in the page cache: the costs are
CPU, not disk), prints per file, in CPU seconds of this process (wall in brackets):

* ``read``: ``read_feature_grid`` (what a stage does anyway);
* ``sha256``: comparing the file with its recorded hash (a file the run wrote itself);
* ``child``: reading it first in a child process with a time limit (a file from elsewhere), wall time,
  for one file and per file when a batch of them goes through one child (100 files under 20 MB, else 10).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def make_grid(n: int, dim: int, rng: np.random.Generator):
    from wsi2dmamba.grid import FeatureGrid

    w = int(np.ceil(np.sqrt(n * 1.3)))
    cells = np.sort(rng.choice(w * w, size=n, replace=False))
    index = np.stack([cells // w, cells % w], 1)
    return FeatureGrid(slide_id="bench", coords=index[:, ::-1] * 512, index=index, shape=(w, w),
                       tissue_fraction=np.ones(n), origin_level0=(0.0, 0.0), stride_level0=512.0,
                       tile_size_level0=512.0, tile_px=256, stride_px=256, mpp_requested=0.5,
                       mpp_effective=0.5, mpp_level0=0.25, read_level=0, read_downsample=1.0,
                       level0_size=(w * 512, w * 512), features=rng.standard_normal((n, dim), np.float32))


def best(fn, repeats: int) -> tuple[float, float]:
    """(CPU s, wall s) of the fastest of ``repeats`` runs."""
    runs = []
    for _ in range(repeats):
        c, w = time.process_time(), time.perf_counter()
        fn()
        runs.append((time.process_time() - c, time.perf_counter() - w))
    return min(runs, key=lambda r: r[1])


def main() -> None:
    from wsi2dmamba.fileio import file_sha256
    from wsi2dmamba.grid import read_feature_grid, write_feature_grid
    from wsi2dmamba.grid.guard import probe_in_child

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, nargs="+", default=[2_000, 10_000, 40_000])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, {time.strftime('%Y-%m-%d')}")
    print("| tiles × dim | file MB | read CPU (wall) | sha256 CPU (wall) | sha256 / read (CPU) | child, one file "
          "(wall) | child, per file of a batch (wall) |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.tiles:
            p = Path(tmp) / f"g{n}.h5"
            write_feature_grid(p, make_grid(n, args.dim, rng))
            mb = p.stat().st_size / 1e6
            read = best(lambda p=p: read_feature_grid(p), args.repeats)
            sha = best(lambda p=p: file_sha256(p), args.repeats)
            child = best(lambda p=p: probe_in_child([p], "features"), args.repeats)
            many = [p] * 100 if mb < 20 else [p] * 10
            batch = best(lambda many=many: probe_in_child(many, "features"), 1)
            print(f"| {n:,} × {args.dim} | {mb:.0f} | {read[0]:.3f} s ({read[1]:.3f}) | {sha[0]:.3f} s "
                  f"({sha[1]:.3f}) | {sha[0] / max(read[0], 1e-9):.2f} | {child[1]:.2f} s | {batch[1] / len(many):.3f} s |")


if __name__ == "__main__":
    main()
