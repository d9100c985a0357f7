"""Feature grids and targets of a cohort, held in memory for training."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import run_layout as layout
from ..cohort import Cohort
from ..cohort.ledger import recorded_sha256
from ..errors import ConfigError, GridFileError, StageInputError
from ..grid import FeatureGrid, read_feature_grid
from ..grid.guard import guard_grid_files
from ..models import GridBatch
from ..models.batch import cells_on


def class_names(cohort: Cohort) -> list[str]:
    """The cohort's distinct labels, in numeric order when all are numbers, else alphabetical."""
    labels = {r.label for r in cohort if r.label is not None}
    try:
        return sorted(labels, key=float)
    except ValueError:
        return sorted(labels)


def load_feature_grids(cohort: Cohort, features_dir: str | os.PathLike[str], slide_ids: Sequence[str] | None = None,
                       progress: bool = False) -> dict[str, FeatureGrid]:
    """Read ``<features_dir>/<slide_id>.h5`` for every slide (or the given ones) into memory.

    Raises:
        StageInputError: some slides have no feature grid file (all of them are listed).
        GridFileError: a file is damaged (every damaged file is named), or the feature dimensions differ
            between files.
    """
    folder = Path(features_dir).expanduser()
    if not folder.is_dir():
        raise StageInputError(f"Feature folder not found: {folder}. Run `wsi2dmamba extract` first, or pass the "
                              "folder RUN/features/<encoder> that it wrote.")
    ids = list(slide_ids) if slide_ids is not None else cohort.slide_ids
    missing = [sid for sid in ids if not layout.grid_file(folder, sid).is_file()]
    if missing:
        shown = ", ".join(missing[:20]) + (f" … ({len(missing)} in all)" if len(missing) > 20 else "")
        raise StageInputError(f"{len(missing)} slide(s) of the cohort have no feature grid in {folder}: {shown}. "
                              "Run `wsi2dmamba extract` for them (see RUN/ledger.csv for slides that failed "
                              "earlier stages) or remove them from the cohort.")
    _refuse_damaged([layout.grid_file(folder, sid) for sid in ids], folder)
    from tqdm.auto import tqdm

    grids = {}
    for sid in tqdm(ids, desc="reading feature grids", unit="slide", disable=not progress):
        grids[sid] = read_feature_grid(layout.grid_file(folder, sid))
    dims = {g.feature_dim for g in grids.values()}
    if len(dims) > 1:
        by_dim = {d: next(s for s, g in grids.items() if g.feature_dim == d) for d in dims}
        raise GridFileError(f"Feature grids in {folder} have different feature dimensions "
                            f"({', '.join(f'{d} e.g. {s}' for d, s in sorted(by_dim.items()))}); "
                            "they were made by different encoders.")
    empty = [sid for sid, g in grids.items() if g.n_tiles == 0]
    if empty:
        raise StageInputError(f"slide(s) {', '.join(empty[:20])} have no tissue tile in their feature grid; "
                              "remove them from the cohort or re-tile them with a lower tissue threshold.")
    return grids


@functools.lru_cache(maxsize=2)
def _grid_store(folder: str) -> dict[str, tuple[tuple[int, int], FeatureGrid]]:
    """This process's grids read from ``folder``: slide id → ((size, mtime_ns) of the file, grid)."""
    return {}


