"""A development cohort of real-tissue feature grids whose label is an arrangement of similar tissue.

Each slide is a grid of 14–24 cells a side (cropped to its tissue) with an elliptic tissue region (cells
outside it are glass, i.e. no tile). Tissue cells hold *background* tissue, except 6–8 *marked* cells. Both
kinds are mixtures of the same two real tiles (smooth muscle and cancer-associated stroma of
NCT-CRC-HE-100K, shipped with the demo): each quadrant of a tile shows muscle with probability 0.75 in a
marked tile and 0.25 in a background tile, so one tile tells its kind only weakly (a linear probe on
efficientnet-lite0 features reaches AUC 0.92; on the pure tissues it reaches 1.00):

* **aligned** (label 1): the marked cells form one straight, unbroken run along a row or a column;
* **scattered** (label 0): the same number of marked cells, no two of them within one cell of each other
  (8-neighbourhood).

Grid size, tissue region and the number of marked cells are drawn independently of the label, so the
composition of a slide (how many cells of each kind) carries no information about it.

The cohort is built **at the feature level**: a pool of such tiles, made from augmented crops of the real
tiles (a random square crop, a flip or rotation by 90°, a colour gain), is encoded once with a real
encoder (:func:`encode_tile_pool`, default ``efficientnet-lite0``); every cell of a slide then takes the
feature vector of a pool tile of its kind, drawn at random (:func:`arrangement_grids`). This stands for
rendering each slide from those tiles and running segment → tile → extract on it, at a small fraction of
the cost; ``benchmarks/arrangement_cohort.py check-pixels`` renders a few slides from the very pool tiles
(:func:`render_arrangement`), runs the three stages and compares (``docs/models.md``).

>>> spec = ArrangementSpec(n_slides=240, seed=0)
>>> pool = encode_tile_pool(spec)                       # (2, pool_size, 1280) features, real encoder  # doctest: +SKIP
>>> slides = draw_arrangement_cohort(spec)  # doctest: +SKIP
>>> grids = arrangement_grids(slides, pool, spec)      # slide_id → FeatureGrid  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .mosaic import CELL_PX, MOSAIC_MPP, load_asset

GLASS, BACKGROUND, MARKED = 0, 1, 2
"""Cell kinds of an arrangement layout (int8)."""
LABEL_NAMES = ("scattered", "aligned")
MANIFEST_COLUMNS = ("slide_id", "patient_id", "label", "rows", "cols", "tissue_cells", "marked_cells")


@dataclass(frozen=True)
class CropAugment:
    """How pool crops are made from a 224-px tile.

    Attributes:
        min_crop: smallest side of the random square crop, in pixels (the crop is resized back to 224).
        gain: largest relative change of each RGB channel's gain.
        brightness: largest relative change of the overall brightness.
    """

    min_crop: int = 144
    gain: float = 0.08
    brightness: float = 0.08


@dataclass(frozen=True)
class ArrangementSpec:
    """What the arrangement cohort holds. Ranges are inclusive ``(low, high)``.

    Attributes:
        n_slides: number of slides (rounded up to an even number; half aligned, half scattered).
        seed: seed of every draw (layouts, pool crops, which crop fills which cell).
        side: grid side in cells before cropping to the tissue (rows and columns drawn independently).
        marked: marked cells per slide.
        tissue_radius: semi-axes of the tissue ellipse as a fraction of the grid side.
        marked_asset, background_asset: the shipped demo tiles (``wsi2dmamba/demo/assets``) of the two tissues.
        p_marked: probability that a quadrant of a background cell's tile, and of a marked cell's tile,
            shows the marked tissue (:func:`mixed_crop`): the two kinds of cell differ in proportion only.
        pool_size: augmented crops encoded per kind.
        augment: how the crops are made.
    """

    n_slides: int = 240
    seed: int = 0
    side: tuple[int, int] = (14, 24)
    marked: tuple[int, int] = (6, 8)
    tissue_radius: tuple[float, float] = (0.45, 0.55)
    marked_asset: str = "nct-MUS-AACVWIEK.jpg"
    background_asset: str = "nct-STR-AACRYYNQ.jpg"
    p_marked: tuple[float, float] = (0.25, 0.75)
    pool_size: int = 256
    augment: CropAugment = field(default_factory=CropAugment)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ArrangedSlide:
    """One slide: its id, label (index into :data:`LABEL_NAMES`) and (rows, cols) int8 layout."""

    slide_id: str
    label: int
    cells: np.ndarray

    @property
    def marked_cells(self) -> int:
        return int((self.cells == MARKED).sum())

    @property
    def tissue_cells(self) -> int:
        return int((self.cells != GLASS).sum())


# ----------------------------------------------------------------------------------------------- layouts

def tissue_ellipse(rng: np.random.Generator, rows: int, cols: int, radius: tuple[float, float]) -> np.ndarray:
    """(rows, cols) bool: an axis-aligned ellipse of tissue, its centre jittered by up to a cell."""
    ry, rx = rng.uniform(*radius) * rows, rng.uniform(*radius) * cols
    cy, cx = (rows - 1) / 2 + rng.uniform(-1, 1), (cols - 1) / 2 + rng.uniform(-1, 1)
    r, c = np.mgrid[0:rows, 0:cols]
    return ((r - cy) / ry) ** 2 + ((c - cx) / rx) ** 2 <= 1.0


def line_starts(tissue: np.ndarray, n: int, axis: int) -> list[tuple[int, int]]:
    """Cells from which ``n`` consecutive tissue cells run along ``axis`` (0: down a column, 1: along a row)."""
    t = tissue if axis == 1 else tissue.T
    runs = np.lib.stride_tricks.sliding_window_view(t, n, axis=1).all(axis=-1) if t.shape[1] >= n else \
        np.zeros((t.shape[0], 0), bool)
    starts = [tuple(int(v) for v in rc) for rc in np.argwhere(runs)]
    return starts if axis == 1 else [(c, r) for r, c in starts]


def scattered_cells(rng: np.random.Generator, tissue: np.ndarray, n: int) -> list[tuple[int, int]] | None:
    """``n`` tissue cells, no two within Chebyshev distance 1, in a random greedy order (None: no room)."""
    free = tissue.copy()
    chosen = []
    for rc in rng.permutation(np.argwhere(tissue)):
        r, c = int(rc[0]), int(rc[1])
        if not free[r, c]:
            continue
        chosen.append((r, c))
        free[max(0, r - 1):r + 2, max(0, c - 1):c + 2] = False
        if len(chosen) == n:
            return chosen
    return None


def draw_arrangement(rng: np.random.Generator, label: int, spec: ArrangementSpec = ArrangementSpec(),
                     max_tries: int = 100) -> np.ndarray:
    """(rows, cols) int8 layout (:data:`GLASS`, :data:`BACKGROUND`, :data:`MARKED`) of one slide, cropped
    to its tissue's bounding box.

    Grid size, tissue region and number of marked cells are drawn first, the same way for both labels;
    only the placement of the marked cells depends on ``label`` (1: one straight run, 0: scattered).
    """
    for _ in range(max_tries):
        rows, cols = (int(v) for v in rng.integers(spec.side[0], spec.side[1] + 1, size=2))
        tissue = tissue_ellipse(rng, rows, cols, spec.tissue_radius)
        n = int(rng.integers(spec.marked[0], spec.marked[1] + 1))
        axis = int(rng.integers(2))
        if label == 1:
            starts = line_starts(tissue, n, axis)
            if not starts:
                continue
            r0, c0 = starts[int(rng.integers(len(starts)))]
            marked = [(r0 + i * (1 - axis), c0 + i * axis) for i in range(n)]
        else:
            marked = scattered_cells(rng, tissue, n)
            if marked is None:
                continue
        cells = tissue.astype(np.int8)
        for r, c in marked:
            cells[r, c] = MARKED
        rows_in, cols_in = np.flatnonzero(tissue.any(1)), np.flatnonzero(tissue.any(0))
        # the tiler's lattice ends at the tissue's bounding box
        return cells[rows_in[0]:rows_in[-1] + 1, cols_in[0]:cols_in[-1] + 1]
    raise RuntimeError(f"no layout fits the specification {spec} in {max_tries} tries")


def draw_arrangement_cohort(spec: ArrangementSpec = ArrangementSpec()) -> list[ArrangedSlide]:
    """Every slide's label and layout: pure and seeded; slide i does not change when the cohort grows."""
    n = spec.n_slides + spec.n_slides % 2
    slides = []
    for i in range(n):
        first = int(np.random.default_rng([spec.seed, i // 2, 2]).integers(2))
        label = first if i % 2 == 0 else 1 - first
        cells = draw_arrangement(np.random.default_rng([spec.seed, i]), label, spec)
        slides.append(ArrangedSlide(f"arr-{i:03d}", label, cells))
    return slides


def has_straight_run(cells: np.ndarray) -> bool:
    """True when every marked cell lies in one unbroken run along a row or a column."""
    rc = np.argwhere(cells == MARKED)
    if len(rc) == 0:
        return False
    for axis in (0, 1):
        fixed, moving = rc[:, 1 - axis], np.sort(rc[:, axis])
        if np.all(fixed == fixed[0]) and np.all(np.diff(moving) == 1):
            return True
    return False


def marked_touch(cells: np.ndarray) -> bool:
    """True when two marked cells are within one cell of each other (8-neighbourhood)."""
    rc = np.argwhere(cells == MARKED)
    d = np.abs(rc[:, None, :] - rc[None, :, :]).max(-1)
    return bool((d[np.triu_indices(len(rc), 1)] <= 1).any())


# ------------------------------------------------------------------------------------------ tile pool

def augment_crop(tile: np.ndarray, rng: np.random.Generator, augment: CropAugment = CropAugment()) -> np.ndarray:
    """(CELL_PX, CELL_PX, 3) uint8: a random square crop of (H, W, 3) ``tile`` (H, W ≥ CELL_PX), resized to
    CELL_PX, flipped or rotated by 90°, colour-jittered."""
    from PIL import Image

    side = int(rng.integers(augment.min_crop, CELL_PX + 1))
    top = int(rng.integers(0, tile.shape[0] - side + 1))
    left = int(rng.integers(0, tile.shape[1] - side + 1))
    crop = tile[top:top + side, left:left + side]
    if side != CELL_PX:
        crop = np.asarray(Image.fromarray(crop).resize((CELL_PX, CELL_PX), Image.BILINEAR))
    crop = np.rot90(crop, k=int(rng.integers(4)))
    if rng.integers(2):
        crop = crop[:, ::-1]
    gain = (1.0 + rng.uniform(-augment.gain, augment.gain, size=3)) * (1.0 + rng.uniform(-augment.brightness,
                                                                                          augment.brightness))
    return np.clip(crop.astype(np.float32) * gain, 0, 255).astype(np.uint8)


def mixed_crop(marked: np.ndarray, background: np.ndarray, p_marked: float, rng: np.random.Generator,
               augment: CropAugment = CropAugment()) -> tuple[np.ndarray, int]:
    """One pool tile: (CELL_PX, CELL_PX, 3) uint8 and how many of its four quadrants show marked tissue.

    Each quadrant is, with probability ``p_marked``, the quadrant of an augmented crop of the marked
    tissue, else of the background tissue; the whole tile then gets one colour gain, as a tile cut from
    one slide would.
    """
    half = CELL_PX // 2
    out = np.empty((CELL_PX, CELL_PX, 3), np.uint8)
    n_marked = 0
    plain = CropAugment(augment.min_crop, 0.0, 0.0)
    for q in range(4):
        is_marked = bool(rng.random() < p_marked)
        n_marked += is_marked
        crop = augment_crop(marked if is_marked else background, rng, plain)
        r, c = (q // 2) * half, (q % 2) * half
        out[r:r + half, c:c + half] = crop[r:r + half, c:c + half]
    gain = (1.0 + rng.uniform(-augment.gain, augment.gain, size=3)) * (1.0 + rng.uniform(-augment.brightness,
                                                                                          augment.brightness))
    return np.clip(out.astype(np.float32) * gain, 0, 255).astype(np.uint8), n_marked


def pool_crops(spec: ArrangementSpec, kind: int, start: int = 0, stop: int | None = None) -> np.ndarray:
    """(n, CELL_PX, CELL_PX, 3) uint8: pool tiles ``start…stop`` of ``kind`` (MARKED or BACKGROUND).

    A tile of kind MARKED shows marked tissue in each quadrant with probability ``spec.p_marked[1]``, a
    BACKGROUND tile with ``spec.p_marked[0]`` (:func:`mixed_crop`). Tile j of a kind comes from its own
    generator seeded with ``(seed, kind, j)``, so any tile can be remade alone.
    """
    marked, background = load_asset(spec.marked_asset), load_asset(spec.background_asset)
    p = spec.p_marked[1] if kind == MARKED else spec.p_marked[0]
    stop = spec.pool_size if stop is None else stop
    return np.stack([mixed_crop(marked, background, p, np.random.default_rng([spec.seed, 7, kind, j]),
                                spec.augment)[0] for j in range(start, stop)])


def encode_tile_pool(spec: ArrangementSpec = ArrangementSpec(), encoder: str = "efficientnet-lite0",
                     device: str = "auto", batch_size: int = 64, progress: bool = True) -> np.ndarray:
    """(2, pool_size, D) float32: features of the pool crops, index 0 = background, 1 = marked.

    Runs the real encoder (:func:`wsi2dmamba.features.extract.load_encoder`) on every crop, with the same
    preprocessing as ``extract``.
    """
    import torch
    from tqdm.auto import tqdm

    from ..features.extract import load_encoder

    enc = load_encoder(encoder, device=device)
    out = []
    with tqdm(total=2 * spec.pool_size, desc="tile pool", unit="crop", disable=not progress) as bar:
        for kind in (BACKGROUND, MARKED):
            feats = []
            for start in range(0, spec.pool_size, batch_size):
                crops = pool_crops(spec, kind, start, min(spec.pool_size, start + batch_size))
                feats.append(enc.encode(torch.from_numpy(crops).to(enc.device)).cpu().numpy())
                bar.update(len(crops))
            out.append(np.concatenate(feats))
    return np.stack(out).astype(np.float32)


def cell_pool_indices(slide_index: int, cells: np.ndarray, spec: ArrangementSpec) -> np.ndarray:
    """(rows, cols) int: which pool crop of its kind fills each cell (−1 at glass); seeded per slide."""
    rng = np.random.default_rng([spec.seed, slide_index, 5])
    idx = rng.integers(spec.pool_size, size=cells.shape)
    return np.where(cells == GLASS, -1, idx)


def slide_feature_grid(slide: ArrangedSlide, slide_index: int, pool: np.ndarray, spec: ArrangementSpec,
                       encoder: str = "efficientnet-lite0"):
    """The :class:`~wsi2dmamba.grid.FeatureGrid` of one slide, as ``extract`` would write it for the
    slide rendered from the same crops at 0.5 µm/px with 224-px tiles and no overlap."""
    from ..grid import FeatureGrid

    index = np.argwhere(slide.cells != GLASS).astype(np.int32)  # row-major, as the grid files want
    kinds = slide.cells[index[:, 0], index[:, 1]]
    picks = cell_pool_indices(slide_index, slide.cells, spec)[index[:, 0], index[:, 1]]
    features = pool[kinds - 1, picks].astype(np.float16)
    rows, cols = slide.cells.shape
    return FeatureGrid(
        slide_id=slide.slide_id, coords=index[:, ::-1].astype(np.int64) * CELL_PX, index=index,
        shape=(rows, cols), tissue_fraction=np.ones(len(index), np.float32), origin_level0=(0.0, 0.0),
        stride_level0=float(CELL_PX), tile_size_level0=float(CELL_PX), tile_px=CELL_PX, stride_px=CELL_PX,
        mpp_requested=MOSAIC_MPP, mpp_effective=MOSAIC_MPP, mpp_level0=MOSAIC_MPP, read_level=0,
        read_downsample=1.0, level0_size=(cols * CELL_PX, rows * CELL_PX), features=features, encoder=encoder)


def arrangement_grids(slides: list[ArrangedSlide], pool: np.ndarray, spec: ArrangementSpec,
                      encoder: str = "efficientnet-lite0") -> dict:
    """slide_id → FeatureGrid for every slide (see :func:`slide_feature_grid`)."""
    return {s.slide_id: slide_feature_grid(s, int(s.slide_id.split("-")[1]), pool, spec, encoder) for s in slides}


def manifest_text(slides: list[ArrangedSlide]) -> str:
    """The cohort's manifest CSV (one patient per slide; columns :data:`MANIFEST_COLUMNS`)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(MANIFEST_COLUMNS)
    for s in slides:
        w.writerow([s.slide_id, s.slide_id, LABEL_NAMES[s.label], *s.cells.shape, s.tissue_cells, s.marked_cells])
    return buf.getvalue()


def write_arrangement_cohort(out_dir: str | os.PathLike[str], spec: ArrangementSpec, pool: np.ndarray,
                             encoder: str = "efficientnet-lite0", progress: bool = True) -> Path:
    """Write ``manifest.csv`` and ``features/<encoder>/<slide_id>.h5`` (the grid file format); return the
    manifest path. ``wsi2dmamba train --manifest … --features …`` trains on them as on any cohort."""
    from tqdm.auto import tqdm

    from .. import run_layout
    from ..features.extract import encoder_dirname
    from ..fileio import write_text_atomic
    from ..grid import write_feature_grid

    out = Path(out_dir)
    feat_dir = run_layout.features_dir(out, encoder_dirname(encoder))
    feat_dir.mkdir(parents=True, exist_ok=True)
    slides = draw_arrangement_cohort(spec)
    for i, s in enumerate(tqdm(slides, desc="arrangement grids", unit="slide", disable=not progress)):
        write_feature_grid(run_layout.grid_file(feat_dir, s.slide_id), slide_feature_grid(s, i, pool, spec, encoder))
    manifest = run_layout.cohort_manifest(out)
    write_text_atomic(manifest, manifest_text(slides))
    return manifest


def render_arrangement(slide: ArrangedSlide, slide_index: int, spec: ArrangementSpec) -> np.ndarray:
    """(rows·CELL_PX, cols·CELL_PX, 3) uint8 level-0 image of a slide, each tissue cell the very pool tile
    whose features :func:`slide_feature_grid` gives it (glass: the demo's light grey with noise)."""
    from .mosaic import Augment, render_cells

    picks = cell_pool_indices(slide_index, slide.cells, spec)
    image = render_cells(np.zeros_like(slide.cells), np.random.default_rng([spec.seed, slide_index, 6]), Augment())
    for r, c in np.argwhere(slide.cells != GLASS):
        j = int(picks[r, c])
        image[r * CELL_PX:(r + 1) * CELL_PX, c * CELL_PX:(c + 1) * CELL_PX] = \
            pool_crops(spec, int(slide.cells[r, c]), j, j + 1)[0]
    return image
