"""The 2DMamba forward on 32 x 32 tiles against the row sweep, per row width: where the width rule comes from.

For each width W, a square grid (E = 256; below 112 columns a batch of grids with E = 192 and about the
cells of 16 x 56 x 56) runs the forward without gradients on both kernels; the script prints their
queued milliseconds and the ratio, after checking the tiled forward with gradients against the float64
reference on a small grid of that width. ``ScanTuning.tiled_forward_above`` is set from this sweep.

    PYTHONPATH=. python3 benchmarks/tiled_forward.py
"""

from __future__ import annotations

import argparse

import torch
from scan_layouts import max_rel_error
from scans import make_inputs, measure

from wsi2dmamba.ops import ScanTuning

WIDTHS = [32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 196, 224, 240, 256, 288, 320, 391, 448, 512]


def shape_for(width: int) -> tuple[int, int, int, int]:
    if width >= 112:
        return (1, 256, width, width)
    return (max(1, 16 * 56 * 56 // (width * width)), 192, width, width)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--widths", default=",".join(map(str, WIDTHS)))
    args = p.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, N = 16, fp32, queued ms of {args.reps} forwards")
    tunings = {tiled: ScanTuning(tiled_forward=tiled) for tiled in (False, True)}
    for width in map(int, args.widths.split(",")):
        shape = shape_for(width)
        err = max_rel_error("2dmamba", width, tunings[True])
        x = make_inputs("2dmamba", *shape, torch.float32)
        dout = torch.randn(shape, device="cuda")
        ms = {tiled: measure("2dmamba", "cupy", x, dout, False, args.reps, tuning)[1]
              for tiled, tuning in tunings.items()}
        print(f"{shape}: row sweep {ms[False]:.3f}  tiles {ms[True]:.3f}  tiles/row sweep {ms[True] / ms[False]:.2f}"
              f"  (tiles with gradients, max rel. error {err:.1e})", flush=True)


if __name__ == "__main__":
    main()
