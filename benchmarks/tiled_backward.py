"""The 2DMamba backward on tiles against the row-sweep backward, interleaved in one process.

For each shape and dtype, forward+backward of the 2DMamba scan (the calls of ``benchmarks/scans.py``,
gradients into every input) runs 20 times queued back to back with the row-sweep backward,
then with the tiled one, then both again (rows, tiles, rows, tiles): alternating the two within one
process keeps clock and cache drift out of the comparison. Prints the queued milliseconds per call.

    PYTHONPATH=. python3 benchmarks/tiled_backward.py --shapes 1x256x64x64 1x256x128x128 1x256x196x196
"""

from __future__ import annotations

import argparse

import torch
from scans import make_inputs, measure

from wsi2dmamba.ops import ScanTuning


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["1x256x64x64", "1x256x128x128", "1x256x196x196"],
                   help="grids as BATCHxExHxW")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    print(f"device: {torch.cuda.get_device_name()}; queued ms per forward+backward")
    print("dtype     shape (batch,E,H,W)   rows    tiles   rows    tiles")
    tunings = {tiled: ScanTuning(tiled_backward=tiled) for tiled in (False, True)}
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for text in args.shapes:
            b, E, H, W = (int(v) for v in text.split("x"))
            x = make_inputs("2dmamba", b, E, H, W, dtype)
            dout = torch.randn(b, E, H, W, device="cuda", dtype=dtype)
            # the queued ms, rows and tiles alternating
            times = [measure("2dmamba", "cupy", x, dout, True, args.reps, tunings[tiled])[1]
                     for tiled in (False, True, False, True)]
            print(f"{dtype_name:9s} {str((b, E, H, W)):21s} " + " ".join(f"{t:7.3f}" for t in times), flush=True)


if __name__ == "__main__":
    main()
