"""Layouts of the demo's long-range rule: the label is how tumour and lymphoid regions pair up across a slide.

A slide is a grid of ``rows × cols`` cells (13 × 13 by default). It holds four *marker sites*, two tumour
(TUM) cells and two lymphoid-aggregate (LYM) cells; everything else is stroma with glass between
(:class:`LongRangeSpec` sets the amounts). The sites form two *pairs*: the two sites of a pair share a row or a column and lie 4–5
cells apart. The two pairs lie on a falling diagonal of each other: every site of one pair is strictly
above-right or strictly below-left of every site of the other, at least 4 cells away (Chebyshev). No two
sites are ever within one 3 × 3 (or 4 × 4) window.

* **paired** (label 1): each pair holds one tumour and one lymphoid site, so each tumour has a lymphoid
  aggregate 4–5 cells away in its own row or column.
* **segregated** (label 0): the two tumours form one pair and the two lymphoid aggregates the other.

Matching holds by construction. Everything geometric (slide size, the four sites, which of them pair
up, glass and filler) is drawn first, from the same distribution whatever the label; the label then
only decides which kind goes to which site. Both classes hold exactly two TUM and two LYM cells, each
site is tumour with probability ½ in both, and every cell's 3 × 3 neighbourhood holds at most one
marker, so the bag of 3 × 3 neighbourhoods has the same distribution in both classes. What differs is
only the kind of the site 4–5 cells away from each marker: telling the classes apart needs context
across at least 4 cells.

The sites keep ``margin`` cells (2) away from the grid's edges. Where the two pairs can lie is bounded
by the grid, so how far a site is from each edge says much about which pair it belongs to (near the
edges, nearly everything: ``tests/test_demo.py``); a model that sees an edge through its zero padding
could read the label off where the tumours lie without relating any two sites. With the margin no 3 × 3
window of a site, or of a cell next to one, reaches past the edge.

A scan from the top-left corner carries the information, and only the rule's: the later site of each
pair (right of or below its partner) has its partner in its upper-left quadrant, along one row or column,
and no site has a site of the other pair there. So on a paired slide a marker's scan state holds a marker
of the other kind, and on a segregated slide it never does.

Survival (months) follows the exponential model of :func:`~wsi2dmamba.demo.layout.draw_survival` with
``contacts`` = the number of tumour sites paired with a lymphoid aggregate (0 or 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .layout import GLASS, LYMPHOCYTES, OTHER, STROMA, TUMOUR, Layout

Site = tuple[int, int]
Pair = tuple[Site, Site]


@dataclass(frozen=True)
class LongRangeSpec:
    """How long-range layouts are drawn. Counts are inclusive ranges ``(low, high)`` of cells per slide."""

    rows: int = 13
    cols: int = 13
    separation: tuple[int, int] = (4, 5)
    """Cells between the two sites of a pair (same row or column)."""
    min_cross: int = 4
    """Smallest Chebyshev distance between sites of different pairs."""
    glass: tuple[int, int] = (62, 82)
    """Glass cells, anywhere but the sites: the tissue is a fragmented sheet, as on many biopsies."""
    other: tuple[int, int] = (0, 0)
    """Cells of other tissue (muscle, mucosa, debris, skin); stroma fills every cell left."""
    margin: int = 2
    """Rows and columns along each edge of the grid that hold no site, only filler. With 2 or more no 3 × 3
    window of a site or of its neighbours reaches past the grid's edge, so a local model cannot tell
    which edge a site lies near (and so which pair it belongs to)."""


def manhattan(a: Site, b: Site) -> int:
    return abs(a[0] - b[0]) + abs(a[1] - b[1])


def chebyshev(a: Site, b: Site) -> int:
    return max(abs(a[0] - b[0]), abs(a[1] - b[1]))


def draw_long_range(rng: np.random.Generator, label: int, spec: LongRangeSpec = LongRangeSpec()) -> Layout:
    """One slide's layout with the given label (1 paired, 0 segregated); see the module doc.

    The geometry (sites, pairs, glass, filler) is drawn before the label is used, from the same stream
    of random numbers, so it has the same distribution in both classes.
    """
    if label not in (0, 1):
        raise ValueError(f"label must be 0 or 1, got {label!r}")
    pairs = draw_pairs(rng, spec)
    cells = draw_filler(rng, spec, [s for p in pairs for s in p])
    assign_markers(cells, pairs, label, rng)
    return Layout(cells=cells, label=label, orientation="", pairs=pairs)


def draw_pairs(rng: np.random.Generator, spec: LongRangeSpec) -> tuple[Pair, Pair]:
    """Two aligned pairs of sites, each site of one pair above-right or below-left of the other's, far apart.

    Each pair is drawn as: separation uniform in ``spec.separation``, row or column with probability ½,
    position uniform; the two pairs are drawn independently and kept only if they are far enough apart.
    This samples that conditional distribution in one draw over every compatible couple of pairs.
    """
    pairs, joint = _pair_distribution(spec)
    a, b = divmod(int(rng.choice(joint.size, p=joint.ravel())), len(pairs))
    return pairs[a], pairs[b]


def check_grid(spec: LongRangeSpec) -> None:
    """Raise ValueError, saying what to change, if ``spec``'s grid cannot hold the two pairs of sites."""
    _pair_distribution(spec)


