"""Build the demo cohort: mosaic slides on disk and their manifest.

>>> from wsi2dmamba.demo import DemoCohortSpec, build_demo_cohort
>>> manifest = build_demo_cohort("runs/demo/cohort", DemoCohortSpec(n_slides=48, seed=0))  # doctest: +SKIP

Two rules set the labels (``DemoCohortSpec.rule``): ``long-range`` (:mod:`.long_range`: paired against
segregated, a relation across 4 or more cells) and ``contact`` (:mod:`.layout`: infiltrated against
excluded, lymphocytes touching the tumour). The cohort is balanced (of slides 2p and 2p+1, one has
each label, in a seeded order);
each slide's layout and survival draw come from its own generator seeded with ``(seed, slide index)``,
so a slide does not change when the cohort is made larger. Writing is idempotent: a slide whose file already exists with the same
specification is kept.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .. import run_layout
from ..fileio import params_hash, write_json_atomic, write_text_atomic
from .layout import Layout, LayoutSpec, SurvivalSpec, contact_orientations, draw_layout, draw_survival
from .long_range import LongRangeSpec, draw_long_range, paired_tumours
from .mosaic import CELL_PX, MOSAIC_MPP, Augment, render_cells, write_pyramidal_tiff

DEMO_RULES = ("long-range", "contact")
LABEL_NAMES = {"long-range": ("segregated", "paired"), "contact": ("excluded", "infiltrated")}
"""Class names of each rule, by label (0, 1)."""
_COMMON_COLUMNS = ("slide_id", "path", "patient_id", "label", "time", "event")
MANIFEST_COLUMNS = {
    "long-range": (*_COMMON_COLUMNS, "paired_tumours", "pairs", "cells"),
    "contact": (*_COMMON_COLUMNS, "contacts", "horizontal_contacts", "vertical_contacts", "orientation", "cells"),
}


@dataclass(frozen=True)
class DemoCohortSpec:
    """What the demo cohort holds. ``n_slides`` is rounded up to an even number (balanced classes).

    ``rule`` chooses what sets labels and survival (``long-range`` or ``contact``); ``long_range`` and
    ``layout`` describe the layouts of each (only the chosen rule's is used).
    """

    n_slides: int = 96
    seed: int = 0
    rule: str = "long-range"
    long_range: LongRangeSpec = field(default_factory=LongRangeSpec)
    layout: LayoutSpec = field(default_factory=LayoutSpec)
    survival: SurvivalSpec = field(default_factory=SurvivalSpec)
    augment: Augment = field(default_factory=Augment)
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        if self.rule not in DEMO_RULES:
            raise ValueError(f"demo rule must be one of {', '.join(DEMO_RULES)}; got {self.rule!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        # only the chosen rule's layout decides the slides
        d.pop("layout" if self.rule == "long-range" else "long_range")
        return d


@dataclass(frozen=True)
class DemoSlide:
    """One demo slide's ground truth."""

    slide_id: str
    layout: Layout
    time: float
    event: int


def draw_cohort(spec: DemoCohortSpec) -> list[DemoSlide]:
    """Every slide's layout, label and survival (no pixels): pure and seeded."""
    n = spec.n_slides + spec.n_slides % 2
    slides = []
    for i in range(n):
        # Slides 2p and 2p+1 get one label each, in an order drawn per pair: balanced, and stable when
        # the cohort is made larger.
        first = int(np.random.default_rng([spec.seed, i // 2, 2]).integers(2))
        label = first if i % 2 == 0 else 1 - first
        rng = np.random.default_rng([spec.seed, i])
        if spec.rule == "long-range":
            layout = draw_long_range(rng, label, spec.long_range)
            time, event = draw_survival(rng, paired_tumours(layout.cells), spec.survival)
        else:
            layout = draw_layout(rng, label, spec.layout)
            time, event = draw_survival(rng, layout.contacts, spec.survival)
        slides.append(DemoSlide(f"demo-{i:03d}", layout, time, event))
    return slides


def _write_slide(path: Path, cells: np.ndarray, seed: tuple[int, int, int], augment: Augment, quality: int,
                 slide_id: str) -> Path:
    """Render one slide's layout and write it as a pyramidal TIFF (a task of :func:`build_demo_cohort`)."""
    image = render_cells(cells, np.random.default_rng(list(seed)), augment)
    return write_pyramidal_tiff(path, image, MOSAIC_MPP, quality=quality,
                                description=f"wsi2dmamba demo slide {slide_id}")


def build_demo_cohort(out_dir: str | os.PathLike[str], spec: DemoCohortSpec = DemoCohortSpec(),
                      progress: bool = True, workers: int = 1) -> Path:
    """Write the slides (``out_dir/slides/<slide_id>.tiff``) and the manifest; return the manifest path.

    Files written: ``slides/*.tiff`` (pyramidal JPEG TIFF, level 0 at 0.5 µm/px, one cell =
    224×224 px), ``manifest.csv`` (columns ``MANIFEST_COLUMNS[spec.rule]``; ``label`` is a class name
    of :data:`LABEL_NAMES`, ``cells`` the layout as letters, see :meth:`Layout.letters`) and ``cohort.json``
    (the specification, so a rerun with another one rebuilds the slides). ``workers`` processes render
    the slides (each slide's pixels depend on its seed alone, so the files are the same for any number).
    """
    from tqdm.auto import tqdm

    from ..cohort.executors import make_executor

    out = Path(out_dir)
    slides_dir = run_layout.cohort_slides_dir(out)
    slides_dir.mkdir(parents=True, exist_ok=True)
    spec_hash = params_hash(spec.to_dict())
    meta_path = run_layout.cohort_record(out)
    same_spec = meta_path.exists() and json.loads(meta_path.read_text()).get("hash") == spec_hash
    slides = draw_cohort(spec)
    tasks = []
    for s in slides:
        path = run_layout.cohort_slide_file(out, s.slide_id)
        if not (same_spec and path.exists()):
            seed = (spec.seed, int(s.slide_id.split("-")[1]), 1)
            tasks.append((s.slide_id, (path, s.layout.cells, seed, spec.augment, spec.jpeg_quality, s.slide_id)))
    with tqdm(total=len(tasks), desc="demo slides", unit="slide", disable=not progress, dynamic_ncols=True) as bar:
        for outcome in make_executor("local", workers=workers).map(_write_slide, tasks):
            if outcome.error is not None:
                raise outcome.error
            bar.update(1)
    manifest = run_layout.cohort_manifest(out)
    write_text_atomic(manifest, manifest_text(slides, spec.rule))
    write_json_atomic(meta_path, {"hash": spec_hash, "spec": spec.to_dict(), "mpp": MOSAIC_MPP,
                                  "cell_px": CELL_PX, "n_slides": len(slides)})
    return manifest


def manifest_text(slides: list[DemoSlide], rule: str = "long-range") -> str:
    """The manifest CSV of the given slides (paths relative to the manifest's folder)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(MANIFEST_COLUMNS[rule])
    for s in slides:
        common = [s.slide_id, f"slides/{s.slide_id}.tiff", s.slide_id, LABEL_NAMES[rule][s.layout.label],
                  f"{s.time:g}", s.event]
        if rule == "long-range":
            pairs = " ".join("-".join(f"{r}.{c}" for r, c in pair) for pair in s.layout.pairs)
            w.writerow([*common, paired_tumours(s.layout.cells), pairs, s.layout.letters()])
        else:
            h, v = contact_orientations(s.layout.cells)
            w.writerow([*common, s.layout.contacts, h, v, s.layout.orientation, s.layout.letters()])
    return buf.getvalue()
