"""Where each slide sits in a padded batch, and the per-slide reorderings the 2D and 1D models need.

A batch holds each slide's grid at the top-left of a common (H, W) canvas; the rest is batch padding
(``valid`` False). Operations that look at neighbours must see each slide exactly as if it were alone:
a 3×3 convolution sees zeros beyond the slide's own border, a raster-order convolution runs along the
slide's own rows, and a scan from another corner starts at the slide's own corner. The helpers here do
that, so a slide's output never depends on what it was batched with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .batch import GridBatch

CORNERS = ("tl", "tr", "bl", "br")
# (flip rows, flip columns) that bring a corner to the top-left, where every scan starts.
_CORNER_FLIPS = {"tl": (False, False), "tr": (False, True), "bl": (True, False), "br": (True, True)}


@dataclass(frozen=True)
class GridLayout:
    """The slides' own sizes inside a padded batch.

    Attributes:
        sizes: each slide's (H_b, W_b), in batch order.
        shape: the canvas (H, W).
        valid: (B, H, W) bool, True inside each slide's own grid.
    """

    sizes: tuple[tuple[int, int], ...]
    shape: tuple[int, int]
    valid: torch.Tensor

    @classmethod
    def from_batch(cls, batch: GridBatch) -> GridLayout:
        sizes = tuple((int(h), int(w)) for h, w in batch.sizes.tolist())
        return cls(sizes, tuple(batch.valid.shape[1:]), batch.valid)  # type: ignore[arg-type]

    @property
    def padded(self) -> bool:
        """True when some slide is smaller than the canvas (the batch has padding cells)."""
        return any(s != self.shape for s in self.sizes)


def zero_padding(x: torch.Tensor, layout: GridLayout) -> torch.Tensor:
    """Zero (B, C, H, W) ``x`` at batch padding cells, so convolutions see each slide's own border."""
    if not layout.padded:
        return x
    return x * layout.valid.unsqueeze(1).to(x.dtype)


def flip_to_corner(x: torch.Tensor, layout: GridLayout, corner: str) -> torch.Tensor:
    """Mirror each slide's own grid in (B, C, H, W) ``x`` so that ``corner`` lands at the top-left.

    The padding stays at the bottom and right; the map is its own inverse (apply it again to undo).
    """
    flip_h, flip_w = _CORNER_FLIPS[corner]
    dims = [d for d, f in ((2, flip_h), (3, flip_w)) if f]
    if not dims:
        return x
    if not layout.padded:
        return x.flip(dims)
    out = []
    for b, (h, w) in enumerate(layout.sizes):
        own = x[b, :, :h, :w].flip([d - 1 for d in dims])
        out.append(F.pad(own, (0, layout.shape[1] - w, 0, layout.shape[0] - h)))
    return torch.stack(out)


def raster_conv1d(x: torch.Tensor, conv: Callable[[torch.Tensor], torch.Tensor], layout: GridLayout) -> torch.Tensor:
    """A causal 1D convolution along each slide's own raster (row-major) order of (B, C, H, W) ``x``.

    ``conv`` (a ``Conv1d`` or a function of (N, C, L)) must pad ``kernel_size - 1`` on both sides; the
    trailing outputs are dropped, so each cell
    sees itself and the cells before it in its slide's raster order, running on across row ends.
    """
    b, c, h, w = x.shape
    if h == 1 or all(wb == w for _, wb in layout.sizes):  # the canvas's raster order is every slide's own
        seq = zero_padding(x, layout).reshape(b, c, h * w)
        return conv(seq)[..., : h * w].reshape(b, c, h, w)
    out = []
    for i, (hb, wb) in enumerate(layout.sizes):
        seq = x[i, :, :hb, :wb].reshape(1, c, hb * wb)
        y = conv(seq)[..., : hb * wb].reshape(c, hb, wb)
        out.append(F.pad(y, (0, w - wb, 0, h - hb)))
    return torch.stack(out)


