"""Screen demo settings on a development seed without the slide pipeline: is a demo rule learnable?

Feature grids are assembled from real tile features: each cell of a drawn layout gets the features of a
random tile of its kind, taken from a finished demo run (``--tiles``: its manifest's ``cells`` and its
feature files) or from cells rendered as the demo renders them and encoded by the built-in encoder
(``--render N``: N tiles per kind, JPEG-compressed at the slides' quality, saved with ``--save-pool``).
Then each model trains with the published recipe (AdamW, cosine schedule, gradient clipping), cross-
validated, the checkpoint picked on validation loss; every epoch's train loss, validation loss and AUC
and test AUC are printed, so a run shows whether a model learns the rule, memorises, or does not fit.

    python benchmarks/demo_dev_screen.py --tiles runs/demo --seed 101 --models 2dmambamil,2dmambamil:noscan
    python benchmarks/demo_dev_screen.py --render 300 --save-pool pool.npz --slides 384 --batch 16 \
        --lr 2e-3 --warmup 64 --epochs 25 --models 2dmambamil:4corners

Use development seeds only (never the seed of the reported cohort, ``pipelines/demo.toml``).
Save the printed log, then draw its per-fold curves:

    python benchmarks/demo_dev_screen.py --plot screen.log other.log --out curves.png
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import re
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch


def tile_pool(run: Path) -> dict[int, np.ndarray]:
    """Cell kind → (n, D) features of every tissue tile of that kind in a demo run folder."""
    from wsi2dmamba.demo.layout import layout_from_letters
    from wsi2dmamba.grid.files import read_feature_grid

    rows = list(csv.DictReader((run / "cohort" / "manifest.csv").open()))
    features_dir = next((run / "features").iterdir())
    pool: dict[int, list[np.ndarray]] = {k: [] for k in range(1, 5)}
    for row in rows:
        feats, mask = read_feature_grid(features_dir / f"{row['slide_id']}.h5").dense()
        cells = layout_from_letters(row["cells"])
        for kind, tiles in pool.items():
            tiles.append(feats[(cells == kind) & mask])
    return {k: np.concatenate(v) for k, v in pool.items()}


def rendered_pool(n: int, seed: int = 7) -> dict[int, np.ndarray]:
    """Cell kind → (n, D) features of ``n`` cells of that kind rendered as the demo renders them (JPEG at
    quality 90, as the slides are written) and encoded by the built-in encoder on the CPU."""
    import io

    from PIL import Image

    from wsi2dmamba.demo.mosaic import Augment, cell_image
    from wsi2dmamba.features.encoders import get_encoder

    spec = get_encoder("efficientnet-lite0")
    model = spec.build()
    rng = np.random.default_rng(seed)
    pool = {}
    for kind in range(1, 5):
        tiles = []
        for _ in range(n):
            buf = io.BytesIO()
            Image.fromarray(cell_image(kind, rng, Augment())).save(buf, "JPEG", quality=90)
            tiles.append(np.asarray(Image.open(buf).convert("RGB")))
        batch = torch.from_numpy(np.stack(tiles))
        with torch.no_grad():
            pool[kind] = np.concatenate([model(spec.preprocess(batch[k:k + 64])).float().numpy()
                                         for k in range(0, n, 64)])
    return pool


def load_pool(args) -> dict[int, np.ndarray]:
    """The tile pool the screen draws from: a saved pool, a finished demo run's tiles, or rendered cells."""
    if args.pool:
        return {int(k): v for k, v in np.load(args.pool).items()}
    pool = tile_pool(args.tiles) if args.tiles else rendered_pool(args.render)
    if args.save_pool:
        np.savez(args.save_pool, **{str(k): v for k, v in pool.items()})
    return pool


def principal_axes(pool: dict[int, np.ndarray], k: int, shares: dict[int, float] | None = None,
                   ) -> dict[int, np.ndarray]:
    """The pool's features projected on their first ``k`` principal axes, whitened (unit variance each).

    Few axes keep the tissue kinds apart (the kinds' means differ along a handful of directions) and take
    away the rest of each tile's 1280 numbers, through which a model can memorise its training slides.
    ``shares`` (kind → fraction of the cohort's tissue cells) weights each kind as the slides hold it, as
    ``train --input-axes`` fits on the training cells; without it every tile of the pool weighs the same.
    """
    kinds = sorted(kind for kind in pool if len(pool[kind]))
    feats = np.concatenate([pool[kind] for kind in kinds]).astype(np.float64)
    share = shares or {kind: len(pool[kind]) for kind in kinds}  # default: every pooled tile weighs the same
    weight = np.concatenate([np.full(len(pool[kind]), share.get(kind, 0.0) / len(pool[kind])) for kind in kinds])
    weight /= weight.sum()
    mean = weight @ feats
    _, sing, axes = np.linalg.svd((feats - mean) * np.sqrt(weight)[:, None], full_matrices=False)
    proj = axes[:k].T / sing[:k]
    return {kind: ((v - mean) @ proj).astype(np.float32) for kind, v in pool.items()}


