"""Cell layouts of the demo's mosaic slides: where tumour, lymphocytes and stroma sit.

A demo slide is a grid of ``rows × cols`` cells; each cell holds one tissue patch (or glass). The label
depends only on the 2D arrangement of the cells, never on how many of each kind a slide holds:

* **infiltrated** (label 1): at least one lymphocyte cell shares an edge (4-neighbourhood) with a
  tumour cell. On each slide all contacts have one orientation, chosen at random: *horizontal*
  (lymphocytes left or right of tumour) or *vertical* (above or below), so a model must read both axes.
* **excluded** (label 0): every tumour cell is walled off by stroma: every tissue cell sharing an edge
  with the tumour nest is stroma, and no lymphocyte cell lies within one cell (8-neighbourhood) of a
  tumour cell.

Both classes draw the number of tumour, lymphocyte, stroma, other-tissue and glass cells from the same
distribution, and the tumour nest (a connected blob grown from a random cell) with the same rule, so
the multiset of cell kinds carries no information about the label. Lymphocyte cells that are not in
contact are placed at random at a Chebyshev distance of at least 2 from every tumour cell, in both
classes.

Survival follows an exponential proportional-hazards model of the same arrangement (time in months)::

    hazard = λ0 · exp(−β · contacts + σ · z),   z ~ N(0, 1)
    T ~ Exponential(hazard),   C ~ Uniform(c_min, c_max),   time = min(T, C),   event = [T ≤ C]

where ``contacts`` is the number of edge-sharing (lymphocyte, tumour) cell pairs: more infiltration,
longer survival. Everything is drawn from one seeded ``numpy.random.Generator``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Cell kinds, as stored in a layout array (int8) and as letters in the manifest's ``cells`` column.
GLASS, TUMOUR, LYMPHOCYTES, STROMA, OTHER = 0, 1, 2, 3, 4
KIND_LETTERS = ".TLSo"

_NEIGHBOURS4 = ((-1, 0), (1, 0), (0, -1), (0, 1))


@dataclass(frozen=True)
class LayoutSpec:
    """How demo layouts are drawn. Counts are inclusive ranges ``(low, high)`` of cells per slide."""

    rows: int = 6
    cols: int = 6
    tumour: tuple[int, int] = (3, 4)
    lymphocytes: tuple[int, int] = (5, 7)
    stroma: tuple[int, int] = (8, 10)
    glass: tuple[int, int] = (2, 4)
    contacts: tuple[int, int] = (3, 5)
    """Lymphocyte cells touching the tumour on an infiltrated slide."""


@dataclass(frozen=True)
class SurvivalSpec:
    """Parameters of the survival model (months)."""

    baseline_hazard: float = math.log(2) / 12.0
    """λ0: hazard per month with no contact (median survival 12 months)."""
    beta: float = 1.0
    """Log-hazard decrease per lymphocyte–tumour contact."""
    sigma: float = 0.25
    """Standard deviation of the slide's log-hazard noise."""
    censor_min: float = 6.0
    censor_max: float = 60.0


@dataclass(frozen=True)
class Layout:
    """One slide's cells.

    Attributes:
        cells: (rows, cols) int8 array of cell kinds (``GLASS`` … ``OTHER``).
        label: contact task: 1 = infiltrated, 0 = excluded; long-range task: 1 = paired, 0 = segregated.
        orientation: contact task: ``"horizontal"``, ``"vertical"`` or ``""`` (excluded slides).
        pairs: long-range task: the two pairs of marker sites, ((row, col), (row, col)) each.
    """

    cells: np.ndarray
    label: int
    orientation: str = ""
    pairs: tuple = ()

    @property
    def contacts(self) -> int:
        return count_contacts(self.cells)

    def letters(self) -> str:
        """The layout as text: one letter per cell (``.TLSo``), rows separated by ``/``."""
        return "/".join("".join(KIND_LETTERS[k] for k in row) for row in self.cells)


def layout_from_letters(text: str) -> np.ndarray:
    """Inverse of :meth:`Layout.letters`: (rows, cols) int8 array."""
    rows = text.split("/")
    return np.array([[KIND_LETTERS.index(ch) for ch in row] for row in rows], dtype=np.int8)


