"""MambaMIL (Yang et al., MICCAI 2024): Mamba over the tissue cells read as a 1D sequence in raster order.

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
from .grid_layout import TissueSequence
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
        attn_dim: width of the attention pooling's hidden layer.
        scan_backend: ``auto``, ``torch`` or ``cupy``.
    """

    d_model: int = Field(default=128, gt=0)
    n_layers: int = Field(default=2, ge=0)
    d_state: int = Field(default=16, gt=0)
    expand: int = Field(default=2, gt=0)
    conv_kernel: int = Field(default=4, gt=0)
    bidirectional: bool = False
    attn_dim: int = Field(default=128, gt=0)
    scan_backend: str = "auto"


class _PreNormResidual(nn.Module):
    def __init__(self, d_model: int, mixer: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.mixer = mixer

    def forward(self, x, layout):
        return x + self.mixer(self.norm(x), layout)


@register_model("mambamil", "MambaMIL: Mamba layers over the tissue cells in raster order (1D scan), "
                "attention pooling.")
class MambaMIL(MILModel):
    config_class = MambaMILConfig

    def __init__(self, config: MambaMILConfig) -> None:
        super().__init__(config)
        d = config.d_model
        self.embed = nn.Sequential(nn.Linear(config.in_dim, d), nn.ReLU(), nn.Dropout(config.dropout))
        corners = ("tl", "bl") if config.bidirectional else ("tl",)  # on an L × 1 grid, "bl" is the reverse
        self.blocks = nn.ModuleList(
            _PreNormResidual(d, Mamba2DBlock(d, d_state=config.d_state, expand=config.expand,
                                             dt_rank=math.ceil(d / 16), conv="causal1d",
                                             conv_kernel=config.conv_kernel, corners=corners,
                                             backend=config.scan_backend))
            for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(d)
        self.pool = AttentionPool(d, config.attn_dim, gated=False)
        self.head = nn.Linear(d, config.n_out)

    def forward(self, batch: GridBatch, targets: torch.Tensor | None = None) -> MILOutput:
        pooling_mask(batch)  # refuses slides without tissue
        seq = TissueSequence.from_batch(batch)
        layout = seq.layout()
        x = seq.gather(embed_cells(self.embed, batch.features)).unsqueeze(2)  # (B, L, 1, d)
        for block in self.blocks:
            x = block(x, layout)
        pooled, weights = self.pool(self.norm(x), layout.valid)
        attention = seq.scatter(weights.squeeze(2), tuple(batch.tissue.shape[1:]))
        return MILOutput(self.head(pooled), attention)
