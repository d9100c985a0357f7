"""A batch of feature grids of different sizes, padded to one shape and masked."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..grid import FeatureGrid


@dataclass
class GridBatch:
    """Feature grids padded at the bottom and right to a common (H, W).

    Attributes:
        features: (B, H, W, D) float; zero at non-tissue cells and in batch padding.
        tissue: (B, H, W) bool; True where a tissue tile is (``grid/mask`` of the file).
        valid: (B, H, W) bool; True inside each slide's own grid (False only in batch padding).
        sizes: (B, 2) int64; each slide's own (H_b, W_b). Kept on the CPU wherever the grids are, so
            reading it never makes the host wait for the GPU.
        slide_ids: the slides, in batch order.
        tissue_cells: each slide's number of tissue cells, known on the host (None: count on the device).
    """

    features: torch.Tensor
    tissue: torch.Tensor
    valid: torch.Tensor
    sizes: torch.Tensor
    slide_ids: list[str]
    tissue_cells: tuple[int, ...] | None = None

    @property
    def batch_size(self) -> int:
        return int(self.features.shape[0])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> GridBatch:
        feats = self.features.to(device=device, dtype=dtype or self.features.dtype, non_blocking=True)
        return GridBatch(feats, self.tissue.to(device), self.valid.to(device), self.sizes.cpu(),
                         list(self.slide_ids), self.tissue_cells)

    def pin_memory(self) -> GridBatch:
        return GridBatch(self.features.pin_memory(), self.tissue.pin_memory(), self.valid.pin_memory(),
                         self.sizes.cpu(), list(self.slide_ids), self.tissue_cells)

    def unpadded(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slide ``b``'s own (H_b, W_b, D) features and (H_b, W_b) tissue mask."""
        h, w = (int(x) for x in self.sizes[b])
        return self.features[b, :h, :w], self.tissue[b, :h, :w]

    @classmethod
    def from_arrays(cls, items: Sequence[tuple[np.ndarray, np.ndarray]], slide_ids: Sequence[str] | None = None,
                    dtype: torch.dtype = torch.float32) -> GridBatch:
        """Build from (features (H, W, D), tissue mask (H, W)) pairs."""
        if not items:
            raise ValueError("a GridBatch needs at least one grid")
        dims = {int(f.shape[-1]) for f, _ in items}
        if len(dims) != 1:
            raise ValueError(f"grids have different feature dims {sorted(dims)}")
        d = dims.pop()
        hmax = max(int(f.shape[0]) for f, _ in items)
        wmax = max(int(f.shape[1]) for f, _ in items)
        n = len(items)
        feats = torch.zeros((n, hmax, wmax, d), dtype=dtype)
        tissue = torch.zeros((n, hmax, wmax), dtype=torch.bool)
        valid = torch.zeros((n, hmax, wmax), dtype=torch.bool)
        sizes = torch.zeros((n, 2), dtype=torch.int64)
        counts = []
        for b, (f, m) in enumerate(items):
            h, w = int(f.shape[0]), int(f.shape[1])
            m = torch.as_tensor(np.asarray(m)).bool()
            feats[b, :h, :w] = torch.as_tensor(np.asarray(f)).to(dtype) * m[..., None]
            tissue[b, :h, :w] = m
            valid[b, :h, :w] = True
            sizes[b] = torch.tensor([h, w])
            counts.append(int(m.sum()))
        ids = list(slide_ids) if slide_ids is not None else [str(i) for i in range(n)]
        return cls(feats, tissue, valid, sizes, ids, tuple(counts))

    @classmethod
    def from_cells(cls, items: Sequence[tuple[torch.Tensor, torch.Tensor, tuple[int, int]]],
                   slide_ids: Sequence[str], dtype: torch.dtype = torch.float32) -> GridBatch:
        """Build from each slide's tissue cells alone, on the device their features are on.

        Args:
            items: per slide, features (n_b, D) of its tissue cells, their (n_b, 2) int64 (row, col)
                on the slide's own grid (unique), and the grid's (H_b, W_b). All on one device.
            slide_ids: the slides, in the order of ``items``.
            dtype: dtype of the batch's features.

        Equal to :meth:`from_arrays` of the dense grids; on a GPU only the tissue cells need to reach
        it, the padded grid is assembled there, and nothing here waits for the GPU.
        """
        if not items:
            raise ValueError("a GridBatch needs at least one grid")
        dims = {int(f.shape[-1]) for f, _, _ in items}
        if len(dims) != 1:
            raise ValueError(f"grids have different feature dims {sorted(dims)}")
        d = dims.pop()
        device = items[0][0].device
        hmax = max(int(size[0]) for _, _, size in items)
        wmax = max(int(size[1]) for _, _, size in items)
        n = len(items)
        feats = torch.zeros((n, hmax * wmax, d), dtype=dtype, device=device)
        tissue = torch.zeros((n, hmax * wmax), dtype=torch.bool, device=device)
        valid = torch.zeros((n, hmax, wmax), dtype=torch.bool, device=device)
        for b, (f, index, (h, w)) in enumerate(items):
            canvas = index[:, 0] * wmax + index[:, 1]
            feats[b].index_copy_(0, canvas, f.to(dtype))
            tissue[b].index_fill_(0, canvas, True)
            valid[b, :h, :w] = True
        sizes = torch.tensor([[int(h), int(w)] for _, _, (h, w) in items], dtype=torch.int64)
        counts = tuple(int(f.shape[0]) for f, _, _ in items)
        return cls(feats.view(n, hmax, wmax, d), tissue.view(n, hmax, wmax), valid, sizes, list(slide_ids), counts)

    @classmethod
    def from_grids(cls, grids: Sequence[FeatureGrid], dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> GridBatch:
        """Build from feature grid files already read; with a CUDA ``device``, assembled on it from the
        tissue cells (see :meth:`from_cells`)."""
        if device is None or torch.device(device).type != "cuda":
            batch = cls.from_arrays([g.dense() for g in grids], [g.slide_id for g in grids], dtype=dtype)
            return batch if device is None else batch.to(device)
        return cls.from_cells([cells_on(g, device) for g in grids], [g.slide_id for g in grids], dtype=dtype)


def cells_on(grid: FeatureGrid, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """A grid's tissue cells on ``device``: features (n, D) in their stored dtype, (n, 2) int64 (row, col),
    and the grid's (H, W). Copied from pinned memory, so the host does not wait for the GPU's queued work."""
    device = torch.device(device)
    feats = torch.from_numpy(np.ascontiguousarray(grid.features))
    index = torch.from_numpy(np.ascontiguousarray(grid.index, dtype=np.int64))
    if device.type == "cuda":
        feats, index = feats.pin_memory(), index.pin_memory()
    return (feats.to(device, non_blocking=True), index.to(device, non_blocking=True),
            (int(grid.shape[0]), int(grid.shape[1])))
