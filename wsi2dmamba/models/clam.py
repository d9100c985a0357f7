"""CLAM-SB (Lu et al., Nature BME 2021): gated attention with a single branch plus instance clustering.

Written from the paper's description. During training with targets, the ``k_sample`` most and least
attended tissue cells of each slide are pseudo-labelled positive and negative for the slide's class and
an instance classifier per class learns them; for the other classes the most attended cells are
negatives (the "subtyping" setting). The instance loss is cross-entropy here (CLAM's default is a
smooth top-1 SVM) and is returned, times ``inst_weight``, as ``MILOutput.aux_loss``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from .base import AttentionPool, MILConfig, MILModel, MILOutput, embed_cells, pooling_mask
from .batch import GridBatch
from .registry import register_model


class CLAMConfig(MILConfig):
    """CLAM-SB options.

    Attributes:
        hidden: width of the cell embedding (512 in CLAM's "small" size).
        attn_dim: width of the gated attention branches.
        k_sample: cells per slide taken as positive (and as negative) instances.
        inst_weight: weight of the instance loss in ``aux_loss`` (CLAM: 0.3).
        bag_weight: weight of the slide loss beside it in training (CLAM: 0.7).
        subtyping: also use the top cells as negatives for the other classes.
    """

    hidden: int = Field(default=512, gt=0)
    attn_dim: int = Field(default=256, gt=0)
    k_sample: int = Field(default=8, gt=0)
    inst_weight: float = Field(default=0.3, ge=0.0)
    bag_weight: float = Field(default=0.7, gt=0.0)
    subtyping: bool = True


@register_model("clam-sb", "CLAM-SB: gated attention, one branch, with top-k instance clustering loss "
                "in training.")
class CLAMSB(MILModel):
    config_class = CLAMConfig

    def __init__(self, config: CLAMConfig) -> None:
        super().__init__(config)
        self.embed = nn.Sequential(nn.Linear(config.cell_dim, config.hidden), nn.ReLU(), nn.Dropout(config.dropout))
        self.pool = AttentionPool(config.hidden, config.attn_dim, gated=True, dropout=config.dropout)
        self.head = nn.Linear(config.hidden, config.n_out)
        n_inst = config.n_out if config.task == "classification" else 0
        self.instance_heads = nn.ModuleList(nn.Linear(config.hidden, 2) for _ in range(n_inst))

    def forward_grid(self, batch: GridBatch, targets: torch.Tensor | None = None) -> MILOutput:
        mask = pooling_mask(batch)
        h = embed_cells(self.embed, batch.features)
        pooled, weights = self.pool(h, mask)
        if targets is not None and self.training and len(self.instance_heads):
            aux = self.config.inst_weight * self.instance_loss(h, weights, mask, targets)
            return MILOutput(self.head(pooled), weights, aux, slide_loss_weight=self.config.bag_weight)
        return MILOutput(self.head(pooled), weights)

    def instance_loss(self, h: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor,
                      targets: torch.Tensor) -> torch.Tensor:
        """Mean instance cross-entropy over the batch's slides; ``targets`` are (B,) class indices."""
        losses = []
        for b in range(h.shape[0]):
            cells = h[b][mask[b]]  # (n, hidden), raster order
            att = weights[b][mask[b]]
            k = min(self.config.k_sample, cells.shape[0] // 2)
            if k == 0:
                continue
            top, bottom = cells[att.topk(k).indices], cells[(-att).topk(k).indices]
            label = int(targets[b])
            for c, clf in enumerate(self.instance_heads):
                if c == label:
                    x = torch.cat([top, bottom])
                    y = torch.cat([torch.ones(k), torch.zeros(k)]).long().to(x.device)
                elif self.config.subtyping:
                    x, y = top, torch.zeros(k, dtype=torch.long, device=top.device)
                else:
                    continue
                losses.append(F.cross_entropy(clf(x), y))
        if not losses:
            return h.sum() * 0.0
        return torch.stack(losses).mean()
