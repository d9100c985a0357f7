"""Small real feature grids and generated cohorts for the training and evaluation tests.

The grid is made from the real CC0 slide CMU-1-Small-Region.svs: its level 0 is cut into 128-px tiles
and each tissue tile gets a 16-d vector of colour and texture statistics (a tiny hand-made encoder, so
the tests need no network weights). Slides of a cohort are crops of that lattice (real coordinates,
real neighbourhoods) plus a little noise; the label of a patient is whether its tissue is denser in
dark (nuclear) pixels than the median patient's, so a MIL model can learn it from the features.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from wsi2dmamba.grid import FeatureGrid, write_feature_grid

HERE = Path(__file__).resolve().parent
SLIDE_CANDIDATES = (
    HERE / "data" / "CMU-1-Small-Region.svs",
    HERE.parent.parent / "shared" / "data" / "slides" / "aperio_svs" / "CMU-1-Small-Region.svs",
)
TILE = 128
DARK_FEATURE = 8  # index of the dark-pixel fraction in the feature vector


def slide_path() -> Path:
    for p in SLIDE_CANDIDATES:
        if p.is_file():
            return p
    pytest.skip("CMU-1-Small-Region.svs is neither in tests/data nor in ../shared/data")


def _tile_features(tile: np.ndarray) -> np.ndarray:
    """(T, T, 3) uint8 RGB → (16,) float32 colour/texture statistics."""
    import cv2

    rgb = tile.astype(np.float32) / 255.0
    hsv = cv2.cvtColor(tile, cv2.COLOR_RGB2HSV).astype(np.float32) / 255.0
    grey = rgb.mean(axis=2)
    gy, gx = np.gradient(grey)
    q = np.quantile(grey, [0.1, 0.3, 0.5, 0.7, 0.9])
    return np.concatenate([
        rgb.reshape(-1, 3).mean(0), rgb.reshape(-1, 3).std(0),       # 0-5
        [hsv[..., 1].mean(), hsv[..., 2].mean()],                     # 6-7
        [(grey < 0.55).mean()],                                       # 8: dark (nuclear) fraction
        [(rgb[..., 0] - rgb[..., 1] > 0.15).mean()],                  # 9: eosin-pink fraction
        [np.hypot(gx, gy).mean()],                                    # 10: texture
        q,                                                            # 11-15
    ]).astype(np.float32)


@functools.lru_cache(maxsize=1)
def base_grid() -> FeatureGrid:
    """The whole real slide as one feature grid of 128-px tiles (tissue tiles only)."""
    from wsi2dmamba.slide import open_slide

    path = slide_path()
    with open_slide(path) as slide:
        w0, h0 = slide.dimensions
        img = slide.read_region((0, 0), 0, (w0, h0))
        mpp = slide.mpp
    rows, cols = h0 // TILE, w0 // TILE
    index, feats, frac = [], [], []
    for r in range(rows):
        for c in range(cols):
            tile = img[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE]
            sat = tile.max(axis=2).astype(np.int16) - tile.min(axis=2)
            tissue = float((sat > 20).mean())
            if tissue >= 0.25:
                index.append((r, c))
                feats.append(_tile_features(tile))
                frac.append(tissue)
    index = np.array(index, np.int32)
    feats = np.stack(feats)
    feats = (feats - feats.mean(0)) / (feats.std(0) + 1e-6)
    coords = index[:, ::-1].astype(np.int64) * TILE
    return FeatureGrid(slide_id="CMU-1-Small-Region", coords=coords, index=index, shape=(rows, cols),
                       tissue_fraction=np.array(frac), origin_level0=(0.0, 0.0), stride_level0=float(TILE),
                       tile_size_level0=float(TILE), tile_px=TILE, stride_px=TILE, mpp_requested=mpp,
                       mpp_effective=mpp, mpp_level0=mpp, read_level=0, read_downsample=1.0,
                       level0_size=(w0, h0), slide_path=str(path), features=feats.astype(np.float32),
                       encoder="colour-stats")


def crop(grid: FeatureGrid, slide_id: str, r0: int, c0: int, h: int, w: int, noise: float,
         rng: np.random.Generator) -> FeatureGrid | None:
    """The cells of ``grid`` inside rows r0…r0+h−1, cols c0…c0+w−1, as a slide of its own."""
    keep = ((grid.index[:, 0] >= r0) & (grid.index[:, 0] < r0 + h)
            & (grid.index[:, 1] >= c0) & (grid.index[:, 1] < c0 + w))
    if keep.sum() < 4:
        return None
    idx = grid.index[keep] - np.array([r0, c0], np.int32)
    feats = grid.features[keep] + rng.normal(0, noise, size=(int(keep.sum()), grid.feature_dim)).astype(np.float32)
    return FeatureGrid(slide_id=slide_id, coords=grid.coords[keep], index=idx, shape=(h, w),
                       tissue_fraction=grid.tissue_fraction[keep],
                       origin_level0=(grid.origin_level0[0] + c0 * grid.stride_level0,
                                      grid.origin_level0[1] + r0 * grid.stride_level0),
                       stride_level0=grid.stride_level0, tile_size_level0=grid.tile_size_level0,
                       tile_px=grid.tile_px, stride_px=grid.stride_px, mpp_requested=grid.mpp_requested,
                       mpp_effective=grid.mpp_effective, mpp_level0=grid.mpp_level0, read_level=0,
                       read_downsample=1.0, level0_size=grid.level0_size, slide_path=grid.slide_path,
                       features=feats, encoder=grid.encoder)


def make_cohort(folder: Path, n_patients: int = 24, task: str = "classification", seed: int = 0,
                slides_per_patient: int = 1, n_classes: int = 2) -> tuple[Path, Path]:
    """Write feature grids and a manifest of a generated cohort; return (manifest, features folder).

    Patient p has ``1 + p % slides_per_patient`` slides. Every slide is a random crop (5–9 cells a side)
    of the real grid. Classification: the label is the patient's quantile of dark-pixel density
    (``n_classes`` groups). Survival: times are exponential with a rate that grows with that density,
    censored at random.
    """
    import pandas as pd

    grid = base_grid()
    rng = np.random.default_rng(seed)
    feat_dir = folder / "features" / "colour-stats"
    feat_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    scores = []
    for p in range(n_patients):
        pid = f"P{p:03d}"
        s_scores = []
        for s in range(1 + p % slides_per_patient):
            while True:
                h, w = (int(x) for x in rng.integers(5, 10, size=2))
                r0 = int(rng.integers(0, grid.shape[0] - h + 1))
                c0 = int(rng.integers(0, grid.shape[1] - w + 1))
                sid = f"{pid}_S{s}"
                g = crop(grid, sid, r0, c0, h, w, noise=0.1, rng=rng)
                if g is not None:
                    break
            write_feature_grid(feat_dir / f"{sid}.h5", g)
            s_scores.append(float(g.features[:, DARK_FEATURE].mean()))
            rows.append({"slide_id": sid, "patient_id": pid})
        scores.append(np.mean(s_scores))
    scores = np.array(scores)
    per_patient = {}
    if task == "survival":
        z = (scores - scores.mean()) / (scores.std() + 1e-9)
        t_event = rng.exponential(1.0 / np.exp(1.2 * z)) * 30 + 0.5
        t_cens = rng.uniform(5, 60, size=n_patients)
        for p in range(n_patients):
            per_patient[f"P{p:03d}"] = {"time": round(float(min(t_event[p], t_cens[p])), 3),
                                        "event": int(t_event[p] <= t_cens[p])}
    else:
        edges = np.quantile(scores, np.linspace(0, 1, n_classes + 1)[1:-1])
        names = ["low", "high"] if n_classes == 2 else [f"grade{k}" for k in range(n_classes)]
        for p in range(n_patients):
            per_patient[f"P{p:03d}"] = {"label": names[int(np.searchsorted(edges, scores[p]))]}
    for row in rows:
        row.update(per_patient[row["patient_id"]])
    manifest = folder / "cohort.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest, feat_dir


def benchmark_module(name: str):
    """The script ``benchmarks/<name>.py`` loaded as a module (the benchmarks are not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = {"abmil": {"hidden": 16, "attn_dim": 8}, "meanpool": {"hidden": 16},
        "2dmambamil": {"d_model": 16, "d_state": 4, "attn_dim": 8}}
_RUNS: dict[tuple[str, str], tuple[Path, Path, Path]] = {}


def trained_run(base: Path, task: str = "classification", models: tuple[str, ...] = ("abmil", "meanpool"),
                ) -> tuple[Path, Path, Path]:
    """A run with small models trained on a generated cohort (built once per test session).

    Returns:
        (run folder, manifest, features folder).
    """
    from wsi2dmamba.cohort import load_cohort
    from wsi2dmamba.training import TrainConfig, train_cohort

    key = (task, ",".join(models))
    if key not in _RUNS:
        folder = Path(base) / f"trained-{task}-{'-'.join(models)}"
        manifest, feat_dir = make_cohort(folder, n_patients=30, task=task, seed=1, slides_per_patient=2)
        cohort = load_cohort(manifest, require_path=False)
        select = "c_index" if task == "survival" else "auc"
        config = TrainConfig(task=task, folds=3, epochs=4, lr=5e-3, batch_size=2, select_on=select, seed=0,
                             device="cpu")
        for m in models:
            train_cohort(cohort, feat_dir, folder / "run", m, config, TINY[m], progress=False)
        _RUNS[key] = (folder / "run", manifest, feat_dir)
    return _RUNS[key]


@pytest.fixture(autouse=False)
def one_thread():
    """Run torch on one CPU thread: the tests' models are tiny, and on a busy 2-core machine OpenMP
    threads waiting for each other cost more than the arithmetic."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
