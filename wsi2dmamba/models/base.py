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
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from ..errors import StageInputError
from .batch import GridBatch
from .input_axes import InputAxes

Task = Literal["classification", "survival"]


class MILConfig(BaseModel):
    """Options every MIL model has.

    Attributes:
        in_dim: length of the feature vector of one cell (the encoder's output dimension).
        n_classes: number of classes (classification); ignored for survival.
        task: ``classification`` (``n_classes`` logits) or ``survival`` (``n_bins`` hazard logits).
        n_bins: number of discrete survival time bins (one hazard each).
        dropout: dropout probability after the input projection.
        input_axes: when > 0, each cell's features are first projected on this many whitened principal
            axes, fitted on the training cells of the fold (:mod:`~wsi2dmamba.models.input_axes`); the
            model then reads ``input_axes`` numbers per cell. 0 = the features as they are.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    in_dim: int = Field(gt=0)
    n_classes: int | None = Field(default=None, gt=0)
    task: Task = "classification"
    n_bins: int = Field(default=4, gt=0)
    dropout: float = Field(default=0.25, ge=0.0, lt=1.0)
    input_axes: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _check_outputs(self) -> MILConfig:
        if self.task == "classification" and self.n_classes is None:
            raise ValueError("task 'classification' needs n_classes (the number of classes)")
        if self.input_axes > self.in_dim:
            raise ValueError(f"input_axes={self.input_axes} is more than the {self.in_dim} features per cell")
        return self

    @property
    def cell_dim(self) -> int:
        """Numbers per cell that the model's first layer reads: ``input_axes`` when set, else ``in_dim``."""
        return self.input_axes or self.in_dim

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
        slide_loss_weight: the weight of the slide loss beside ``aux_loss`` in training (CLAM: 0.7).
    """

    logits: torch.Tensor
    attention: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    slide_loss_weight: float = 1.0


class MILModel(nn.Module):
    """Base class of the MIL models: holds the configuration, the registry name and the input reduction.

    Subclasses implement :meth:`forward_grid`; :meth:`forward` applies the fitted input axes first when
    the configuration asks for them (``input_axes``), so every caller sees one model.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MILConfig]] = MILConfig

    def __init__(self, config: MILConfig) -> None:
        super().__init__()
        self.config = config
        self.input_axes = InputAxes(config.in_dim, config.input_axes) if config.input_axes else None

    def config_dict(self) -> dict[str, Any]:
        """JSON-able configuration, including the model's registry name under ``"model"``.

        Runtime fields (see :mod:`wsi2dmamba.identity`) are left out: a rebuilt model takes their defaults.
        """
        return {"model": self.name, **self.config.model_dump(mode="json")}

    def forward(self, batch: GridBatch, targets: torch.Tensor | None = None) -> MILOutput:
        """(B, H, W, in_dim) feature grids → :class:`MILOutput`; ``targets`` (B,) only for auxiliary losses."""
        if self.input_axes is not None:
            batch = self.input_axes.reduce(batch)
        return self.forward_grid(batch, targets)

    def forward_grid(self, batch: GridBatch, targets: torch.Tensor | None = None) -> MILOutput:  # pragma: no cover
        """The model proper, on (B, H, W, cell_dim) grids."""
        raise NotImplementedError

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