def _stamp(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError:
        return (-1, -1)
    return st.st_size, st.st_mtime_ns


def worker_feature_grids(cohort: Cohort, features_dir: str | os.PathLike[str],
                         slide_ids: Sequence[str]) -> dict[str, FeatureGrid]:
    """:func:`load_feature_grids`, keeping the grids in this process for its next calls.

    A worker that trains several folds (or restarts) reads each slide's file once; a file rewritten since
    (another size or modification time) is read again.
    """
    folder = Path(features_dir).expanduser()
    store = _grid_store(str(folder.resolve()))
    stamps = {sid: _stamp(layout.grid_file(folder, sid)) for sid in slide_ids}
    stale = [sid for sid in slide_ids if sid not in store or store[sid][0] != stamps[sid]]
    if stale:
        fresh = load_feature_grids(cohort, folder, stale)
        store.update({sid: (stamps[sid], g) for sid, g in fresh.items()})
    return {sid: store[sid][1] for sid in slide_ids}


def _refuse_damaged(paths: list[Path], folder: Path) -> None:
    """Raise GridFileError naming every file that HDF5 must not read in this process: changed since the
    run wrote it (sha256), or crashing or hanging the reader in a child process (files from elsewhere)."""
    recorded = {p: sha for p in paths if (sha := recorded_sha256(p))}
    bad = guard_grid_files(paths, "features", recorded, writer="extract")
    if bad:
        raise GridFileError(f"{len(bad)} feature grid file(s) in {folder} cannot be used: "
                            + " | ".join(bad[p] for p in paths if p in bad)
                            + " Training needs every slide of the cohort: extract the named slides again, or "
                            "remove them from the cohort.")


@dataclass(frozen=True)
class Targets:
    """What a model is trained to predict, per slide.

    Attributes:
        task: "classification" or "survival".
        label_index: slide_id → class index (classification).
        bins: slide_id → survival interval (survival).
        time, event: slide_id → survival time and event flag (survival).
    """

    task: str
    label_index: Mapping[str, int]
    bins: Mapping[str, int]
    time: Mapping[str, float]
    event: Mapping[str, int]

    def tensors(self, slide_ids: Sequence[str]) -> dict[str, torch.Tensor]:
        if self.task == "survival":
            return {"bins": torch.tensor([self.bins[s] for s in slide_ids], dtype=torch.int64),
                    "event": torch.tensor([self.event[s] for s in slide_ids], dtype=torch.float32)}
        return {"label": torch.tensor([self.label_index[s] for s in slide_ids], dtype=torch.int64)}


def make_targets(cohort: Cohort, task: str, classes: Sequence[str] | None = None,
                 bin_edges: np.ndarray | None = None) -> Targets:
    """Per-slide targets: class indices (into ``classes``) or survival bins (of ``bin_edges``)."""
    from .losses import time_to_bin

    if task == "survival":
        if not cohort.has_survival:
            bad = [r.slide_id for r in cohort if r.time is None or r.event is None]
            raise ConfigError(f"Survival training needs 'time' and 'event' for every slide; missing for "
                              f"{', '.join(bad[:10])}{' …' if len(bad) > 10 else ''}.")
        time = {r.slide_id: float(r.time) for r in cohort}  # type: ignore[arg-type]
        event = {r.slide_id: int(r.event) for r in cohort}  # type: ignore[arg-type]
        edges = np.asarray(bin_edges if bin_edges is not None else [], np.float64)
        b = time_to_bin(np.array(list(time.values())), edges)
        return Targets(task, {}, dict(zip(time, b.tolist())), time, event)
    if not cohort.has_labels:
        bad = [r.slide_id for r in cohort if r.label is None]
        raise ConfigError(f"Classification needs a 'label' for every slide; missing for "
                          f"{', '.join(bad[:10])}{' …' if len(bad) > 10 else ''}.")
    classes = list(classes) if classes is not None else class_names(cohort)
    lookup = {c: i for i, c in enumerate(classes)}
    unknown = sorted({r.label for r in cohort if r.label not in lookup})  # type: ignore[misc]
    if unknown:
        raise ConfigError(f"labels {unknown} are not among the model's classes {classes}")
    return Targets(task, {r.slide_id: lookup[r.label] for r in cohort}, {}, {}, {})  # type: ignore[index]


def to_device(x, device: torch.device):
    """A tensor or :class:`GridBatch` on ``device``, copied without making the host wait for the GPU.

    A copy from pageable memory waits for the GPU's queued work, so the host copy is pinned first; on the
    CPU, or when already on ``device``, the input is returned as it is.
    """
    if device.type != "cuda":
        return x.to(device)
    if isinstance(x, GridBatch):
        want = device.index if device.index is not None else torch.cuda.current_device()
        if x.features.device == torch.device("cuda", want):
            return x
        p = x.pin_memory()
        return GridBatch(*(t.to(device, non_blocking=True) for t in (p.features, p.tissue, p.valid)),
                         p.sizes, list(p.slide_ids), p.tissue_cells)
    return x.pin_memory().to(device, non_blocking=True)


#: Share of a GPU's memory that a training process may fill with its cohort's tissue-cell features.
DEVICE_CELLS_SHARE = 0.25


class BatchMaker:
    """Padded batches of a cohort's feature grids, made on the device that trains on them.

    On a GPU each slide's tissue cells (features in their stored dtype, and their cells) are copied there
    at first use and kept while the kept cells take at most ``budget`` bytes (default: a quarter of the
    GPU's memory); the others are copied again at each use, from pinned memory. The padded grid is
    assembled on the GPU (:meth:`GridBatch.from_cells`), so a step neither builds it on the CPU nor moves
    its empty cells, and the host never waits for the GPU. On the CPU batches are built as
    :meth:`GridBatch.from_grids` builds them.
    """

    def __init__(self, grids: Mapping[str, FeatureGrid], device: torch.device, budget: int | None = None) -> None:
        self.grids = grids
        self.device = device
        if budget is None and device.type == "cuda":
            budget = int(DEVICE_CELLS_SHARE * torch.cuda.get_device_properties(device).total_memory)
        self.budget = budget or 0
        self.kept: dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, int]]] = {}
        self.kept_bytes = 0

    def cells(self, slide_id: str) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Slide ``slide_id``'s tissue cells on the device (see :func:`~wsi2dmamba.models.batch.cells_on`)."""
        if slide_id in self.kept:
            return self.kept[slide_id]
        grid = self.grids[slide_id]
        cells = cells_on(grid, self.device)
        size = grid.features.nbytes + grid.index.shape[0] * 16
        if self.kept_bytes + size <= self.budget:
            self.kept[slide_id] = cells
            self.kept_bytes += size
        return cells

    def __call__(self, slide_ids: Sequence[str]) -> GridBatch:
        """The batch of ``slide_ids`` (in that order), on the device."""
        if self.device.type != "cuda":
            return GridBatch.from_grids([self.grids[s] for s in slide_ids])
        return GridBatch.from_cells([self.cells(s) for s in slide_ids], list(slide_ids))


def batch_ids(slide_ids: Sequence[str], batch_size: int) -> list[list[str]]:
    """Consecutive groups of ``batch_size`` slides, in the given order."""
    return [list(slide_ids[start:start + batch_size]) for start in range(0, len(slide_ids), batch_size)]


def iter_batches(slide_ids: Sequence[str], grids: Mapping[str, FeatureGrid], batch_size: int,
                 maker: BatchMaker | None = None) -> Iterator[tuple[list[str], GridBatch]]:
    """Consecutive batches of ``batch_size`` slides, in the given order, each made when it is reached
    (by ``maker`` when given, else on the CPU)."""
    for ids in batch_ids(slide_ids, batch_size):
        yield ids, maker(ids) if maker is not None else GridBatch.from_grids([grids[s] for s in ids])
