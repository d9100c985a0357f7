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
        sizes: (B, 2) int64; each slide's own (H_b, W_b).
        slide_ids: the slides, in batch order.
    """

    features: torch.Tensor
    tissue: torch.Tensor
    valid: torch.Tensor
    sizes: torch.Tensor
    slide_ids: list[str]

    @property
    def batch_size(self) -> int:
        return int(self.features.shape[0])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> GridBatch:
        feats = self.features.to(device=device, dtype=dtype or self.features.dtype, non_blocking=True)
        return GridBatch(feats, self.tissue.to(device), self.valid.to(device), self.sizes.to(device),
                         list(self.slide_ids))

    def pin_memory(self) -> GridBatch:
        return GridBatch(self.features.pin_memory(), self.tissue.pin_memory(), self.valid.pin_memory(),
                         self.sizes.pin_memory(), list(self.slide_ids))

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
        for b, (f, m) in enumerate(items):
            h, w = int(f.shape[0]), int(f.shape[1])
            m = torch.as_tensor(np.asarray(m)).bool()
            feats[b, :h, :w] = torch.as_tensor(np.asarray(f)).to(dtype) * m[..., None]
            tissue[b, :h, :w] = m
            valid[b, :h, :w] = True
            sizes[b] = torch.tensor([h, w])
        ids = list(slide_ids) if slide_ids is not None else [str(i) for i in range(n)]
        return cls(feats, tissue, valid, sizes, ids)

    @classmethod
    def from_grids(cls, grids: Sequence[FeatureGrid], dtype: torch.dtype = torch.float32) -> GridBatch:
        """Build from feature grid files already read."""
        return cls.from_arrays([g.dense() for g in grids], [g.slide_id for g in grids], dtype=dtype)