def draw_slides(args) -> list:
    """The development cohort's layouts, as ``--seed``, ``--slides``, ``--rule``, ``--grid`` and ``--spec`` say."""
    from wsi2dmamba.demo import DemoCohortSpec, LongRangeSpec, draw_cohort

    grid = LongRangeSpec(rows=args.grid, cols=args.grid) if args.grid else LongRangeSpec()
    if args.spec:
        grid = dataclasses.replace(grid, **{k: tuple(v) if isinstance(v, list) else v
                                            for k, v in json.loads(args.spec).items()})
    return draw_cohort(DemoCohortSpec(n_slides=args.slides, seed=args.seed, rule=args.rule, long_range=grid))


def cell_shares(slides: list) -> dict[int, float]:
    """Kind → fraction of the tissue cells of the drawn slides."""
    cells = np.concatenate([s.layout.cells.ravel() for s in slides])
    cells = cells[cells > 0]
    return {int(kind): float((cells == kind).mean()) for kind in np.unique(cells)}


def synthetic_grids(args, slides: list, pool: dict[int, np.ndarray],
                    ) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """(features (H, W, D), tissue mask) per drawn slide, and the labels."""
    rng = np.random.default_rng([args.seed, 3])
    items = []
    for s in slides:
        cells = s.layout.cells
        feats = np.zeros((*cells.shape, pool[1].shape[1]), np.float32)
        for kind, tiles in pool.items():
            where = np.argwhere(cells == kind)
            feats[where[:, 0], where[:, 1]] = tiles[rng.integers(len(tiles), size=len(where))]
        items.append((feats, cells > 0))
    return items, np.array([s.layout.label for s in slides])


