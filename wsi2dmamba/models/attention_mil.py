"""Baselines that pool the cells without looking at their neighbours: mean pooling and ABMIL."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from .base import AttentionPool, MILConfig, MILModel, MILOutput, embed_cells, masked_mean, pooling_mask
from .batch import GridBatch
from .registry import register_model


class MeanPoolConfig(MILConfig):
    """Mean pooling: per-cell MLP, mean over tissue cells, linear head.

    Attributes:
        hidden: width of the per-cell embedding.
    """

    hidden: int = Field(default=512, gt=0)


@register_model("meanpool", "Mean of per-cell embeddings (Linear+ReLU) over tissue cells, linear head.")
class MeanPoolMIL(MILModel):
    config_class = MeanPoolConfig

    def __init__(self, config: MeanPoolConfig) -> None:
        super().__init__(config)
        self.embed = nn.Sequential(nn.Linear(config.cell_dim, config.hidden), nn.ReLU(), nn.Dropout(config.dropout))
        self.head = nn.Linear(config.hidden, config.n_out)

    def forward_grid(self, batch: GridBatch, targets: torch.Tensor | None = None) -> MILOutput:
        mask = pooling_mask(batch)
        return MILOutput(self.head(masked_mean(embed_cells(self.embed, batch.features), mask)))


class ABMILConfig(MILConfig):
    """Gated attention MIL (Ilse et al. 2018).

    Attributes:
        hidden: width of the per-cell embedding (Linear + ReLU).
        attn_dim: width of the attention branches.
        gated: use the gated (tanh × sigmoid) attention; False gives the plain tanh attention.
    """

    hidden: int = Field(default=512, gt=0)
    attn_dim: int = Field(default=256, gt=0)
    gated: bool = True


@register_model("abmil", "Gated attention MIL (Ilse et al. 2018): per-cell MLP, attention pooling, linear head.")
class ABMIL(MILModel):
    config_class = ABMILConfig

    def __init__(self, config: ABMILConfig) -> None:
        super().__init__(config)
        self.embed = nn.Sequential(nn.Linear(config.cell_dim, config.hidden), nn.ReLU(), nn.Dropout(config.dropout))
        self.pool = AttentionPool(config.hidden, config.attn_dim, gated=config.gated)
        self.head = nn.Linear(config.hidden, config.n_out)

    def forward_grid(self, batch: GridBatch, targets: torch.Tensor | None = None) -> MILOutput:
        mask = pooling_mask(batch)
        pooled, weights = self.pool(embed_cells(self.embed, batch.features), mask)
        return MILOutput(self.head(pooled), weights)