def count_contacts(cells: np.ndarray) -> int:
    """Number of edge-sharing (lymphocyte, tumour) pairs of cells in a (rows, cols) layout."""
    t = cells == TUMOUR
    ly = cells == LYMPHOCYTES
    horizontal = (t[:, 1:] & ly[:, :-1]).sum() + (t[:, :-1] & ly[:, 1:]).sum()
    vertical = (t[1:, :] & ly[:-1, :]).sum() + (t[:-1, :] & ly[1:, :]).sum()
    return int(horizontal + vertical)


def contact_orientations(cells: np.ndarray) -> tuple[int, int]:
    """(horizontal, vertical) counts of edge-sharing (lymphocyte, tumour) pairs."""
    t = cells == TUMOUR
    ly = cells == LYMPHOCYTES
    horizontal = (t[:, 1:] & ly[:, :-1]).sum() + (t[:, :-1] & ly[:, 1:]).sum()
    vertical = (t[1:, :] & ly[:-1, :]).sum() + (t[:-1, :] & ly[1:, :]).sum()
    return int(horizontal), int(vertical)


def min_lymphocyte_tumour_distance(cells: np.ndarray) -> int | None:
    """Smallest Chebyshev distance (cells) between a lymphocyte cell and a tumour cell, or None."""
    t = np.argwhere(cells == TUMOUR)
    ly = np.argwhere(cells == LYMPHOCYTES)
    if len(t) == 0 or len(ly) == 0:
        return None
    return int(np.abs(t[:, None, :] - ly[None, :, :]).max(-1).min())


def draw_layout(rng: np.random.Generator, label: int, spec: LayoutSpec = LayoutSpec(),
                max_tries: int = 1000) -> Layout:
    """Draw one slide's layout with the given label (1 infiltrated, 0 excluded); see the module doc."""
    if label not in (0, 1):
        raise ValueError(f"label must be 0 or 1, got {label!r}")
    for _ in range(max_tries):
        layout = _try_layout(rng, label, spec)
        if layout is not None:
            return layout
    raise RuntimeError(f"could not draw a layout for {spec} in {max_tries} tries; make the grid larger")


def _try_layout(rng: np.random.Generator, label: int, spec: LayoutSpec) -> Layout | None:
    """One draw of a layout; None when this draw cannot satisfy the spec or the label (draw again)."""
    counts = _draw_counts(rng, spec)
    cells = np.full((spec.rows, spec.cols), -1, dtype=np.int8)  # -1 = not yet assigned
    _place_glass(rng, cells, counts.glass)
    nest = _grow_nest(rng, cells, counts.tumour)
    if nest is None:
        return None
    ring = _place_nest(cells, nest)
    if len(ring) > counts.stroma:  # stroma must be able to wall off the nest on either class
        return None
    contact_cells = _place_ring(rng, cells, ring, label, counts) if label == 1 else []
    if contact_cells is None:
        return None
    for rc in ring:
        cells[rc] = LYMPHOCYTES if rc in contact_cells else STROMA
    if not _place_far_lymphocytes(rng, cells, nest, counts.lymphocytes - len(contact_cells)):
        return None
    if not _place_at_random(rng, cells, STROMA, counts.stroma - (len(ring) - len(contact_cells))):
        return None
    cells[cells == -1] = OTHER
    if (count_contacts(cells) > 0) != bool(label):
        return None
    if label == 0 and (min_lymphocyte_tumour_distance(cells) or 0) < 2:
        return None
    return Layout(cells=cells, label=label, orientation=counts.orientation if label else "")


@dataclass(frozen=True)
class _Counts:
    """How many cells of each kind one layout draw has, and the orientation of its contacts."""

    tumour: int
    lymphocytes: int
    stroma: int
    glass: int
    contacts: int
    orientation: str


def _draw_counts(rng: np.random.Generator, spec: LayoutSpec) -> _Counts:
    def draw(bounds: tuple[int, int]) -> int:
        return int(rng.integers(bounds[0], bounds[1] + 1))

    n_tum, n_lym, n_str, n_glass, k = (draw(b) for b in (spec.tumour, spec.lymphocytes, spec.stroma, spec.glass,
                                                         spec.contacts))
    return _Counts(n_tum, n_lym, n_str, n_glass, k, str(rng.choice(["horizontal", "vertical"])))


def _place_glass(rng: np.random.Generator, cells: np.ndarray, n_glass: int) -> None:
    # Glass away from row 0 and column 0, so that the tissue's bounding box starts at the slide's corner
    # and a tile lattice anchored there coincides with the cells.
    rows, cols = cells.shape
    inner = [(r, c) for r in range(1, rows) for c in range(1, cols)]
    for i in rng.choice(len(inner), size=n_glass, replace=False):
        cells[inner[i]] = GLASS


