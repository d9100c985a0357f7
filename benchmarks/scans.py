"""Milliseconds and peak memory of the 2D scans: CuPy kernels vs the PyTorch reference (docs/scans.md §4).

Run on a CUDA machine with CuPy:  python benchmarks/scans.py [--skip-reference] [--reps 20]

Time, two figures: "ms", the median of calls each waited for (host launch cost included); "queued",
the mean of the same calls queued back to back (the GPU's time per call once the host runs ahead, as
inside a model).

Layout: the default ``ScanTuning`` (what a model runs); the options below force others, and the
script prints the tuning it ran.

Memory, two figures per call, both from ``torch.cuda.max_memory_allocated`` during one call, above
what was allocated before it (the inputs and the output gradient):
- "MiB": everything the call allocated, including its results (the output; in forward+backward also
  the input gradients, which at 196 x 196 x 256 fp32 are 4 x 37.5 MiB alone);
- "work MiB": the same minus the bytes of the results, i.e. the op's own workspace (checkpoint rows,
  fixed-point gradient accumulators, temporaries).
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from wsi2dmamba.ops import ScanTuning, cupy_scans, mamba2d_scan, selective_scan_2d

SHAPES = [(1, 256, 64, 64), (1, 256, 128, 128), (1, 256, 196, 196), (1, 256, 256, 256), (1, 256, 391, 391),
          (16, 192, 56, 56)]
N_STATE = 16
FORCE = {"rule": None, "always": True, "never": False}


def make_inputs(kind, batch, E, H, W, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)

    def r(*s, scale=1.0, shift=0.0):
        return (torch.randn(*s, generator=g, device="cuda") * scale + shift).to(dtype)

    if kind == "2dmamba":
        return dict(u=r(batch, E, H, W), dt=r(batch, E, H, W, scale=0.5, shift=-2.0),
                    A=-torch.arange(1, N_STATE + 1, device="cuda", dtype=torch.float32).repeat(E, 1),
                    B=r(batch, N_STATE, H, W), C=r(batch, N_STATE, H, W),
                    D=torch.ones(E, device="cuda"), z=r(batch, E, H, W),
                    dt_bias=torch.zeros(E, device="cuda"))
    return dict(u=r(batch, E, H, W), dt_t=F.softplus(r(batch, E, H, W, shift=-2.0)),
                dt_l=F.softplus(r(batch, E, H, W, shift=-2.0)),
                A_t=-torch.arange(1, N_STATE + 1, device="cuda", dtype=torch.float32).repeat(E, 1),
                A_l=-torch.arange(1, N_STATE + 1, device="cuda", dtype=torch.float32).repeat(E, 1),
                B_t=r(batch, N_STATE, H, W), B_l=r(batch, N_STATE, H, W), C=r(batch, N_STATE, H, W),
                D=torch.ones(E, device="cuda"))


def measure(kind, backend, x, dout, backward, reps, tuning=None):
    """Median ms of ``reps`` calls each waited for, mean ms of ``reps`` calls queued back to back, peak MiB
    above the inputs, and that peak less the results' bytes; the kernels laid out by ``tuning`` (None: the
    defaults)."""
    fn = selective_scan_2d if kind == "2dmamba" else mamba2d_scan
    leaves = {k: v.requires_grad_(backward) for k, v in x.items()}

    def call():
        if backward:
            for v in leaves.values():
                v.grad = None
            fn(**leaves, backend=backend, tuning=tuning).backward(dout)
        else:
            with torch.no_grad():
                fn(**leaves, backend=backend, tuning=tuning)

    call()
    torch.cuda.synchronize()
    for v in leaves.values():
        v.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    call()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    results = dout.numel() * dout.element_size()  # the output
    if backward:
        results += sum(v.numel() * v.element_size() for v in leaves.values())  # one gradient per input
    work = peak - results / 2**20
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    # the same calls queued back to back: GPU time per call once the host runs ahead (as inside a model)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        call()
    end.record()
    end.synchronize()
    for v in leaves.values():
        v.grad = None
    return statistics.median(times), start.elapsed_time(end) / reps, peak, work


def copy_bandwidth():
    """Bytes per second of a large device-to-device copy (the HBM roofline's denominator)."""
    a = torch.empty(256 * 2**20, device="cuda", dtype=torch.uint8)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        b.copy_(a)
    end.record()
    end.synchronize()
    return 2 * a.numel() * 20 / (start.elapsed_time(end) / 1e3)


def roofline_ms(batch, E, H, W, bandwidth, elem=4):
    """Each of u, dt, z, y (E per cell) and B, C (N per cell) moved once."""
    cells = batch * H * W
    return cells * (4 * E + 2 * N_STATE) * elem / bandwidth * 1e3


def profile(args, shapes, tuning):
    """One forward (no gradients) and one forward+backward per (dtype, kind, shape), for a profiler."""
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for kind in args.kinds.split(","):
            for batch, E, H, W in shapes:
                x = make_inputs(kind, batch, E, H, W, dtype)
                dout = torch.randn(batch, E, H, W, device="cuda", dtype=dtype)
                fn = selective_scan_2d if kind == "2dmamba" else mamba2d_scan
                leaves = {k: v.requires_grad_() for k, v in x.items()}
                for start in (False, True):  # warm-up (compilation), then the profiled calls
                    torch.cuda.synchronize()
                    if start:
                        torch.cuda.cudart().cudaProfilerStart()
                    with torch.no_grad():
                        fn(**leaves, backend="cupy", tuning=tuning)
                    fn(**leaves, backend="cupy", tuning=tuning).backward(dout)
                torch.cuda.synchronize()
                torch.cuda.cudart().cudaProfilerStop()


def tuning_from(args) -> ScanTuning:
    """The kernels' layout the command line asks for (the defaults where it names none)."""
    return ScanTuning(states_per_thread=args.states_per_thread, bwd_states_per_thread=args.bwd_states_per_thread,
                      bwd_smem_budget=args.smem_budget_kib * 1024, tiled_forward=FORCE[args.tiled_forward],
                      tiled_backward=FORCE[args.tiled_backward], tile_backward_states=args.tile_backward_states,
                      tile_backward_channels=args.tile_backward_channels,
                      extra_options=tuple(f"-D{d}" for d in args.define))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--shapes", default="all", help="'all' or indices into the shape table, e.g. 2,5")
    p.add_argument("--states-per-thread", type=int, default=None, help="default: the per-width rule")
    p.add_argument("--bwd-states-per-thread", type=int, default=None, help="default: the per-width rule")
    p.add_argument("--smem-budget-kib", type=int, default=cupy_scans.BWD_SMEM_BUDGET // 1024)
    p.add_argument("--tiled-forward", choices=["rule", "always", "never"], default="rule",
                   help="2DMamba forward on 32 x 32 tiles: by the width rule (rows wider than "
                        f"{ScanTuning().tiled_forward_above} columns), always, or never (the row sweep)")
    p.add_argument("--tiled-backward", choices=["rule", "always", "never"], default="rule",
                   help="2DMamba backward on tiles (scan2d_tile_bwd): by its rule, always, or never (the row sweep)")
    p.add_argument("--tile-backward-states", type=int, default=None, help="states per thread of the tiled backward")
    p.add_argument("--tile-backward-channels", type=int, default=None,
                   help="channels per block of the tiled backward (default: 2 where they fit)")
    p.add_argument("--kinds", default="2dmamba,mamba2d")
    p.add_argument("--define", action="append", default=[],
                   help="extra kernel macro NAME[=VALUE], for variants that compute the same scan (e.g. PF_ROWS=4, "
                        "EARLY_C=0, NO_PREFETCH)")
    p.add_argument("--profile", action="store_true",
                   help="no timing: after a warm-up, one forward and one forward+backward per shape between "
                        "cudaProfilerStart/Stop (for ncu --profile-from-start off)")
    args = p.parse_args()
    tuning = tuning_from(args)
    shapes_all = SHAPES if args.shapes == "all" else [SHAPES[int(i)] for i in args.shapes.split(",")]
    if args.profile:
        profile(args, shapes_all, tuning)
        return
    bw = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}, copy bandwidth {bw / 1e12:.2f} TB/s, N = {N_STATE}")
    print(f"kernels: {tuning}")
    print("scan     dtype    shape (batch,E,H,W)   backend  fwd ms  fwd+bwd ms  queued fwd  queued f+b  fwd MiB  "
          "fwd+bwd MiB  fwd+bwd work MiB  roofline fwd ms")
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        shapes = shapes_all if dtype == torch.float32 else [(1, 256, 196, 196)]
        for kind in args.kinds.split(","):
            for batch, E, H, W in shapes:
                x = make_inputs(kind, batch, E, H, W, dtype)
                dout = torch.randn(batch, E, H, W, device="cuda", dtype=dtype)
                backends = ["cupy"] if args.skip_reference or dtype != torch.float32 else ["cupy", "torch"]
                for backend in backends:
                    try:
                        reps = args.reps if backend == "cupy" else max(3, args.reps // 5)
                        f_ms, f_q, f_mib, _ = measure(kind, backend, x, dout, False, reps, tuning)
                        b_ms, b_q, b_mib, b_work = measure(kind, backend, x, dout, True, reps, tuning)
                        row = (f"{f_ms:7.3f}  {b_ms:9.3f}  {f_q:9.3f}  {b_q:9.3f}  {f_mib:8.1f}  {b_mib:10.1f}  "
                               f"{b_work:15.1f}")
                    except torch.cuda.OutOfMemoryError:
                        row = "out of memory"
                        torch.cuda.empty_cache()
                    roof = roofline_ms(batch, E, H, W, bw, torch.finfo(dtype).bits // 8)
                    print(f"{kind:8s} {dtype_name:8s} {str((batch, E, H, W)):20s}  {backend:6s}  {row}  {roof:8.3f}",
                          flush=True)
                del x, dout
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