def dihedral(features: np.ndarray, tissue: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Grid (H, W, D) and mask (H, W) under the symmetry ``k`` of the square (bit 0 transpose, bit 1 rotate by
    180°, bit 2 mirror left-right); ``k`` < 4 keeps a falling diagonal falling."""
    if k & 1:
        features, tissue = features.transpose(1, 0, 2), tissue.T
    if k & 2:
        features, tissue = features[::-1, ::-1], tissue[::-1, ::-1]
    if k & 4:
        features, tissue = features[:, ::-1], tissue[:, ::-1]
    return np.ascontiguousarray(features), np.ascontiguousarray(tissue)


def train_fold(args, key: str, items, y, train, val, test, fold: int) -> float:
    """Train one fold; print one line per epoch; return the test AUC at the best validation loss."""
    from sklearn.metrics import roc_auc_score

    from wsi2dmamba.models import create
    from wsi2dmamba.models.batch import GridBatch

    name, _, preset = key.partition(":")
    seed = fold + 1000 * args.restart  # restart 0 keeps the seeds of earlier screens
    torch.manual_seed(seed)
    model = create(name, in_dim=items[0][0].shape[-1], n_classes=2, preset=preset or None,
                   **json.loads(args.options)).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-5)
    steps, step = args.epochs * math.ceil(len(train) / args.batch), 0
    order = np.random.default_rng(seed)
    views = np.random.default_rng(12345)
    best = (math.inf, float("nan"))

    def predict(ids):
        with torch.no_grad():
            batch = GridBatch.from_arrays([items[i] for i in ids]).to(args.device)
            return torch.softmax(model(batch).logits, -1)[:, 1].cpu().numpy()

    for epoch in range(args.epochs):
        model.train()
        perm, total = order.permutation(train), 0.0
        for k in range(0, len(perm), args.batch):
            ids = perm[k:k + args.batch]
            warm = min(1.0, (step + 1) / args.warmup) if args.warmup else 1.0
            for group in opt.param_groups:
                group["lr"] = args.lr * warm * 0.5 * (1 + math.cos(math.pi * step / steps))
            grids = [items[i] if not args.aug else dihedral(*items[i], int(views.integers(args.aug))) for i in ids]
            logits = model(GridBatch.from_arrays(grids).to(args.device)).logits
            loss = torch.nn.functional.cross_entropy(logits, torch.as_tensor(y[ids], device=args.device))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            total += loss.item() * len(ids)
        model.eval()
        pv, pt = predict(val), predict(test)
        val_loss = float(np.mean(-np.log(np.where(y[val] == 1, pv, 1 - pv) + 1e-9)))
        test_auc = roc_auc_score(y[test], pt)
        if val_loss < best[0]:
            best = (val_loss, test_auc)
        print(f"{key} fold {fold} epoch {epoch}: train loss {total / len(train):.3f}  val loss {val_loss:.3f}  "
              f"val AUC {roc_auc_score(y[val], pv):.2f}  test AUC {test_auc:.2f}", flush=True)
    return best[1]


_EPOCH_LINE = re.compile(r"(\S+) fold (\d+) epoch (\d+): train loss ([\d.]+)\s+val loss ([\d.]+)\s+val AUC ([\d.]+)")


def plot_logs(logs: list[Path], out: Path) -> None:
    """One column per log, rows: train loss, validation loss, validation AUC per epoch, one line per fold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, len(logs), figsize=(4.2 * len(logs), 8), squeeze=False, sharex=True)
    for col, log in enumerate(logs):
        curves: dict[tuple[str, int], list[tuple[float, ...]]] = defaultdict(list)
        for line in log.read_text().splitlines():
            if m := _EPOCH_LINE.match(line):
                curves[(m[1], int(m[2]))].append(tuple(float(v) for v in m.groups()[2:]))
        for (model, fold), rows in curves.items():
            ep, train, val, auc = np.array(rows).T
            for row, values in enumerate((train, val, auc)):
                axes[row, col].plot(ep, values, label=f"fold {fold}")
            axes[0, col].set_title(f"{model} ({log.stem})", fontsize=9)
        for row, name in enumerate(("train loss", "validation loss", "validation AUC")):
            axes[row, col].set_ylabel(name)
        axes[2, col].axhline(0.5, color="grey", lw=0.8, ls="--")
        axes[2, col].set_xlabel("epoch")
        axes[0, col].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    from sklearn.model_selection import StratifiedKFold, train_test_split

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=Path, help="a finished demo run folder (features + manifest)")
    ap.add_argument("--render", type=int, default=0, help="or: render and encode this many cells per kind")
    ap.add_argument("--pool", type=Path, help="or: a pool saved by --save-pool")
    ap.add_argument("--save-pool", type=Path, help="save the pool (npz) for later screens")
    ap.add_argument("--spec", default="", help="long-range rule: LongRangeSpec fields as JSON")
    ap.add_argument("--options", default="{}", help="model configuration fields as JSON")
    ap.add_argument("--warmup", type=int, default=0, help="linear warm-up, in optimiser steps")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--plot", type=Path, nargs="+", help="draw the curves of these saved logs instead")
    ap.add_argument("--out", type=Path, default=Path("curves.png"), help="picture written by --plot")
    ap.add_argument("--seed", type=int, default=101, help="development seed of the drawn layouts")
    ap.add_argument("--rule", default="long-range")
    ap.add_argument("--slides", type=int, default=96)
    ap.add_argument("--grid", type=int, default=0, help="long-range rule: cells per side (default 13)")
    ap.add_argument("--models", default="2dmambamil")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--max-folds", type=int, default=5, help="stop after this many folds")
    ap.add_argument("--aug", type=int, default=0, choices=(0, 4, 8),
                    help="train on random symmetries of each grid: 8 all of the square's, 4 those keeping the "
                    "falling diagonal")
    ap.add_argument("--pca", type=int, default=0,
                    help="project the pool's features on their first K principal axes (whitened) first")
    ap.add_argument("--pca-weights", choices=("kinds", "cells"), default="kinds",
                    help="fit the axes with every kind weighing the same, or each as often as the slides hold it")
    ap.add_argument("--only", default="", help="comma-separated folds to run (default: all)")
    ap.add_argument("--restart", type=int, default=0,
                    help="another training of the same folds: weights and slide order seeded fold + 1000 × restart")
    args = ap.parse_args()
    if args.plot:
        plot_logs(args.plot, args.out)
        return
    if not (args.tiles or args.render or args.pool):
        ap.error("give --tiles, --render or --pool")
    torch.set_num_threads(1)
    pool = load_pool(args)
    slides = draw_slides(args)
    shares = cell_shares(slides) if args.pca_weights == "cells" else None
    items, y = synthetic_grids(args, slides, principal_axes(pool, args.pca, shares) if args.pca else pool)
    splits = list(StratifiedKFold(args.folds, shuffle=True, random_state=0).split(y, y))[:args.max_folds]
    for key in args.models.split(","):
        aucs, t0 = [], time.time()
        for fold, (rest, test) in enumerate(splits):
            if args.only and str(fold) not in args.only.split(","):
                continue
            train, val = train_test_split(rest, test_size=0.2, stratify=y[rest], random_state=fold)
            aucs.append(train_fold(args, key, items, y, train, val, test, fold))
        sd = np.std(aucs, ddof=1) if len(aucs) > 1 else 0.0
        print(f"== {key}: test AUC per fold {np.round(aucs, 3).tolist()}, mean {np.mean(aucs):.3f} ± {sd:.3f} "
              f"({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
