"""Sweep the states per thread of the 2D scan kernels: correctness against the reference, then time.

For each scan and grid shape, prints the queued milliseconds of the forward with 1, 2 and 4 states per
thread, and of forward+backward with 1, 2 and 4 states per thread in the backward (the forward on its
default layout), each backward layout first checked against the float64 reference on a small grid of
the same width. The per-width rules of ``wsi2dmamba.ops.cupy_scans`` come from this sweep.

    PYTHONPATH=. python3 benchmarks/scan_layouts.py
"""

from __future__ import annotations

import argparse

import torch

from wsi2dmamba import ops
from wsi2dmamba.ops import cupy_scans

SHAPES = [(1, 256, 64, 64), (16, 192, 56, 56), (1, 256, 128, 128), (1, 256, 196, 196), (1, 256, 256, 256)]


def inputs(batch, E, H, W, N=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    t = dict(u=r(batch, E, H, W), dt=r(batch, E, H, W) * 0.5 - 1.0, A=-torch.rand(E, N, generator=g) * 2 - 0.1,
             B=r(batch, N, H, W), C=r(batch, N, H, W), D=r(E), z=r(batch, E, H, W), dt_bias=r(E) * 0.1)
    return {k: v.cuda().requires_grad_(True) for k, v in t.items()}


def run(kind, x, backend):
    if kind == "2dmamba":
        return ops.selective_scan_2d(x["u"], x["dt"], x["A"], x["B"], x["C"], x["D"], x["z"], x["dt_bias"],
                                     backend=backend)
    # Mamba2D takes the same tensors as its two parameter sets (positive steps)
    dt_t, dt_l = torch.nn.functional.softplus(x["dt"]), torch.nn.functional.softplus(x["z"])
    return ops.mamba2d_scan(x["u"], dt_t, dt_l, x["A"], x["A"] * 0.5, x["B"], x["C"], x["C"] * 0.5 + x["B"], x["D"],
                            backend=backend)


def max_rel_error(kind, W):
    x = inputs(2, 4, 9, W)
    y = run(kind, x, "cupy")
    dout = torch.randn_like(y)
    grads = torch.autograd.grad(y, list(x.values()), dout, allow_unused=True)
    x64 = {k: v.detach().double().requires_grad_(True) for k, v in x.items()}
    y64 = run(kind, x64, "torch")
    grads64 = torch.autograd.grad(y64, list(x64.values()), dout.double(), allow_unused=True)
    rel = lambda a, b: float((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-12))  # noqa: E731
    return max([rel(y.detach(), y64.detach())] + [rel(a, b) for a, b in zip(grads, grads64) if b is not None])


def queued_ms(kind, shape, grad, reps):
    x = inputs(*shape)

    def step():
        if grad:
            y = run(kind, x, "cupy")
            torch.autograd.grad(y, list(x.values()), torch.ones_like(y), allow_unused=True)
        else:
            with torch.no_grad():
                run(kind, x, "cupy")

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--kinds", default="2dmamba,mamba2d")
    args = p.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, N = 16, queued ms of {args.reps} calls")
    for kind in args.kinds.split(","):
        for shape in SHAPES:
            for s in (1, 2, 4):
                cupy_scans.STATES_PER_THREAD, cupy_scans.BWD_STATES_PER_THREAD = s, None
                print(f"{kind} {shape} forward, {s} states/thread: {queued_ms(kind, shape, False, args.reps):.3f} ms",
                      flush=True)
            for s in (1, 2, 4):
                cupy_scans.STATES_PER_THREAD, cupy_scans.BWD_STATES_PER_THREAD = None, s
                err = max_rel_error(kind, shape[3])
                ms = queued_ms(kind, shape, True, args.reps)
                print(f"{kind} {shape} fwd+bwd, backward {s} states/thread: {ms:.3f} ms (max rel. error {err:.1e})",
                      flush=True)
    cupy_scans.STATES_PER_THREAD = cupy_scans.BWD_STATES_PER_THREAD = None


if __name__ == "__main__":
    main()