class _CellProjection(torch.autograd.Function):
    """``features @ weight.T + bias`` computed in row blocks, keeping only ``features`` itself for backward.

    A plain ``nn.Linear`` on a float16 grid needs the grid cast to the weight's dtype, and autocast keeps
    that cast copy for the weight gradient: a second copy of the whole grid. Here each block of rows is
    cast when it is used, in the forward and again in the backward, so the grid is held once, in the
    dtype it arrived in.
    """

    @staticmethod
    def forward(ctx, features, weight, bias, compute_dtype, rows):
        flat = features.reshape(-1, features.shape[-1])
        w = weight.to(compute_dtype)
        b = None if bias is None else bias.to(compute_dtype)
        out = torch.empty(flat.shape[0], weight.shape[0], device=flat.device, dtype=compute_dtype)
        for start in range(0, flat.shape[0], rows):
            out[start:start + rows] = F.linear(flat[start:start + rows].to(compute_dtype), w, b)
        ctx.save_for_backward(features, weight)
        ctx.compute_dtype, ctx.rows, ctx.has_bias = compute_dtype, rows, bias is not None
        return out.view(*features.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        features, weight = ctx.saved_tensors
        flat = features.reshape(-1, features.shape[-1])
        g = grad.reshape(-1, grad.shape[-1]).to(ctx.compute_dtype)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_x = torch.empty_like(features).view_as(flat) if need_x else None
        w = weight.to(ctx.compute_dtype)
        for start in range(0, flat.shape[0], ctx.rows):
            g_rows = g[start:start + ctx.rows]
            if need_w:
                grad_w += (g_rows.t() @ flat[start:start + ctx.rows].to(ctx.compute_dtype)).float()
            if need_x:
                grad_x[start:start + ctx.rows] = (g_rows @ w).to(features.dtype)
        grad_b = g.float().sum(0).to(weight.dtype) if need_b and ctx.has_bias else None
        return (None if grad_x is None else grad_x.view_as(features),
                None if grad_w is None else grad_w.to(weight.dtype), grad_b, None, None)


def project_cells(linear: nn.Linear, features: torch.Tensor, rows: int = 16384) -> torch.Tensor:
    """``linear`` applied to (..., D) cell features of any float dtype, without copying the grid.

    The result is in the autocast dtype inside an autocast region, else in the weight's dtype; a float16
    or bfloat16 grid is cast block by block (``rows`` cells at a time), never as a whole.
    """
    if torch.is_autocast_enabled(features.device.type):
        compute = torch.get_autocast_dtype(features.device.type)
    else:
        compute = linear.weight.dtype
    if features.dtype == compute and not torch.is_autocast_enabled(features.device.type):
        return linear(features)  # nothing to cast: the plain op keeps no copy either
    with torch.autocast(features.device.type, enabled=False):
        return _CellProjection.apply(features, linear.weight, linear.bias, compute, rows)


def embed_cells(embed: nn.Sequential, features: torch.Tensor) -> torch.Tensor:
    """An ``nn.Sequential`` whose first layer is an ``nn.Linear``, applied with :func:`project_cells`."""
    x = project_cells(embed[0], features)
    for layer in list(embed)[1:]:
        x = layer(x)
    return x


def fill_grid(x: torch.Tensor, pad_token: torch.Tensor, batch: GridBatch) -> torch.Tensor:
    """(B, H, W, d) embedded cells with ``pad_token`` (d,) at non-tissue cells and zeros at batch padding."""
    x = torch.where(batch.tissue.unsqueeze(-1), x, pad_token.to(x.dtype))
    return torch.where(batch.valid.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))


def pooling_mask(batch: GridBatch, include_padding: bool = False) -> torch.Tensor:
    """(B, H, W) bool: the cells a slide pools over (tissue cells, or all cells of its own grid).

    Raises :class:`~wsi2dmamba.errors.StageInputError` naming the slide when a slide has none.
    """
    mask = batch.valid if include_padding else batch.tissue & batch.valid
    if batch.tissue_cells is not None:  # counted on the host: no wait for the GPU
        pooled = [h * w for h, w in batch.sizes.tolist()] if include_padding else batch.tissue_cells
        ids = [sid for sid, n in zip(batch.slide_ids, pooled) if n == 0]
    else:
        empty = ~mask.flatten(1).any(dim=1)
        ids = [batch.slide_ids[i] for i in torch.nonzero(empty).flatten().tolist()] if bool(empty.any()) else []
    if ids:
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
