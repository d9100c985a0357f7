"""What every MIL model shares: its configuration, its output, the slide-level head and masked pooling.

A model reads a :class:`~wsi2dmamba.models.batch.GridBatch` (features on each slide's own grid, padded
at the bottom and right to a common shape) and returns a :class:`MILOutput`. Every model is built from a
typed configuration (:class:`MILConfig` or a subclass) that serialises to JSON, so a checkpoint can be
rebuilt from ``model.config_dict()`` with :func:`~wsi2dmamba.models.create_from_config`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from ..errors import StageInputError
from .batch import GridBatch

Task = Literal["classification", "survival"]


class MILConfig(BaseModel):
    """Options every MIL model has.

    Attributes:
        in_dim: length of the feature vector of one cell (the encoder's output dimension).
        n_classes: number of classes (classification); ignored for survival.
        task: ``classification`` (``n_classes`` logits) or ``survival`` (``n_bins`` hazard logits).
        n_bins: number of discrete survival time bins (one hazard each).
        dropout: dropout probability after the input projection.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    in_dim: int = Field(gt=0)
    n_classes: int | None = Field(default=None, gt=0)
    task: Task = "classification"
    n_bins: int = Field(default=4, gt=0)
    dropout: float = Field(default=0.25, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _check_outputs(self) -> MILConfig:
        if self.task == "classification" and self.n_classes is None:
            raise ValueError("task 'classification' needs n_classes (the number of classes)")
        return self

    @property
    def n_out(self) -> int:
        """Number of logits: classes, or survival hazards (one per time bin)."""
        return self.n_bins if self.task == "survival" else int(self.n_classes)  # type: ignore[arg-type]


@dataclass
class MILOutput:
    """What a MIL model returns for a batch.

    Attributes:
        logits: (B, n_out). Class logits, or for survival the logits of the ``n_bins`` discrete hazards
            (hazard = sigmoid(logit)).
        attention: (B, H, W) attention weights on the batch's grid cells (each slide's weights sum to 1
            over the cells it pools), or None for models without attention.
        aux_loss: a scalar auxiliary training loss, already weighted, to add to the slide loss (CLAM's
            instance loss when targets were given), else None.
    """

    logits: torch.Tensor
    attention: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


class MILModel(nn.Module):
    """Base class of the MIL models: holds the configuration and the registry name."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MILConfig]] = MILConfig

    def __init__(self, config: MILConfig) -> None:
        super().__init__()
        self.config = config

    def config_dict(self) -> dict[str, Any]:
        """JSON-able configuration, including the model's registry name under ``"model"``."""
        return {"model": self.name, **self.config.model_dump(mode="json")}

    def forward(self, batch: GridBatch, targets: torch.Tensor | None = None) -> MILOutput:  # pragma: no cover
        raise NotImplementedError

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def pooling_mask(batch: GridBatch, include_padding: bool = False) -> torch.Tensor:
    """(B, H, W) bool: the cells a slide pools over (tissue cells, or all cells of its own grid).

    Raises :class:`~wsi2dmamba.errors.StageInputError` naming the slide when a slide has none.
    """
    mask = batch.valid if include_padding else batch.tissue & batch.valid
    empty = ~mask.flatten(1).any(dim=1)
    if bool(empty.any()):
        ids = [batch.slide_ids[i] for i in torch.nonzero(empty).flatten().tolist()]
        raise StageInputError(f"slide(s) {', '.join(ids)} have no tissue cell in their feature grid; "
                              "re-run tiling with a lower tissue threshold or drop them from the cohort")
    return mask


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax of (B, H, W) scores over the cells where ``mask`` is True; exactly 0 elsewhere."""
    flat = scores.flatten(1).float().masked_fill(~mask.flatten(1), float("-inf"))
    return torch.softmax(flat, dim=1).view_as(scores).to(scores.dtype)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B, H, W, D) cell vectors over the cells where ``mask`` is True → (B, D)."""
    w = mask.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(dim=(1, 2)) / w.sum(dim=(1, 2)).clamp_min(1.0)


def pool_with(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Weighted sum of (B, H, W, D) cell vectors with (B, H, W) weights → (B, D)."""
    return torch.einsum("bhw,bhwd->bd", weights.to(x.dtype), x)


class AttentionPool(nn.Module):
    """Attention pooling (Ilse et al. 2018): a score per cell, softmax over the pooled cells, weighted sum.

    ``gated=False`` gives Linear → tanh → Linear; ``gated=True`` multiplies the tanh branch by a sigmoid
    branch before the last Linear.
    """

    def __init__(self, dim: int, hidden: int, gated: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.gated = gated
        self.attn_a = nn.Linear(dim, hidden)
        self.attn_b = nn.Linear(dim, hidden) if gated else None
        self.drop = nn.Dropout(dropout)
        self.score = nn.Linear(hidden, 1)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) → (...) raw attention scores."""
        a = torch.tanh(self.attn_a(x))
        if self.attn_b is not None:
            a = a * torch.sigmoid(self.attn_b(x))
        return self.score(self.drop(a)).squeeze(-1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, W, D) cells and (B, H, W) mask → pooled (B, D) and weights (B, H, W)."""
        weights = masked_softmax(self.scores(x), mask)
        return pool_with(weights, x), weights


def survival_risk(logits: torch.Tensor) -> torch.Tensor:
    """(B, n_bins) hazard logits → (B,) risk score −Σ_k S_k, with S_k = Π_{j≤k} (1 − sigmoid(logit_j))."""
    hazards = torch.sigmoid(logits.float())
    return -torch.cumprod(1.0 - hazards, dim=1).sum(dim=1)
