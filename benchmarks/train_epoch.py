"""Time of one training epoch and the GPU's busy share during it, on a cohort of real-size feature grids.

The cohort is synthetic but shaped like a real one: ``--slides`` grids whose tissue-cell counts are
log-uniform between ``--min-cells`` and ``--max-cells`` (a few hundred to 20,000), each an irregular
tissue mask (thresholded smooth noise, cropped to its bounding box, so about half of each grid is
background) of ``--in-dim`` random features per tissue cell. Every model runs the training code of
``train`` itself (``_FoldTrainer.train_epoch``: batch assembly, forward, cross-entropy, backward,
clipping, AdamW), one warm-up epoch (compiles the scan kernels for every grid width), then
``--epochs`` timed epochs, all in one process, so the models compare in one run.

GPU busy: ``nvidia-smi --query-gpu=utilization.gpu -lms 100`` sampled in a subprocess during the timed
epochs (NVML's share of each 100-ms period in which a kernel was running), averaged over the samples.

    PYTHONPATH=. python3 benchmarks/train_epoch.py                          # abmil and 2dmambamil, 1 and 4 slides a step
    PYTHONPATH=. python3 benchmarks/train_epoch.py --profile 2dmambamil     # + torch profiler of 2dmambamil's steps
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
from typing import Self

import numpy as np
import torch
import torch.nn.functional as F

from wsi2dmamba.grid import FeatureGrid
from wsi2dmamba.models import create
from wsi2dmamba.training import TrainConfig
from wsi2dmamba.training.data import Targets
from wsi2dmamba.training.loop import _FoldTrainer


def tissue_mask(rng: np.random.Generator, cells: int, fraction: float = 0.5) -> np.ndarray:
    """(H, W) bool irregular tissue of about ``cells`` cells, cropped to its bounding box."""
    side = max(4, int(np.ceil(np.sqrt(cells / fraction))))
    aspect = rng.uniform(0.6, 1.6)
    h, w = max(2, int(side * aspect ** 0.5)), max(2, int(side / aspect ** 0.5))
    coarse = torch.from_numpy(rng.standard_normal((1, 1, 6, 6)).astype(np.float32))
    smooth = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0, 0].numpy()
    noise = smooth + 0.3 * rng.standard_normal((h, w)).astype(np.float32)
    mask = noise >= np.quantile(noise, 1 - min(1.0, cells / (h * w)))
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def make_cohort(n: int, min_cells: int, max_cells: int, dim: int, dtype: str, seed: int) -> dict[str, FeatureGrid]:
    """``n`` feature grids (slide ids ``s000`` …) with log-uniform tissue-cell counts."""
    rng = np.random.default_rng(seed)
    grids = {}
    for i in range(n):
        cells = int(np.exp(rng.uniform(np.log(min_cells), np.log(max_cells))))
        mask = tissue_mask(rng, cells)
        index = np.argwhere(mask)
        feats = rng.standard_normal((len(index), dim), dtype=np.float32).astype(dtype)
        sid = f"s{i:03d}"
        grids[sid] = FeatureGrid(
            slide_id=sid, coords=index[:, ::-1] * 512, index=index, shape=mask.shape,
            tissue_fraction=np.ones(len(index), np.float32), origin_level0=(0.0, 0.0), stride_level0=512.0,
            tile_size_level0=512.0, tile_px=256, stride_px=256, mpp_requested=0.5, mpp_effective=0.5,
            mpp_level0=0.25, read_level=0, read_downsample=1.0, level0_size=(mask.shape[1] * 512, mask.shape[0] * 512),
            features=feats, encoder="random")
    return grids


class BusySampler:
    """``nvidia-smi`` utilisation samples every ``period_ms`` in a subprocess, for the GPU torch uses."""

    def __init__(self, period_ms: int = 100) -> None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
        select = ["-i", visible] if visible else ["-i", "0"]
        self.cmd = ["nvidia-smi", *select, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                    f"--loop-ms={period_ms}"]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Self:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        time.sleep(0.3)  # the first sample comes after nvidia-smi has started
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        self.samples = [float(v) for v in out.split() if v.replace(".", "", 1).isdigit()]

    @property
    def mean(self) -> float:
        return float(np.mean(self.samples)) if self.samples else float("nan")


def trainer_for(name: str, grids: dict[str, FeatureGrid], batch_size: int, precision: str, seed: int = 0,
                fused_adamw: bool = False):
    torch.manual_seed(seed)
    dim = next(iter(grids.values())).feature_dim
    model = create(name, in_dim=dim, n_classes=2).to("cuda")
    config = TrainConfig(batch_size=batch_size, device="cuda", precision=precision, epochs=3)
    labels = {sid: i % 2 for i, sid in enumerate(grids)}
    targets = Targets("classification", labels, {}, {}, {})
    trainer = _FoldTrainer(model, config, targets, grids, torch.device("cuda"), None)
    if fused_adamw:  # a candidate measured here only: one fused kernel instead of the foreach steps
        trainer.optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                              fused=True)
    return trainer


def time_epochs(trainer, order: list[str], epochs: int) -> tuple[float, float, float]:
    """(seconds per epoch, mean GPU busy %, peak MiB) over ``epochs`` epochs after a warm-up epoch."""
    trainer.train_epoch(order, 0, 10 * len(order), 0, "warm-up")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with BusySampler() as busy:
        t0 = time.perf_counter()
        for e in range(epochs):
            trainer.train_epoch(order, 0, 10 * len(order), 0, f"epoch {e}")
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / epochs
    return seconds, busy.mean, torch.cuda.max_memory_allocated() / 2**20


SYNC_NAMES = ("Synchronize", "aten::item", "_local_scalar_dense", "aten::nonzero")


def launch_and_sync_counts(counts: dict[str, int]) -> tuple[int, dict[str, int]]:
    """(kernel launches, calls that may wait for the GPU by name) among profiler event counts. ``aten::item``
    counts CPU tensors' reads too (AdamW's step counters), which wait for nothing."""
    launches = sum(n for k, n in counts.items() if "LaunchKernel" in k)
    return launches, {k: n for k, n in counts.items() if any(s in k for s in SYNC_NAMES)}


def profile_steps(trainer, order: list[str], top: int) -> None:
    """torch profiler over one epoch of ``order``: top ops by self CUDA time, launches and host syncs."""
    from torch.profiler import ProfilerActivity, profile

    trainer.train_epoch(order, 0, 10 * len(order), 0, "warm-up")
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        trainer.train_epoch(order, 0, 10 * len(order), 0, "profiled")
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    print(events.table(sort_by="self_cuda_time_total", row_limit=top, max_name_column_width=60))
    steps = len(order) // trainer.config.batch_size
    launches, syncs = launch_and_sync_counts({e.key: e.count for e in events})
    print(f"# {steps} steps: {launches} kernel launches ({launches / steps:.0f} per step); host syncs and "
          f"blocking calls: {syncs or 'none'}")
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    print(f"# kernel time {kernel_us / 1e3:.1f} ms in {wall * 1e3:.1f} ms of the profiled epoch (wall, under the "
          f"profiler): {100 * kernel_us / 1e6 / wall:.0f} % busy if no two kernels overlap")


def epoch_table(args, grids: dict[str, FeatureGrid], order: list[str]) -> None:
    """One row per model and slides per step; ``x abmil`` against abmil's epoch at the same batch size."""
    print(f"{'model':<12} {'slides/step':>11} {'epoch s':>8} {'slides/s':>9} {'x abmil':>8} {'GPU busy %':>10} "
          f"{'peak MiB':>9}")
    base: dict[int, float] = {}
    for name in args.models:
        for b in args.batch_sizes:
            trainer = trainer_for(name, grids, b, args.precision, args.seed, args.fused_adamw)
            seconds, busy, peak = time_epochs(trainer, order, args.epochs)
            if name == "abmil":
                base[b] = seconds
            ratio = f"{seconds / base[b]:.2f}" if b in base else ""
            print(f"{name:<12} {b:>11} {seconds:>8.2f} {len(order) / seconds:>9.1f} {ratio:>8} {busy:>10.0f} "
                  f"{peak:>9.0f}", flush=True)
            del trainer
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["abmil", "2dmambamil"])
    parser.add_argument("--batch-sizes", nargs="*", type=int, default=[1, 4])
    parser.add_argument("--slides", type=int, default=64)
    parser.add_argument("--min-cells", type=int, default=300)
    parser.add_argument("--max-cells", type=int, default=20_000)
    parser.add_argument("--in-dim", type=int, default=1024)
    parser.add_argument("--feature-dtype", default="float32", choices=["float32", "float16"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs (after one warm-up epoch)")
    parser.add_argument("--profile", nargs="*", default=[], help="models to profile (batch 1, one epoch)")
    parser.add_argument("--profile-slides", type=int, default=16)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fused-adamw", action="store_true", help="time AdamW(fused=True) instead of train's")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    t0 = time.perf_counter()
    grids = make_cohort(args.slides, args.min_cells, args.max_cells, args.in_dim, args.feature_dtype, args.seed)
    cells = np.array([g.n_tiles for g in grids.values()])
    grid_cells = np.array([g.shape[0] * g.shape[1] for g in grids.values()])
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  precision {args.precision}  "
          f"{'AdamW fused' if args.fused_adamw else 'AdamW as train runs it'}  "
          f"{args.slides} slides, tissue cells {cells.min()}–{cells.max()} (median {int(np.median(cells))}, "
          f"total {cells.sum():,}), grid cells {grid_cells.min()}–{grid_cells.max()}, {args.in_dim}-d "
          f"{args.feature_dtype}; cohort built in {time.perf_counter() - t0:.1f} s", flush=True)
    order = [sorted(grids)[i] for i in np.random.default_rng(args.seed).permutation(len(grids))]
    epoch_table(args, grids, order)
    for name in args.profile:
        print(f"# profile of {name}, 1 slide per step, {args.profile_slides} slides", flush=True)
        profile_steps(trainer_for(name, grids, 1, args.precision, args.seed), order[:args.profile_slides], args.top)


if __name__ == "__main__":
    main()
