"""Sweep the states per thread of the 2D scan kernels: correctness against the reference, then time.

For each scan and grid shape, prints the queued milliseconds of the forward with 1, 2 and 4 states per
thread, and of forward+backward with 1, 2 and 4 states per thread in the row-sweep backward (the
forward on its default layout; the 2DMamba backward forced off its tiles), each backward layout first
checked against the float64 reference on a small grid of the same width. Inputs and timing are those of
``benchmarks/scans.py``. The per-width rules of ``wsi2dmamba.ops.cupy_scans`` (``forward_states_per_thread``,
``backward_states_per_thread``) come from this sweep.

    PYTHONPATH=. python3 benchmarks/scan_layouts.py
"""

from __future__ import annotations

import argparse

import torch
from scans import make_inputs, measure

from wsi2dmamba.ops import ScanTuning, mamba2d_scan, selective_scan_2d

SHAPES = [(1, 256, 64, 64), (16, 192, 56, 56), (1, 256, 128, 128), (1, 256, 196, 196), (1, 256, 256, 256)]


def max_rel_error(kind, W, tuning):
    """Largest relative error of the output and every input gradient of the kernels laid out by ``tuning``
    against the float64 reference."""
    fn = selective_scan_2d if kind == "2dmamba" else mamba2d_scan
    x = {k: v.requires_grad_() for k, v in make_inputs(kind, 2, 4, 9, W, torch.float32).items()}
    x64 = {k: v.detach().double().requires_grad_() for k, v in x.items()}
    y, y64 = fn(**x, backend="cupy", tuning=tuning), fn(**x64, backend="torch")
    dout = torch.randn_like(y)
    grads = torch.autograd.grad(y, list(x.values()), dout, allow_unused=True)
    grads64 = torch.autograd.grad(y64, list(x64.values()), dout.double(), allow_unused=True)
    rel = lambda a, b: float((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-12))  # noqa: E731
    return max([rel(y.detach(), y64.detach())] + [rel(a, b) for a, b in zip(grads, grads64) if b is not None])


def queued_ms(kind, shape, backward, reps, tuning):
    x = make_inputs(kind, *shape, torch.float32)
    dout = torch.randn(shape, device="cuda")
    return measure(kind, "cupy", x, dout, backward, reps, tuning)[1]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--kinds", default="2dmamba,mamba2d")
    args = p.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, N = 16, queued ms of {args.reps} calls")
    for kind in args.kinds.split(","):
        for shape in SHAPES:
            for s in (1, 2, 4):
                ms = queued_ms(kind, shape, False, args.reps, ScanTuning(states_per_thread=s))
                print(f"{kind} {shape} forward, {s} states/thread: {ms:.3f} ms", flush=True)
            for s in (1, 2, 4):
                tuning = ScanTuning(bwd_states_per_thread=s, tiled_backward=False)
                err = max_rel_error(kind, shape[3], tuning)
                ms = queued_ms(kind, shape, True, args.reps, tuning)
                print(f"{kind} {shape} fwd+bwd, backward {s} states/thread: {ms:.3f} ms (max rel. error {err:.1e})",
                      flush=True)


if __name__ == "__main__":
    main()
