"""Training-step time and peak GPU memory of every MIL model on square feature grids.

One step = forward, cross-entropy on the logits, backward, AdamW update, on one slide whose grid is
S × S cells of ``--in-dim`` features (all cells tissue unless ``--tissue`` < 1). Peak memory is
``torch.cuda.max_memory_allocated`` over the step, including the grid itself on the GPU.

    PYTHONPATH=. python3 benchmarks/models.py                      # all models, 64, 196, 391 cells a side
    PYTHONPATH=. python3 benchmarks/models.py --models abmil 2dmambamil --sizes 391 --amp
    PYTHONPATH=. python3 benchmarks/models.py --models "2dmambamil[checkpoint_blocks=off]" --grid-dtype float16
    PYTHONPATH=. python3 benchmarks/models.py --scan-profile --sizes 391  # the scan alone, by channel count

A model key is a registry name or a row of ``VARIANTS``, optionally followed by configuration overrides
in brackets, ``name[key=value,key=value]`` (values read as JSON, else as text).
"""

from __future__ import annotations

import argparse
import json
import re
import time

import numpy as np
import torch
import torch.nn.functional as F

from wsi2dmamba.models import GridBatch, create, list_models

VARIANTS = {  # extra rows: name -> (registry name, overrides)
    "2dmambamil[paper]": ("2dmambamil", {"preset": "paper"}),
    "2dmambamil[2 corners]": ("2dmambamil", {"corners": ["tl", "br"]}),
}


def parse_key(key: str) -> tuple[str, dict]:
    """``name[key=value,...]`` → (registry name, overrides); ``VARIANTS`` rows expand to theirs."""
    match = re.fullmatch(r"([^\[]+)(?:\[(.*)\])?", key)
    if match is None:
        raise SystemExit(f"bad model key {key!r}")
    base, extra = match.group(1), {}
    for item in filter(None, (match.group(2) or "").split(",")):
        k, _, v = item.partition("=")
        try:
            extra[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            extra[k.strip()] = v.strip()
    if key in VARIANTS:
        return VARIANTS[key]
    name, variant = VARIANTS.get(base, (base, {}))
    return name, {**variant, **extra}


def make_batch(size: int, in_dim: int, tissue: float, device: torch.device, dtype: torch.dtype) -> GridBatch:
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((size, size, in_dim), dtype=np.float32)
    mask = rng.random((size, size)) < tissue
    mask[0, 0] = True
    return GridBatch.from_arrays([(feats, mask)], dtype=dtype).to(device)


def scan_profile(size: int, channels: tuple[int, ...], d_state: int = 16, steps: int = 3) -> None:
    """Time and memory of the 2DMamba scan alone on a size × size grid, float32, by channel count.

    ``saved`` is what the scan keeps for its backward beyond its inputs and output (the kernels' row
    checkpoints); ``bwd peak`` is the extra memory in use while its backward runs.
    """
    from wsi2dmamba import ops

    dev = torch.device("cuda")
    for e in channels:
        torch.manual_seed(0)
        u, dt, z = (torch.randn(1, e, size, size, device=dev, requires_grad=True) for _ in range(3))
        b, c = (torch.randn(1, d_state, size, size, device=dev, requires_grad=True) for _ in range(2))
        a = -torch.rand(e, d_state, device=dev) - 0.5
        d, bias = torch.ones(e, device=dev), torch.zeros(e, device=dev)

        def run(u=u, dt=dt, b=b, c=c, z=z, a=a, d=d, bias=bias):
            return ops.selective_scan_2d(u, dt, a, b, c, d, z, bias)

        out = run()
        out.sum().backward()
        torch.cuda.synchronize()
        fwd, full = [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            with torch.no_grad():
                run()
            torch.cuda.synchronize()
            fwd.append((time.perf_counter() - t0) * 1e3)
        for _ in range(steps):
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            out = run()
            torch.cuda.synchronize()
            saved = torch.cuda.memory_allocated() - base - out.numel() * out.element_size()
            out.backward(torch.ones_like(out))
            torch.cuda.synchronize()
            full.append((time.perf_counter() - t0) * 1e3)
            peak = torch.cuda.max_memory_allocated() - base
            del out
        act = e * size * size * 4 / 2**20
        print(f"scan {size}x{size} E={e:<4} fwd {np.median(fwd):7.2f} ms  fwd+bwd {np.median(full):7.2f} ms  "
              f"activation {act:6.0f} MiB  saved {saved / 2**20:6.0f} MiB  peak over inputs {peak / 2**20:6.0f} MiB",
              flush=True)
        del u, dt, z, b, c
        torch.cuda.empty_cache()


def step_stats(model: torch.nn.Module, batch: GridBatch, steps: int, amp: bool) -> tuple[float, float]:
    """Median ms per training step and peak MiB."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-5)
    target = torch.zeros(batch.batch_size, dtype=torch.long, device=batch.features.device)

    def one_step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            logits = model(batch).logits
        F.cross_entropy(logits.float(), target).backward()
        opt.step()

    one_step()  # warm-up: kernel compilation, optimiser state
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        one_step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times)), torch.cuda.max_memory_allocated() / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=[*list_models(), *VARIANTS])
    parser.add_argument("--sizes", nargs="*", type=int, default=[64, 196, 391])
    parser.add_argument("--in-dim", type=int, default=1024)
    parser.add_argument("--tissue", type=float, default=1.0, help="fraction of tissue cells")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument("--backend", default="auto", help="scan backend of the SSM models")
    parser.add_argument("--grid-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="dtype the feature grid is held in on the GPU")
    parser.add_argument("--scan-profile", action="store_true", help="profile the 2DMamba scan alone and exit")
    parser.add_argument("--scan-channels", nargs="*", type=int, default=[256, 128, 64])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    device = torch.device("cuda")
    from wsi2dmamba import ops

    if args.scan_profile:
        for size in args.sizes:
            scan_profile(size, tuple(args.scan_channels))
        return
    dtype = getattr(torch, args.grid_dtype)
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  cupy kernels: {ops.cupy_available()}  "
          f"scan backend: {args.backend}  amp: {args.amp}  tissue: {args.tissue}  in_dim: {args.in_dim}  "
          f"grid: {args.grid_dtype}")
    print(f"{'model':<44} {'grid':>8} {'params':>10} {'step ms':>9} {'peak MiB':>9}")
    for size in args.sizes:
        batch = make_batch(size, args.in_dim, args.tissue, device, dtype)
        torch.cuda.synchronize()
        grid_mib = batch.features.numel() * batch.features.element_size() / 2**20
        print(f"# {size}x{size}: the grid itself is {grid_mib:.0f} MiB", flush=True)
        for key in args.models:
            name, extra = parse_key(key)
            if name in ("2dmambamil", "m2dmil", "mambamil"):
                extra = {**extra, "scan_backend": args.backend}
            torch.manual_seed(0)
            model = create(name, in_dim=args.in_dim, n_classes=2, **extra).to(device).train()
            try:
                ms, mib = step_stats(model, batch, args.steps, args.amp)
                print(f"{key:<44} {size:>4}x{size:<3} {model.num_parameters():>10,} {ms:>9.2f} {mib:>9.0f}",
                      flush=True)
            except torch.cuda.OutOfMemoryError:
                print(f"{key:<44} {size:>4}x{size:<3} {model.num_parameters():>10,} {'OOM':>9} {'':>9}", flush=True)
            del model
            torch.cuda.empty_cache()
        del batch
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
