"""MambaMIL (Yang et al., MICCAI 2024): Mamba over the tissue cells read as a 1D sequence in raster order,
with sequence reordering (SR-Mamba).

Each layer scans the sequence as it is and, with its own parameters, the sequence *reordered* with rate R:
the cells at positions 0, R, 2R, … first, then 1, R + 1, 2R + 1, … (the sequence cut into rows of R and
read column by column). The reordered branch's output is put back in the original order and added, so a
cell also hears cells R, 2R, … positions away without the long decay between them.

The 1D selective scan is the L × 1 case of the 2DMamba scan (a single column: the horizontal pass is the
identity and the vertical pass is Mamba's scan), so this baseline runs on the same operator and kernels
as 2DMambaMIL. A column rather than a row, because the kernels keep a whole row of states on chip.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from .base import AttentionPool, MILConfig, MILModel, MILOutput, embed_cells, pooling_mask
from .batch import GridBatch
from .grid_layout import GridLayout, TissueSequence
from .ssm_blocks import Mamba2DBlock
from .registry import register_model


class MambaMILConfig(MILConfig):
    """MambaMIL options.

    Attributes:
        d_model: width of the cell embedding (128 as in the 2DMambaMIL comparison).
        n_layers: number of residual Mamba layers.
        d_state: SSM state size.
        expand: inner width factor.
        conv_kernel: taps of the causal depthwise Conv1d.
        bidirectional: also scan the sequence backwards (own parameters, outputs summed).
        reorder_rate: R of the sequence-reordering branch (MambaMIL: 10); None leaves the branch out
            (plain Mamba layers over the raster order).
        attn_dim: width of the attention pooling's hidden layer.
        scan_backend: ``auto``, ``torch`` or ``cupy``.
    """

    d_model: int = Field(default=128, gt=0)
    n_layers: int = Field(default=2, ge=0)
    d_state: int = Field(default=16, gt=0)
    expand: int = Field(default=2, gt=0)
    conv_kernel: int = Field(default=4, gt=0)
    bidirectional: bool = False
    reorder_rate: int | None = Field(default=10, ge=2)
    attn_dim: int = Field(default=128, gt=0)
    scan_backend: str = Field(default="auto", exclude=True)  # runtime: not hashed, not in config_dict


def reorder_index(lengths: torch.Tensor, length: int, rate: int) -> torch.Tensor:
    """(B, L) positions of each sequence in its reordered order: p sorted by (p mod R, p div R).

    Positions past a sequence's own length (batch padding) stay at the end, in place.
    """
    pos = torch.arange(length, device=lengths.device)
    own = pos[None, :] < lengths[:, None]
    key = torch.where(own, (pos % rate) * length + pos // rate, length * rate + pos)
    return torch.argsort(key, dim=1)


class _ReorderedBranch(nn.Module):
    """A Mamba mixer applied to the sequence in its reordered order; output in the original order."""

    def __init__(self, mixer: nn.Module, rate: int) -> None:
        super().__init__()
        self.mixer, self.rate = mixer, rate

    def forward(self, x: torch.Tensor, layout: GridLayout) -> torch.Tensor:
        """(B, L, 1, d) → (B, L, 1, d)."""
        lengths = torch.tensor([h for h, _ in layout.sizes], device=x.device)
        order = reorder_index(lengths, x.shape[1], self.rate)
        index = order[:, :, None, None].expand(-1, -1, *x.shape[2:])
        y = self.mixer(x.gather(1, index), layout)
        return torch.empty_like(y).scatter_(1, index, y)


class _PreNormResidual(nn.Module):
    """x + Σ mixer(LayerNorm(x)) over the layer's mixers (the sequence as it is, and reordered)."""

    def __init__(self, d_model: int, *mixers: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.mixers = nn.ModuleList(mixers)

    def forward(self, x, layout):
        h = self.norm(x)
        return x + sum(mixer(h, layout) for mixer in self.mixers)


@register_model("mambamil", "MambaMIL: SR-Mamba layers (the raster order and its reordering with rate 10) over "
                "the tissue cells, attention pooling.")
class MambaMIL(MILModel):
    config_class = MambaMILConfig

    def __init__(self, config: MambaMILConfig) -> None:
        super().__init__(config)
        d = config.d_model
        self.embed = nn.Sequential(nn.Linear(config.cell_dim, d), nn.ReLU(), nn.Dropout(config.dropout))
        self.blocks = nn.ModuleList(_PreNormResidual(d, *self._mixers(config)) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(d)
        self.pool = AttentionPool(d, config.attn_dim, gated=False)
        self.head = nn.Linear(d, config.n_out)

    @staticmethod
    def _mixers(config: MambaMILConfig) -> list[nn.Module]:
        def mamba() -> Mamba2DBlock:
            corners = ("tl", "bl") if config.bidirectional else ("tl",)  # on an L × 1 grid, "bl" is the reverse
            return Mamba2DBlock(config.d_model, d_state=config.d_state, expand=config.expand,
                                dt_rank=math.ceil(config.d_model / 16), conv="causal1d",
                                conv_kernel=config.conv_kernel, corners=corners, backend=config.scan_backend)

        if config.reorder_rate is None:
            return [mamba()]
        return [mamba(), _ReorderedBranch(mamba(), config.reorder_rate)]

    def forward_grid(self, batch: GridBatch, targets: torch.Tensor | None = None) -> MILOutput:
        pooling_mask(batch)  # refuses slides without tissue
        seq = TissueSequence.from_batch(batch)
        layout = seq.layout()
        x = seq.gather(embed_cells(self.embed, batch.features)).unsqueeze(2)  # (B, L, 1, d)
        for block in self.blocks:
            x = block(x, layout)
        pooled, weights = self.pool(self.norm(x), layout.valid)
        attention = seq.scatter(weights.squeeze(2), tuple(batch.tissue.shape[1:]))
        return MILOutput(self.head(pooled), attention)