def _place_nest(cells: np.ndarray, nest: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Mark the tumour nest; its unassigned 4-neighbours (the ring around it), sorted."""
    rows, cols = cells.shape
    for rc in nest:
        cells[rc] = TUMOUR
    return sorted({(r + dr, c + dc) for r, c in nest for dr, dc in _NEIGHBOURS4
                   if 0 <= r + dr < rows and 0 <= c + dc < cols and cells[r + dr, c + dc] == -1})


def _place_ring(rng: np.random.Generator, cells: np.ndarray, ring: list[tuple[int, int]], label: int,
                counts: _Counts) -> list[tuple[int, int]] | None:
    """The ring cells that get lymphocytes touching the nest along the drawn orientation (None: too few)."""
    candidates = [rc for rc in ring if _touch_axis(cells, rc) == counts.orientation]
    n = min(counts.contacts, counts.lymphocytes)
    if len(candidates) < n:
        return None
    picks = rng.choice(len(candidates), size=n, replace=False)
    return [candidates[i] for i in picks]


def _place_far_lymphocytes(rng: np.random.Generator, cells: np.ndarray, nest: list[tuple[int, int]],
                           n_far: int) -> bool:
    """Lymphocytes two or more cells from the nest; False when there is not room for ``n_far``."""
    rows, cols = cells.shape
    far = [(r, c) for r in range(rows) for c in range(cols)
           if cells[r, c] == -1 and _chebyshev_to(nest, (r, c)) >= 2]
    if len(far) < n_far:
        return False
    for i in rng.choice(len(far), size=n_far, replace=False):
        cells[far[i]] = LYMPHOCYTES
    return True


def _place_at_random(rng: np.random.Generator, cells: np.ndarray, kind: int, n: int) -> bool:
    """``n`` unassigned cells, drawn at random, become ``kind``; False when fewer are left."""
    free = [tuple(rc) for rc in np.argwhere(cells == -1)]
    if len(free) < n:
        return False
    for i in rng.choice(len(free), size=n, replace=False):
        cells[free[i]] = kind
    return True


def _grow_nest(rng: np.random.Generator, cells: np.ndarray, n: int) -> list[tuple[int, int]] | None:
    """A connected (4-neighbourhood) set of ``n`` unassigned cells grown from a random one."""
    rows, cols = cells.shape
    free = np.argwhere(cells == -1)
    start = tuple(int(v) for v in free[rng.integers(len(free))])
    nest = [start]
    while len(nest) < n:
        frontier = sorted({(r + dr, c + dc) for r, c in nest for dr, dc in _NEIGHBOURS4
                           if 0 <= r + dr < rows and 0 <= c + dc < cols and cells[r + dr, c + dc] == -1
                           and (r + dr, c + dc) not in nest})
        if not frontier:
            return None
        nest.append(frontier[rng.integers(len(frontier))])
    return nest


def _touch_axis(cells: np.ndarray, rc: tuple[int, int]) -> str:
    """Whether cell ``rc`` touches tumour only left/right, only above/below, or both."""
    r, c = rc
    rows, cols = cells.shape
    horizontal = any(0 <= c + dc < cols and cells[r, c + dc] == TUMOUR for dc in (-1, 1))
    vertical = any(0 <= r + dr < rows and cells[r + dr, c] == TUMOUR for dr in (-1, 1))
    if horizontal and vertical:
        return "both"
    return "horizontal" if horizontal else "vertical"


def _chebyshev_to(points: list[tuple[int, int]], rc: tuple[int, int]) -> int:
    return min(max(abs(r - rc[0]), abs(c - rc[1])) for r, c in points)


def draw_survival(rng: np.random.Generator, contacts: int, spec: SurvivalSpec = SurvivalSpec()) -> tuple[float, int]:
    """(time in months, event) for a slide with ``contacts`` lymphocyte–tumour contacts."""
    hazard = spec.baseline_hazard * math.exp(-spec.beta * contacts + spec.sigma * rng.standard_normal())
    t_event = rng.exponential(1.0 / hazard)
    t_censor = rng.uniform(spec.censor_min, spec.censor_max)
    time = max(round(min(t_event, t_censor), 2), 0.01)
    return time, int(t_event <= t_censor)
