"""A plain 2D CNN over the feature grid: the first spatial control for the 2D state-space models.

Frame (the same as 2DMambaMIL's, with the state-space blocks replaced by convolutions): cell features →
Linear + GELU + Dropout → non-tissue cells replaced by a learnable padding token → residual blocks
x + GELU(Conv3×3(LayerNorm(x))) over each slide's own grid → LayerNorm → attention pooling over tissue
cells → linear head. Each block widens a cell's view by one cell on every side, so ``n_layers`` blocks see
a (2·n_layers + 1)² window: a CNN reads the grid's local arrangement, never the whole slide.
"""

from __future__ import annotations

import torch
from pydantic import Field, field_validator
from torch import nn

from .base import AttentionPool, MILConfig, MILModel, MILOutput, embed_cells, fill_grid, pooling_mask
from .batch import GridBatch
from .grid_layout import GridLayout, zero_padding
from .registry import register_model


class CNN2DConfig(MILConfig):
    """Options of the 2D CNN baseline.

    Attributes:
        d_model: width of the cell embedding and of every convolution.
        n_layers: number of residual 3×3 convolution blocks.
        kernel: convolution size (odd; centred on the cell).
        attn_dim: width of the attention pooling's hidden layer.
    """

    d_model: int = Field(default=128, gt=0)
    n_layers: int = Field(default=3, ge=0)
    kernel: int = Field(default=3, gt=0)
    attn_dim: int = Field(default=128, gt=0)

    @field_validator("kernel")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError("kernel must be odd (the convolution is centred on the cell)")
        return v


class ConvBlock(nn.Module):
    """x + GELU(Conv(LayerNorm(x))) on channels-last (B, H, W, d) cells; batch padding reads as zeros."""

    def __init__(self, d_model: int, kernel: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.conv = nn.Conv2d(d_model, d_model, kernel, padding=kernel // 2)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor, layout: GridLayout) -> torch.Tensor:
        h = zero_padding(self.norm(x).permute(0, 3, 1, 2), layout)
        return x + self.act(self.conv(h)).permute(0, 2, 3, 1)


@register_model("cnn2d", "2D CNN baseline: residual 3×3 convolutions over the slide's grid, attention pooling.")
class CNN2DMIL(MILModel):
    config_class = CNN2DConfig

    def __init__(self, config: CNN2DConfig) -> None:
        super().__init__(config)
        d = config.d_model
        self.embed = nn.Sequential(nn.Linear(config.cell_dim, d), nn.GELU(), nn.Dropout(config.dropout))
        self.pad_token = nn.Parameter(torch.zeros(d))
        self.blocks = nn.ModuleList(ConvBlock(d, config.kernel) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(d)
        self.pool = AttentionPool(d, config.attn_dim, gated=False)
        self.head = nn.Linear(d, config.n_out)

    def cells(self, batch: GridBatch) -> torch.Tensor:
        """(B, H, W, d) embedded cells: projected features at tissue cells, the padding token elsewhere."""
        return fill_grid(embed_cells(self.embed, batch.features), self.pad_token, batch)

    def forward_grid(self, batch: GridBatch, targets: torch.Tensor | None = None) -> MILOutput:
        mask = pooling_mask(batch)
        layout = GridLayout.from_batch(batch)
        x = self.cells(batch)
        for block in self.blocks:
            x = block(x, layout)
        pooled, weights = self.pool(self.norm(x), mask)
        return MILOutput(self.head(pooled), weights)
