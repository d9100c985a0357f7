"""Feature extraction throughput: end to end, and the decode-only and encoder-only ceilings.

Measures, on one large pyramidal TIFF of real tissue (built by ``make_tissue_tiff.py`` when missing):

* decode-only: the extraction's own tile loader (worker processes, region reads, pinned memory), with
  nothing consuming the tiles: the most tiles/s the CPU side can deliver;
* encoder-only: preprocessing + encoder on uint8 tiles already on the device: the most tiles/s the
  model can take;
* end to end: ``extract_cohort`` on a one-slide cohort (tiles file in, feature grid file out, state and
  ledger written), plus the GPU's busy fraction sampled during it.

Each is measured for every decode path asked for (``--decode``): ``openslide`` (reader processes, for
every ``--workers`` count) and ``jpeg`` (the stored JPEG tiles decoded in batches on the encoder's
device); the features of the two paths are compared tile by tile (cosine).

    python benchmarks/extract.py --tiff /tmp/tissue.tif --size 40000 --encoder resnet50-trunc \
        --random-weights --device cuda --workers 15 --decode openslide,jpeg --batch-size 256

Random weights (``--random-weights``) cost the same time as real ones; use them when the weight file
is not at hand.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import threading
import time
from pathlib import Path

import numpy as np


def decode_only(plan, batch_size: int, workers: int, pin: bool) -> tuple[float, int]:
    from wsi2dmamba.features.loader import make_loader

    loader = make_loader(plan, batch_size=batch_size, workers=workers, pin_memory=pin)
    n = 0
    t0 = time.perf_counter()
    for images, idx, _ in loader:
        n += len(idx)
    return n / (time.perf_counter() - t0), n


def decode_only_jpeg(plan, level, batch_size: int, device) -> tuple[float, int]:
    import torch

    from wsi2dmamba.features.tile_decode import JpegTileBatches

    n = 0
    t0 = time.perf_counter()
    for images, idx, _ in JpegTileBatches(plan, level, batch_size, device):
        n += len(idx)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0), n


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b``."""
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)


def encoder_only(encoder, batch_size: int, tile_px: int, seconds: float = 8.0) -> float:
    import torch

    x = torch.randint(0, 256, (batch_size, tile_px, tile_px, 3), dtype=torch.uint8, device=encoder.device)
    sync = torch.cuda.synchronize if encoder.device.type == "cuda" else (lambda: None)
    with torch.backends.cudnn.flags(enabled=True, benchmark=True, deterministic=False, allow_tf32=True):
        for _ in range(5):
            encoder.encode(x)
        sync()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(10):
                encoder.encode(x)
            n += 10 * batch_size
            sync()
    return n / (time.perf_counter() - t0)


