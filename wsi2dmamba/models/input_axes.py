"""An input reduction fitted on a fold's training cells: each cell's features on a few whitened principal axes.

An encoder gives 1,000 or more numbers per tile. When the label depends on where a few tissue kinds lie,
those kinds differ along a handful of directions, and the rest of each tile's numbers only lets a model
tell its training slides apart (it memorises them). Projecting every cell on the first ``k`` principal
axes of the training cells, each scaled to unit variance, keeps the directions along which tissue kinds
differ most and removes the rest before the model sees them.

The axes are fitted on the training partition of each fold only (never on validation or test slides) and
travel with the model as buffers, so a checkpoint or bundle applies the same projection to new slides.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> cells = [rng.normal(size=(50, 16)) * np.arange(1, 17) for _ in range(4)]
>>> fitted = fit_input_axes(cells, 3)
>>> fitted.axes.shape, fitted.mean.shape
((3, 16), (16,))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import StageInputError
from .batch import GridBatch

#: Variance below which an axis counts as empty (features that are constant along it).
_MIN_VARIANCE = 1e-12


@dataclass(frozen=True)
class FittedAxes:
    """Principal axes of a set of cells.

    Attributes:
        mean: (D,) float64, the cells' mean feature vector.
        axes: (k, D) float64; row i is the i-th principal direction divided by its standard deviation, so
            ``(x - mean) @ axes.T`` has unit variance along each of the k outputs over the fitted cells.
        variance: (k,) float64, the variance along each axis before scaling (largest first).
        n_cells: number of cells the axes were fitted on.
    """

    mean: np.ndarray
    axes: np.ndarray
    variance: np.ndarray
    n_cells: int


def _row_blocks(cell_features: Iterable[np.ndarray], rows: int) -> Iterable[np.ndarray]:
    """The rows of every array, regrouped into (≤ rows + one slide's cells, D) blocks."""
    pending, count = [], 0
    for feats in cell_features:
        x = np.asarray(feats).reshape(-1, np.shape(feats)[-1])
        pending.append(x)
        count += x.shape[0]
        if count >= rows:
            yield np.concatenate(pending)
            pending, count = [], 0
    if pending:
        yield np.concatenate(pending)


def _moments(cell_features: Iterable[np.ndarray], device: torch.device | str) -> tuple[np.ndarray, np.ndarray, int]:
    """(Σ x, Σ x xᵀ, n) over every row, summed in float64 on ``device`` one block of cells at a time."""
    total, outer, n = None, None, 0
    for block in _row_blocks(cell_features, rows=65536):
        x = torch.from_numpy(block).to(device=device, dtype=torch.float64)
        if total is None:
            total = torch.zeros(x.shape[1], dtype=torch.float64, device=device)
            outer = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=device)
        total += x.sum(dim=0)
        outer += x.T @ x
        n += x.shape[0]
    if total is None:
        return np.zeros(0), np.zeros((0, 0)), 0
    return total.cpu().numpy(), outer.cpu().numpy(), n


def fit_input_axes(cell_features: Iterable[np.ndarray], k: int, device: torch.device | str = "cpu") -> FittedAxes:
    """The first ``k`` whitened principal axes of every row of ``cell_features``.

    Args:
        cell_features: arrays of shape (N_i, D), one per slide (its tissue cells), float16 or float32.
        k: number of axes to keep, 1 ≤ k ≤ D.
        device: where the sums are taken (a GPU makes a large cohort's sums quick); the result is the same.

    Each axis's sign is fixed so that its largest-magnitude entry is positive, which makes the result the
    same on every platform. Sums are taken in float64 (memory O(D²) besides one block of cells).

    Raises:
        StageInputError: fewer than two cells, ``k`` larger than D, or fewer than ``k`` directions with any
            variance (the features are too uniform for ``k`` axes).
    """
    total, outer, n = _moments(cell_features, device)
    if n < 2:
        raise StageInputError(f"input_axes needs the training slides' cells to fit on, and got {n} cell(s)")
    dim = total.shape[0]
    if not 1 <= k <= dim:
        raise StageInputError(f"input_axes={k} is more axes than the features have ({dim}); choose at most {dim}")
    mean = total / n
    cov = outer / n - np.outer(mean, mean)
    variance, vectors = np.linalg.eigh((cov + cov.T) / 2)
    order = np.argsort(variance)[::-1][:k]
    variance, vectors = variance[order], vectors[:, order].T
    if variance[-1] <= _MIN_VARIANCE:
        raise StageInputError(f"input_axes={k}: the training cells vary along only "
                              f"{int((variance > _MIN_VARIANCE).sum())} direction(s); choose fewer axes")
    signs = np.sign(vectors[np.arange(k), np.abs(vectors).argmax(axis=1)])
    return FittedAxes(mean, vectors * signs[:, None] / np.sqrt(variance)[:, None], variance, n)


class InputAxes(nn.Module):
    """Fixed projection of (…, D) cell features onto ``k`` whitened axes, held as buffers.

    Before :meth:`load` the buffers are zero and :meth:`reduce` refuses to run, so a model whose axes
    were never fitted (or read from a checkpoint) cannot give silent nonsense.
    """

    def __init__(self, in_dim: int, k: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("axes", torch.zeros(k, in_dim))
        self.fitted = False  # a host flag, so that calling the model never waits on the GPU to check it
        self.register_load_state_dict_post_hook(_mark_fitted)

    def load(self, fitted: FittedAxes) -> None:
        """Set the buffers from :func:`fit_input_axes`; shapes must match this module's."""
        if tuple(fitted.axes.shape) != tuple(self.axes.shape):
            raise ValueError(f"fitted axes have shape {tuple(fitted.axes.shape)}; this model expects "
                             f"{tuple(self.axes.shape)}")
        with torch.no_grad():
            self.mean.copy_(torch.from_numpy(fitted.mean))
            self.axes.copy_(torch.from_numpy(fitted.axes))
        self.fitted = True

    def reduce(self, batch: GridBatch) -> GridBatch:
        """``batch`` with its (B, H, W, D) features replaced by (B, H, W, k) float32 projections.

        Non-tissue cells and batch padding stay exactly zero. The projection runs in float32 outside any
        autocast region: it is a fixed map, and k numbers per cell are cheap.
        """
        if not self.fitted:
            raise RuntimeError("the model's input axes were never fitted: train it with input_axes, or load "
                               "its checkpoint, before calling it")
        with torch.autocast(batch.features.device.type, enabled=False):
            x = (batch.features.float() - self.mean) @ self.axes.T
        x = x * (batch.tissue & batch.valid).unsqueeze(-1)
        return dataclasses.replace(batch, features=x)


def _mark_fitted(module: InputAxes, incompatible_keys) -> None:
    """After ``load_state_dict``: axes read from a checkpoint are fitted ones."""
    module.fitted = True
