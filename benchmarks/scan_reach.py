"""How far a 2D model's blocks reach at initialisation: the influence of one cell's input on another
cell's output, by offset.

For a model just created (weights of its own init), the embedded grid ``x`` (B, H, W, d) goes through the
blocks to ``y``. The reach from a source cell to a site is the Frobenius norm of the Jacobian
∂y[site] / ∂x[source] (estimated with random projections), divided by that of the site on itself (the
residual path makes the latter about 1). Averaged over ``--seeds`` initialisations.

    python benchmarks/scan_reach.py --pool pool.npz            # features of stroma cells (demo_dev_screen's pool)
    python benchmarks/scan_reach.py --models 2dmambamil:4corners,m2dmil --options '{"d_model": 32}'

A long-range rule needs the reach at 4–5 cells to grow during training; where it starts orders of
magnitude below the local path's, training first sits on a plateau (``docs/demo.md``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

# (name, offset from the site): sources above and left of the site, where a top-left scan reads them
OFFSETS = (("neighbour", (0, -1)), ("row 4", (0, -4)), ("row 5", (0, -5)), ("column 4", (-4, 0)),
           ("diagonal 2,2", (-2, -2)), ("diagonal 3,3", (-3, -3)))


def grid_features(pool: Path | None, side: int, dim: int, seed: int = 0) -> np.ndarray:
    """(side, side, D) features: stroma cells of a pool file (``demo_dev_screen.py --save-pool``), or N(0, 1)."""
    rng = np.random.default_rng(seed)
    if pool is None:
        return rng.standard_normal((side, side, dim)).astype(np.float32)
    tiles = np.load(pool)["3"]  # kind 3: stroma (wsi2dmamba.demo.layout.STROMA)
    return tiles[rng.integers(len(tiles), size=side * side)].reshape(side, side, -1).astype(np.float32)


def reach(key: str, options: dict, feats: np.ndarray, site: tuple[int, int], seeds: int,
          projections: int = 8) -> dict[str, float]:
    """Mean relative reach of each offset of :data:`OFFSETS` to ``site`` over ``seeds`` initialisations."""
    from wsi2dmamba.models import create
    from wsi2dmamba.models.batch import GridBatch
    from wsi2dmamba.models.grid_layout import GridLayout

    name, _, preset = key.partition(":")
    batch = GridBatch.from_arrays([(feats, np.ones(feats.shape[:2], bool))])
    out: dict[str, list[float]] = {label: [] for label, _ in OFFSETS}
    for seed in range(seeds):
        torch.manual_seed(seed)
        model = create(name, in_dim=feats.shape[-1], n_classes=2, preset=preset or None, **options).eval()
        x0 = model.cells(batch).detach().requires_grad_(True)
        layout = GridLayout.from_batch(batch)
        y = x0
        for block in model.blocks:
            y = block(y, layout)
        for _ in range(projections):
            v = torch.randn(y.shape[-1])
            (grad,) = torch.autograd.grad((y[0, site[0], site[1]] * v).sum(), x0, retain_graph=True)
            norms = grad[0].norm(dim=-1)
            for label, (dr, dc) in OFFSETS:
                out[label].append(float(norms[site[0] + dr, site[1] + dc] / norms[site]))
    return {label: float(np.mean(v)) for label, v in out.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", type=Path, help="pool of cell features (npz); default: Gaussian features")
    ap.add_argument("--dim", type=int, default=1280, help="feature dimension without --pool")
    ap.add_argument("--models", default="2dmambamil,2dmambamil:4corners,2dmambamil:noconv,m2dmil,m2dmil:noconv")
    ap.add_argument("--options", default="{}", help="model configuration fields (JSON), for every model")
    ap.add_argument("--side", type=int, default=9)
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    feats = grid_features(args.pool, args.side, args.dim)
    site = (args.side - 3, args.side - 3)
    print(f"| model | {' | '.join(label for label, _ in OFFSETS)} |")
    print("|---|" + "---|" * len(OFFSETS))
    for key in args.models.split(","):
        r = reach(key, json.loads(args.options), feats, site, args.seeds)
        print(f"| `{key}` | " + " | ".join(f"{r[label]:.1e}" for label, _ in OFFSETS) + " |", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
