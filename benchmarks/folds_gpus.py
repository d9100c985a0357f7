"""Wall time of a k-fold training run on one GPU and on several GPUs of one host.

``train_cohort`` trains the folds one after another when one GPU is visible, and side by side (one
worker process per GPU) when several are. This script times the same run under each
``CUDA_VISIBLE_DEVICES`` given, and samples ``nvidia-smi`` meanwhile to show how many GPUs were busy
at once.

The cohort: feature grids whose layout and features come from the real CC0 slide
CMU-1-Small-Region.svs. ``prepare`` (needs OpenSlide) cuts its level 0 into 32-px cells and keeps each
tissue cell's 16 colour/texture statistics; ``run`` (no OpenSlide) makes each slide a random crop, flip
and transpose of that lattice (about 1,000 to 5,000 tissue cells), maps the statistics to ``--dim``
features with a fixed random projection plus noise, and labels each patient by its dark-pixel density
(so the model has something to learn).

    python benchmarks/folds_gpus.py prepare --slide tests/data/CMU-1-Small-Region.svs --out lattice.npz
    python benchmarks/folds_gpus.py run --lattice lattice.npz --work /tmp/folds \\
        --gpu-sets 0 0,1 --folds 4 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

CELL = 32


def cell_stats(tile: np.ndarray) -> np.ndarray:
    """(T, T, 3) uint8 → (16,) float32: colour means and spreads, saturation, darkness, texture, quantiles."""
    rgb = tile.astype(np.float32) / 255.0
    grey = rgb.mean(axis=2)
    sat = rgb.max(axis=2) - rgb.min(axis=2)
    gy, gx = np.gradient(grey)
    q = np.quantile(grey, [0.1, 0.3, 0.5, 0.7, 0.9])
    return np.concatenate([rgb.reshape(-1, 3).mean(0), rgb.reshape(-1, 3).std(0), [sat.mean(), grey.mean()],
                           [(grey < 0.55).mean()], [(rgb[..., 0] - rgb[..., 1] > 0.15).mean()],
                           [np.hypot(gx, gy).mean()], q]).astype(np.float32)


def prepare(slide_path: Path, out: Path) -> None:
    from wsi2dmamba.slide import open_slide

    with open_slide(slide_path) as slide:
        w0, h0 = slide.dimensions
        img = slide.read_region((0, 0), 0, (w0, h0))
        mpp = slide.mpp
    rows, cols = h0 // CELL, w0 // CELL
    index, stats = [], []
    for r in range(rows):
        for c in range(cols):
            tile = img[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL]
            sat = tile.max(axis=2).astype(np.int16) - tile.min(axis=2)
            if (sat > 20).mean() >= 0.25:
                index.append((r, c))
                stats.append(cell_stats(tile))
    np.savez_compressed(out, index=np.array(index, np.int32), stats=np.stack(stats), shape=np.array([rows, cols]),
                        mpp=np.array(mpp))
    print(f"{len(index)} tissue cells of {rows}×{cols} from {slide_path} → {out}")


def make_cohort(lattice: Path, work: Path, patients: int, dim: int, seed: int = 0) -> tuple[Path, Path]:
    """Write the cohort's feature grids and manifest under ``work`` (once)."""
    import pandas as pd

    from wsi2dmamba.grid import FeatureGrid, write_feature_grid

    manifest, feat_dir = work / "cohort.csv", work / "features" / "cmu-stats"
    if manifest.is_file():
        return manifest, feat_dir
    z = np.load(lattice)
    index, stats, (rows, cols), mpp = z["index"], z["stats"], z["shape"], float(z["mpp"])
    stats = (stats - stats.mean(0)) / (stats.std(0) + 1e-6)
    rng = np.random.default_rng(seed)
    proj = rng.standard_normal((stats.shape[1], dim)).astype(np.float32) / np.sqrt(stats.shape[1])
    feat_dir.mkdir(parents=True, exist_ok=True)
    records, scores = [], []
    for p in range(patients):
        h = int(rng.integers(rows // 2, rows + 1))
        w = int(rng.integers(cols // 2, cols + 1))
        r0, c0 = int(rng.integers(0, rows - h + 1)), int(rng.integers(0, cols - w + 1))
        keep = (index[:, 0] >= r0) & (index[:, 0] < r0 + h) & (index[:, 1] >= c0) & (index[:, 1] < c0 + w)
        idx = index[keep] - np.array([r0, c0], np.int32)
        if rng.random() < 0.5:
            idx[:, 1] = w - 1 - idx[:, 1]
        if rng.random() < 0.5:
            idx, h, w = idx[:, ::-1].copy(), w, h
        order = np.lexsort((idx[:, 1], idx[:, 0]))
        idx = idx[order]
        s = stats[keep][order] + rng.normal(0, 0.1, size=(len(idx), stats.shape[1])).astype(np.float32)
        feats = np.tanh(s @ proj)
        sid = f"P{p:03d}"
        grid = FeatureGrid(slide_id=sid, coords=idx[:, ::-1].astype(np.int64) * CELL, index=idx, shape=(h, w),
                           tissue_fraction=np.ones(len(idx), np.float32), origin_level0=(0.0, 0.0),
                           stride_level0=float(CELL), tile_size_level0=float(CELL), tile_px=CELL, stride_px=CELL,
                           mpp_requested=mpp, mpp_effective=mpp, mpp_level0=mpp, read_level=0,
                           read_downsample=1.0, level0_size=(cols * CELL, rows * CELL),
                           features=feats.astype(np.float32), encoder="cmu-stats")
        write_feature_grid(feat_dir / f"{sid}.h5", grid)
        records.append({"slide_id": sid, "patient_id": sid})
        scores.append(float(s[:, 8].mean()))
    cut = np.median(scores)
    for rec, sc in zip(records, scores):
        rec["label"] = "dense" if sc > cut else "sparse"
    pd.DataFrame(records).to_csv(manifest, index=False)
    print(f"cohort: {patients} slides, D={dim}, crops of a {rows}×{cols} lattice with {len(index)} tissue cells")
    return manifest, feat_dir


def train(manifest: Path, features: Path, out: Path, model: str, folds: int, epochs: int,
          device: str = "cuda") -> dict:
    """One timed ``train_cohort`` run (in this process, with the GPUs this process sees)."""
    import pandas as pd

    from wsi2dmamba.cohort import load_cohort
    from wsi2dmamba.cohort.executors import visible_gpus
    from wsi2dmamba.training import TrainConfig, train_cohort

    cohort = load_cohort(manifest, require_path=False, check_files=False)
    config = TrainConfig(folds=folds, epochs=epochs, device=device, precision="bf16" if device == "cuda" else "fp32")
    start = time.time()
    t0 = time.perf_counter()
    res = train_cohort(cohort, features, out, model, config, progress=False)
    seconds = time.perf_counter() - t0
    timeline = []
    for f in res.folds:
        # config.json is written when the fold's model is on its device, done.json when the fold ends;
        # log.csv holds the seconds of each epoch's training and validation (checkpoint writing excluded).
        began = (f.fold_dir / "config.json").stat().st_mtime - start
        ended = (f.fold_dir / "done.json").stat().st_mtime - start
        epochs = pd.read_csv(f.fold_dir / "log.csv")["seconds"].sum()
        timeline.append({"fold": f.fold, "began_s": round(began, 1), "ended_s": round(ended, 1),
                         "epoch_seconds": round(float(epochs), 1)})
    return {"gpus": visible_gpus(), "seconds": seconds, "folds": [f.fold for f in res.folds],
            "best": [round(f.best_value, 6) for f in res.folds], "timeline": timeline}


class GpuSampler:
    """Samples per-GPU utilisation with nvidia-smi every ``period`` s while the run goes on."""

    def __init__(self, period: float = 0.5):
        self.period, self.samples, self._stop = period, [], threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=index,utilization.gpu",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True,
                                     timeout=5).stdout
                self.samples.append({int(a): int(b) for a, b in (line.split(",") for line in out.strip().splitlines())})
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
            self._stop.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        if not self.samples:
            return {}
        gpus = sorted({g for s in self.samples for g in s})
        busy = {g: float(np.mean([s.get(g, 0) > 10 for s in self.samples])) for g in gpus}
        together = float(np.mean([sum(v > 10 for v in s.values()) >= 2 for s in self.samples]))
        return {"busy_fraction": busy, "two_or_more_busy_fraction": together, "samples": len(self.samples)}


def run(args: argparse.Namespace) -> None:
    work = Path(args.work)
    manifest, features = make_cohort(Path(args.lattice), work, args.patients, args.dim)
    if args.warmup:
        # Compile the scan kernels once (CuPy caches them on disk), so that no timed run pays for it.
        first = args.gpu_sets[0].split(",")[0]
        subprocess.run([sys.executable, __file__, "train", "--manifest", str(manifest), "--features", str(features),
                        "--out", str(work / "warmup"), "--model", args.model, "--folds", "2", "--epochs", "1",
                        "--device", args.device], env={**os.environ, "CUDA_VISIBLE_DEVICES": first}, check=True,
                       capture_output=True)
    results = []
    for gpus in args.gpu_sets:
        out = work / f"run-gpus-{gpus.replace(',', '_')}"
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpus}
        cmd = [sys.executable, __file__, "train", "--manifest", str(manifest), "--features", str(features),
               "--out", str(out), "--model", args.model, "--folds", str(args.folds), "--epochs", str(args.epochs),
               "--device", args.device]
        with GpuSampler() as sampler:
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stdout, proc.stderr, file=sys.stderr)
            raise SystemExit(f"training on GPUs {gpus} failed")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res.update(visible=gpus, process_seconds=wall, gpu_use=sampler.summary())
        results.append(res)
        print(json.dumps(res), flush=True)
    base = results[0]["seconds"]
    print(f"\n{args.model}, {args.folds} folds × {args.epochs} epochs, {args.patients} slides, D={args.dim}")
    print(f"{'CUDA_VISIBLE_DEVICES':>22} {'train_cohort s':>15} {'speed-up':>9} {'≥2 GPUs busy':>13}")
    for r in results:
        both = r["gpu_use"].get("two_or_more_busy_fraction", float("nan"))
        print(f"{r['visible']:>22} {r['seconds']:>15.1f} {base / r['seconds']:>8.2f}× {both:>12.0%}")
    same = all(r["best"] == results[0]["best"] for r in results)
    print(f"best validation values identical across GPU sets: {same}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--slide", required=True)
    p.add_argument("--out", required=True)
    r = sub.add_parser("run")
    r.add_argument("--lattice", required=True)
    r.add_argument("--work", required=True)
    r.add_argument("--gpu-sets", nargs="+", default=["0", "0,1"])
    r.add_argument("--model", default="2dmambamil")
    r.add_argument("--patients", type=int, default=48)
    r.add_argument("--dim", type=int, default=512)
    r.add_argument("--folds", type=int, default=4)
    r.add_argument("--epochs", type=int, default=3)
    r.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of the script")
    r.add_argument("--warmup", action="store_true", help="one short untimed run first (kernel compilation)")
    t = sub.add_parser("train")
    for name in ("--manifest", "--features", "--out", "--model"):
        t.add_argument(name, required=True)
    t.add_argument("--folds", type=int, required=True)
    t.add_argument("--epochs", type=int, required=True)
    t.add_argument("--device", default="cuda")
    a = ap.parse_args()
    if a.cmd == "prepare":
        prepare(Path(a.slide), Path(a.out))
    elif a.cmd == "run":
        run(a)
    else:
        print(json.dumps(train(Path(a.manifest), Path(a.features), Path(a.out), a.model, a.folds, a.epochs,
                               a.device)))


if __name__ == "__main__":
    main()