class GpuBusy:
    """Samples the GPU's utilisation (NVML) every 50 ms in a thread."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import torch

        while not self._stop.is_set():
            try:
                self.samples.append(int(torch.cuda.utilization()))
            except Exception:
                return
            time.sleep(0.05)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()

    @property
    def mean(self) -> float:
        return float(np.mean(self.samples)) if self.samples else float("nan")


def measure(decode: str, w: int, a, plan, cohort, enc, enc_rate: float, features: dict) -> dict:
    """Decode-only and end-to-end rates of one decode path; keeps the features written in ``features``."""
    from wsi2dmamba.features import ExtractConfig, extract_cohort, feature_path
    from wsi2dmamba.grid import read_feature_grid
    from wsi2dmamba.slide import open_slide
    from wsi2dmamba.slide.jpeg_tiles import jpeg_tile_level

    if decode == "jpeg":
        with open_slide(a.tiff) as s:
            level = jpeg_tile_level(s.path, s.vendor, s.level_dimensions[plan.level])
        dec_rate, _ = decode_only_jpeg(plan, level, a.batch_size, enc.device)
    else:
        dec_rate, _ = decode_only(plan, a.batch_size, w, enc.device.type == "cuda")
    cfg = ExtractConfig(encoder=enc.name, device=str(enc.device), batch_size=a.batch_size, workers=w,
                        pretrained=not a.random_weights, decode=decode)
    with GpuBusy() as busy:
        summary = extract_cohort(cohort, a.run, cfg, progress=False, force=True, encoder=enc)
    if summary.failed:
        raise SystemExit(f"extraction failed: {summary.failed}")
    info = summary.infos["bench"]
    features[f"{decode}-{w}"] = read_feature_grid(feature_path(a.run, enc.name, "bench")).features
    e2e = info["n_tiles"] / summary.seconds
    ceiling = min(dec_rate, enc_rate)
    label = f"{decode} ({w} readers)" if decode == "openslide" else f"{decode} ({info['decode']})"
    print(f"{label}: decode-only {dec_rate:,.0f} tiles/s | end to end {e2e:,.0f} tiles/s "
          f"({summary.seconds:.1f} s incl. file write; {info['tiles_per_s']:,.0f} tiles/s in the loop) | "
          f"{100 * e2e / ceiling:.0f}% of the lower ceiling | {100 * e2e / enc_rate:.0f}% of encoder-only | "
          f"GPU busy {busy.mean:.0f}%")
    return {"decode": decode, "decode_path": info["decode"], "workers": w, "decode_only": dec_rate,
            "end_to_end": e2e, "extract_only": info["tiles_per_s"], "stage_seconds": summary.seconds,
            "gpu_busy_percent": busy.mean, "fraction_of_lower_ceiling": e2e / ceiling,
            "fraction_of_encoder_only": e2e / enc_rate}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiff", type=Path, required=True, help="pyramidal TIFF (built when missing)")
    ap.add_argument("--size", type=int, default=40000, help="side of the TIFF to build, in pixels")
    ap.add_argument("--source", type=Path, default=None, help="slide whose tissue fills the TIFF")
    ap.add_argument("--run", type=Path, default=Path("/tmp/wsi2dmamba-bench-run"))
    ap.add_argument("--encoder", default="resnet50-trunc")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default=None)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", default="15", help="comma-separated reader process counts to measure")
    ap.add_argument("--decode", default="openslide,jpeg", help="comma-separated decode paths to measure")
    ap.add_argument("--tile-px", type=int, default=256)
    ap.add_argument("--mpp", type=float, default=0.5, help="tile resolution, µm per pixel")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = ap.parse_args()

    import torch

    from wsi2dmamba.cohort import load_cohort
    from wsi2dmamba.features import load_encoder
    from wsi2dmamba.features.loader import TileReadPlan
    from wsi2dmamba.grid import read_tile_grid
    from wsi2dmamba.tiling import TileConfig, tile_cohort

    if not a.tiff.is_file():
        from make_tissue_tiff import build

        build(a.tiff, a.size, source=a.source)
    t0 = time.perf_counter()
    a.run.mkdir(parents=True, exist_ok=True)
    manifest = a.run / "cohort.csv"
    with open(manifest, "w", newline="") as fh:
        csv.writer(fh).writerows([["slide_id", "path"], ["bench", str(a.tiff)]])
    cohort = load_cohort(manifest)
    tiled = tile_cohort(cohort, a.run, TileConfig(tile_px=a.tile_px, mpp=a.mpp, segment_missing=True),
                        progress=False)
    if tiled.failed:
        raise SystemExit(f"tiling failed: {tiled.failed}")
    tiles = read_tile_grid(a.run / "tiles" / "bench.h5")
    print(f"slide {a.tiff} {tiles.level0_size[0]}×{tiles.level0_size[1]} px; {tiles.n_tiles} tissue tiles of "
          f"{a.tile_px} px at {tiles.mpp_effective} µm/px on a {tiles.shape[0]}×{tiles.shape[1]} grid (segment + tile {time.perf_counter() - t0:.1f} s)")

    enc = load_encoder(a.encoder, device=a.device, precision=a.precision, pretrained=not a.random_weights)
    cpu_name = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if enc.device.type == "cuda" else "none"
    print(f"encoder {enc.name} ({'random' if a.random_weights else 'pretrained'} weights), {enc.precision}, "
          f"device {enc.device} ({gpu}), {os.cpu_count()} CPU cores ({cpu_name}), batch {a.batch_size}")
    enc_rate = encoder_only(enc, a.batch_size, a.tile_px)
    print(f"encoder-only ceiling: {enc_rate:,.0f} tiles/s")
    plan = TileReadPlan.from_tiles(tiles, a.tiff, tiles.mpp_level0)
    results = {"tiles": tiles.n_tiles, "encoder": enc.name, "precision": enc.precision, "gpu": gpu,
               "cpu_cores": os.cpu_count(), "batch_size": a.batch_size, "encoder_only": enc_rate, "runs": []}
    features = {}
    for decode in a.decode.split(","):
        for w in [int(v) for v in a.workers.split(",")] if decode == "openslide" else [0]:
            row = measure(decode, w, a, plan, cohort, enc, enc_rate, features)
            results["runs"].append(row)
    if len(features) > 1:
        (k0, f0), *rest = features.items()
        for k, f in rest:
            cos = cosine_rows(f0, f)
            results[f"cosine_{k0}_vs_{k}"] = {"min": float(cos.min()), "mean": float(cos.mean())}
            print(f"features {k0} vs {k}: cosine min {cos.min():.5f}, mean {cos.mean():.6f} over {len(cos)} tiles")
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