@lru_cache(maxsize=8)
def _pair_distribution(spec: LongRangeSpec) -> tuple[list[Pair], np.ndarray]:
    """Every aligned pair with its probability, and the (n, n) joint probability of two compatible pairs."""
    if spec.min_cross < 4 or spec.separation[0] < 4:
        raise ValueError(f"{spec}: sites must be at least 4 cells apart")
    prob = _aligned_pair_probabilities(spec)
    pairs = list(prob)
    p = np.array([prob[q] for q in pairs])
    compatible = np.array([[_far_apart(a, b, spec.min_cross) for b in pairs] for a in pairs])
    joint = np.outer(p, p) * compatible
    if joint.sum() == 0:
        sep = f"{spec.separation[0]}–{spec.separation[1]}"
        raise ValueError(f"a {spec.rows} × {spec.cols} grid cannot hold two pairs of sites {sep} cells apart and "
                         f"{spec.min_cross} from each other{f' inside a margin of {spec.margin}' if spec.margin else ''}; "
                         f"use at least {9 + 2 * spec.margin} × {9 + 2 * spec.margin} cells")
    return pairs, joint / joint.sum()


def _aligned_pair_probabilities(spec: LongRangeSpec) -> dict[Pair, float]:
    """Probability of each pair: separation uniform, then row or column uniform, then position uniform."""
    prob: dict[Pair, float] = {}
    seps = range(spec.separation[0], spec.separation[1] + 1)
    m = spec.margin
    rows, cols = range(m, spec.rows - m), range(m, spec.cols - m)
    for s in seps:
        placements = []
        if len(cols) > s:
            placements.append([((r, c), (r, c + s)) for r in rows for c in cols[:-s]])
        if len(rows) > s:
            placements.append([((r, c), (r + s, c)) for r in rows[:-s] for c in cols])
        for starts in placements:
            for pair in starts:
                prob[pair] = prob.get(pair, 0.0) + 1.0 / (len(seps) * len(placements) * len(starts))
    return prob


def _far_apart(a: Pair, b: Pair, min_cross: int) -> bool:
    """Whether every site of ``b`` lies strictly above-right or below-left of every site of ``a``, at least
    ``min_cross`` cells away (Chebyshev)."""
    return all((v[0] - u[0]) * (v[1] - u[1]) < 0 and chebyshev(u, v) >= min_cross for u in a for v in b)


def draw_filler(rng: np.random.Generator, spec: LongRangeSpec, sites: list[Site]) -> np.ndarray:
    """(rows, cols) int8 cells: glass, other tissue and stroma everywhere but the sites (left as -1).

    Glass is as likely in every free cell, the slide's border included: a glass density that differed
    between the border and the inside would tell a 3 × 3 window which border a site lies on, and so which
    pair it belongs to. (The tile lattice passes through the slide's (0, 0), so tiles still coincide with
    cells when the border rows are glass.)
    """
    cells = np.full((spec.rows, spec.cols), STROMA, dtype=np.int8)
    free = np.ones((spec.rows, spec.cols), dtype=bool)
    for site in sites:
        free[site] = False
    _scatter(rng, cells, np.argwhere(free), spec.glass, GLASS)
    free &= cells != GLASS
    _scatter(rng, cells, np.argwhere(free), spec.other, OTHER)
    for site in sites:
        cells[site] = -1
    return cells


def _scatter(rng: np.random.Generator, cells: np.ndarray, where: np.ndarray, count: tuple[int, int], kind: int) -> None:
    """Set a number of cells drawn uniformly in ``count`` (at most all of ``where``), chosen at random, to ``kind``."""
    n = min(int(rng.integers(count[0], count[1] + 1)), len(where))
    for r, c in where[rng.choice(len(where), size=n, replace=False)]:
        cells[r, c] = kind


def assign_markers(cells: np.ndarray, pairs: tuple[Pair, Pair], label: int, rng: np.random.Generator) -> None:
    """Put two TUM and two LYM cells on the sites, in place: one of each per pair (label 1), or the
    tumours on one pair and the lymphoid aggregates on the other (label 0)."""
    (a1, a2), (b1, b2) = pairs
    if label == 1:
        order = rng.permutation(2), rng.permutation(2)
        kinds = ((TUMOUR, LYMPHOCYTES)[order[0][0]], (TUMOUR, LYMPHOCYTES)[order[0][1]],
                 (TUMOUR, LYMPHOCYTES)[order[1][0]], (TUMOUR, LYMPHOCYTES)[order[1][1]])
    else:
        first = (TUMOUR, LYMPHOCYTES)[int(rng.integers(2))]
        second = LYMPHOCYTES if first == TUMOUR else TUMOUR
        kinds = (first, first, second, second)
    for site, kind in zip((a1, a2, b1, b2), kinds):
        cells[site] = kind


def paired_tumours(cells: np.ndarray, reach: int = 5) -> int:
    """Number of tumour cells with a lymphoid cell at most ``reach`` cells away in the same row or column.

    The rule read from the cells alone: on a long-range layout this is 2 on paired slides and 0 on
    segregated ones.
    """
    tumours = np.argwhere(cells == TUMOUR)
    lymph = np.argwhere(cells == LYMPHOCYTES)
    count = 0
    for t in tumours:
        d = np.abs(lymph - t)
        aligned = (d.min(axis=1) == 0) & (d.max(axis=1) <= reach)
        count += int(aligned.any())
    return count


def marker_sites(cells: np.ndarray) -> list[Site]:
    """The TUM and LYM cells of a layout, in raster order."""
    return [(int(r), int(c)) for r, c in np.argwhere((cells == TUMOUR) | (cells == LYMPHOCYTES))]