@dataclass(frozen=True)
class RasterColumn:
    """Each slide's whole grid (tissue and non-tissue cells) in its own raster order, as one column.

    A 1D scan along the raster order is the 2D scan of an L × 1 grid; the column of slide b holds its
    H_b · W_b cells first, so positions past them (batch padding) never reach its cells.

    Attributes:
        index: (B, L) int64 flat canvas index (row * W + col) of each column position, or None when
            every slide fills the canvas (the canvas's raster order is then every slide's own).
        mask: (B, L) bool, True at a slide's own cells (None with ``index``).
        shape: the canvas (H, W).
    """

    index: torch.Tensor | None
    mask: torch.Tensor | None
    shape: tuple[int, int]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, C, L, 1) contiguous."""
        b, c = x.shape[:2]
        if self.index is None:
            return x.reshape(b, c, -1, 1).contiguous()
        flat = x.reshape(b, c, -1)
        return flat.gather(2, self.index[:, None, :].expand(-1, c, -1)).unsqueeze(-1).contiguous()

    def scatter(self, y: torch.Tensor) -> torch.Tensor:
        """(B, C, L, 1) → (B, C, H, W), zero at batch padding cells."""
        b, c = y.shape[:2]
        if self.index is None:
            return y.reshape(b, c, *self.shape)
        values = y.squeeze(-1) * self.mask[:, None, :].to(y.dtype)
        out = values.new_zeros(b, c, self.shape[0] * self.shape[1])
        # every own cell receives exactly one value; padding positions add zeros, so the sum is exact
        out = out.scatter_add(2, self.index[:, None, :].expand(-1, c, -1), values)
        return out.view(b, c, *self.shape)


def to_raster_column(layout: GridLayout) -> RasterColumn:
    """The :class:`RasterColumn` of a batch's layout."""
    if not layout.padded:
        return RasterColumn(None, None, layout.shape)
    h, w = layout.shape
    length = max(hb * wb for hb, wb in layout.sizes)
    device = layout.valid.device
    index = torch.zeros(len(layout.sizes), length, dtype=torch.long, device=device)
    mask = torch.zeros(len(layout.sizes), length, dtype=torch.bool, device=device)
    for b, (hb, wb) in enumerate(layout.sizes):
        rows = torch.arange(hb, device=device)[:, None] * w
        own = (rows + torch.arange(wb, device=device)[None, :]).flatten()
        index[b, : own.numel()] = own
        mask[b, : own.numel()] = True
    return RasterColumn(index, mask, layout.shape)


@dataclass(frozen=True)
class TissueSequence:
    """Each slide's tissue cells in raster (row-major) order, packed into (B, L) and padded at the end.

    Attributes:
        index: (B, L) int64 flat cell index (row * W + col) of each sequence position.
        mask: (B, L) bool, True at the slide's tissue cells.
        lengths: (B,) number of tissue cells per slide.
    """

    index: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor

    @classmethod
    def from_batch(cls, batch: GridBatch) -> TissueSequence:
        cells = (batch.tissue & batch.valid).flatten(1)
        lengths = cells.sum(dim=1)
        # a stable sort on "not tissue" puts the tissue cells first, in raster order
        order = torch.sort((~cells).to(torch.uint8), dim=1, stable=True).indices
        length = max(int(lengths.max()), 1)
        index = order[:, :length]
        mask = torch.arange(length, device=cells.device)[None, :] < lengths[:, None]
        return cls(index, mask, lengths)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, D) cell vectors → (B, L, D) sequences (padding positions hold other cells' values)."""
        flat = x.flatten(1, 2)
        return flat.gather(1, self.index.unsqueeze(-1).expand(-1, -1, flat.shape[-1]))

    def scatter(self, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """(B, L) per-position values → (B, H, W), zero at cells not in the sequence."""
        out = values.new_zeros(values.shape[0], shape[0] * shape[1])
        out.scatter_(1, self.index, values * self.mask.to(values.dtype))
        return out.view(values.shape[0], *shape)

    def layout(self) -> GridLayout:
        """The sequences as a batch of L_b × 1 grids (a 1D scan is the 2D scan of one column)."""
        sizes = tuple((int(n), 1) for n in self.lengths.tolist())
        return GridLayout(sizes, (int(self.mask.shape[1]), 1), self.mask.unsqueeze(2))
