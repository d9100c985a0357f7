"""Training-step time and peak GPU memory of every MIL model on square feature grids.

One step = forward, cross-entropy on the logits, backward, AdamW update, on one slide whose grid is
S × S cells of ``--in-dim`` features (all cells tissue unless ``--tissue`` < 1). Peak memory is
``torch.cuda.max_memory_allocated`` over the step, including the grid itself on the GPU.

    PYTHONPATH=. python3 benchmarks/models.py                      # all models, 64, 196, 391 cells a side
    PYTHONPATH=. python3 benchmarks/models.py --models abmil 2dmambamil --sizes 391 --amp
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from wsi2dmamba.models import GridBatch, create, list_models

VARIANTS = {  # extra rows: name -> (registry name, overrides)
    "2dmambamil[paper]": ("2dmambamil", {"preset": "paper"}),
    "2dmambamil[2 corners]": ("2dmambamil", {"corners": ["tl", "br"]}),
}


def make_batch(size: int, in_dim: int, tissue: float, device: torch.device) -> GridBatch:
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((size, size, in_dim), dtype=np.float32)
    mask = rng.random((size, size)) < tissue
    mask[0, 0] = True
    return GridBatch.from_arrays([(feats, mask)]).to(device)


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
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    device = torch.device("cuda")
    from wsi2dmamba import ops

    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  cupy kernels: {ops.cupy_available()}  "
          f"scan backend: {args.backend}  amp: {args.amp}  tissue: {args.tissue}  in_dim: {args.in_dim}")
    print(f"{'model':<24} {'grid':>8} {'params':>10} {'step ms':>9} {'peak MiB':>9}")
    for size in args.sizes:
        batch = make_batch(size, args.in_dim, args.tissue, device)
        torch.cuda.synchronize()
        for key in args.models:
            name, extra = VARIANTS.get(key, (key, {}))
            if name in ("2dmambamil", "m2dmil", "mambamil"):
                extra = {**extra, "scan_backend": args.backend}
            torch.manual_seed(0)
            model = create(name, in_dim=args.in_dim, n_classes=2, **extra).to(device).train()
            try:
                ms, mib = step_stats(model, batch, args.steps, args.amp)
                print(f"{key:<24} {size:>4}x{size:<3} {model.num_parameters():>10,} {ms:>9.2f} {mib:>9.0f}",
                      flush=True)
            except torch.cuda.OutOfMemoryError:
                print(f"{key:<24} {size:>4}x{size:<3} {model.num_parameters():>10,} {'OOM':>9} {'':>9}", flush=True)
            del model
            torch.cuda.empty_cache()
        del batch
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
