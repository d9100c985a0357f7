"""2DMambaMIL (Zhang et al., CVPR 2025) and the same MIL frame with the Mamba2D mixer.

Frame: cell features → Linear + GELU + Dropout → non-tissue cells replaced by a learnable padding token →
residual 2D state-space blocks over the slide's own grid → LayerNorm → attention pooling → linear head.

The ``paper`` preset of ``2dmambamil`` is the published model: 128-d, one block, d_state 16, expand 2, a
causal depthwise Conv1d (k = 4) along the raster order, xavier-normal init of every Linear (which also
zeroes the step bias), padding cells inside the softmax. The default fixes what the published code gets
wrong for slides (see ``docs/models.md``): a 2D depthwise 3×3 conv, Mamba's step initialisation and
attention over tissue cells only.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from .base import AttentionPool, MILConfig, MILModel, MILOutput, embed_cells, fill_grid, pooling_mask
from .batch import GridBatch
from .grid_layout import CORNERS, GridLayout
from .registry import Preset, register_model
from .ssm_blocks import M2DMixer, Mamba2DBlock, RMSNorm, scale_state_projections


class GridSSMConfig(MILConfig):
    """Options of the 2D state-space MIL models.

    Attributes:
        d_model: width of the cell embedding and the residual stream.
        n_layers: number of residual blocks.
        d_state: SSM state size N.
        expand: inner width E = expand · d_model of each block.
        dt_rank: rank of the step projection (None: ceil(d_model / 16)).
        attn_dim: width of the attention pooling's hidden layer.
        pool_padding: pool over every cell of the slide's grid (as published) instead of tissue cells only.
        pad_token_init: ``uniform`` (U[0, 1), as published) or ``zeros``.
        input_norm: LayerNorm over each cell's feature vector before the input projection.
        dt_range: (min, max) of the scan step's initialisation (log-uniform, Mamba's scheme); the
            ``paper`` init of 2DMambaMIL ignores it (it zeroes the step bias).
        state_init_gain: factor on the initial weights that make the scan's B and C from each cell; the
            scan's initial reach from one cell to another grows about as its square.
        checkpoint_blocks: in training, recompute each block's activations in the backward pass instead of
            keeping them (less memory, more time): ``on``, ``off``, or ``auto`` (on when the batch has more
            than 65,536 cells, e.g. one slide of 256 × 256 cells).
        channel_groups: when blocks are recomputed, run each block as this many groups of its inner
            channels, one group's activations in memory at a time (None: at least 2 groups, and enough that
            one group's scan input is at most 80 MiB in float32: 2 for both models at 391 × 391, 5 for
            2dmambamil at 600 × 600).
        scan_backend: ``auto``, ``torch`` or ``cupy`` (see :mod:`wsi2dmamba.ops`).
    """

    d_model: int = Field(default=128, gt=0)
    n_layers: int = Field(default=1, ge=0)
    d_state: int = Field(default=16, gt=0)
    expand: int = Field(default=2, gt=0)
    dt_rank: int | None = Field(default=None, gt=0)
    attn_dim: int = Field(default=128, gt=0)
    pool_padding: bool = False
    pad_token_init: Literal["uniform", "zeros"] = "uniform"
    input_norm: bool = False
    dt_range: tuple[float, float] = (0.001, 0.1)
    state_init_gain: float = Field(default=1.0, gt=0)
    # Runtime fields (not hashed, not in config_dict): they change memory and speed, not the model.
    checkpoint_blocks: Literal["auto", "on", "off"] = Field(default="auto", exclude=True)
    channel_groups: int | None = Field(default=None, gt=0, exclude=True)
    scan_backend: Literal["auto", "torch", "cupy"] = Field(default="auto", exclude=True)

    @field_validator("corners", check_fields=False)
    @classmethod
    def _check_corners(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [c for c in v if c not in CORNERS]
        if bad or not v:
            raise ValueError(f"corners must be a non-empty list of {', '.join(CORNERS)}; got {list(v)}")
        return tuple(v)

    @field_validator("dt_range")
    @classmethod
    def _check_dt_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"dt_range must be (min, max) with 0 < min <= max; got {list(v)}")
        return tuple(v)


LARGE_BATCH_CELLS = 65_536  # above this many cells, "auto" recomputes the blocks in training
GROUP_BYTES = 80 * 2**20  # float32 bytes of one (B, channels, H, W) activation of a channel group


def lean_groups(checkpoint_blocks: str, channel_groups: int | None, inner: int, shape: tuple[int, ...],
                training: bool) -> int | None:
    """Channel groups of the recomputed blocks, or None to run them plainly.

    Args:
        checkpoint_blocks: ``on``, ``off`` or ``auto`` (see :class:`GridSSMConfig`).
        channel_groups: the configured number of groups, or None to choose one.
        inner: the widest activation of a block, in channels.
        shape: (B, H, W) of the batch's grid.
        training: whether gradients will be taken.
    """
    cells = math.prod(shape)
    if not training or checkpoint_blocks == "off" or (checkpoint_blocks == "auto" and cells <= LARGE_BATCH_CELLS):
        return None
    if channel_groups is not None:
        return channel_groups
    # At least two groups: with one, the block's own backward holds all its activations at once and the
    # peak stays far above that of two groups (m2dmil at 391²: 2,372 against 1,846 MiB).
    return max(1, min(inner, max(2, math.ceil(4 * cells * inner / GROUP_BYTES))))


class GridSSMMIL(MILModel):
    """The shared frame; subclasses build ``self.blocks`` (each called as ``block(x, layout)``)."""

    config_class = GridSSMConfig

    def __init__(self, config: GridSSMConfig) -> None:
        super().__init__(config)
        d = config.d_model
        self.in_norm = nn.LayerNorm(config.cell_dim) if config.input_norm else None
        self.embed = nn.Sequential(nn.Linear(config.cell_dim, d), nn.GELU(), nn.Dropout(config.dropout))
        init = torch.rand(d) if config.pad_token_init == "uniform" else torch.zeros(d)
        self.pad_token = nn.Parameter(init)
        self.blocks = nn.ModuleList()
        self.norm = nn.LayerNorm(d)
        self.pool = AttentionPool(d, config.attn_dim, gated=False)
        self.head = nn.Linear(d, config.n_out)

    def cells(self, batch: GridBatch) -> torch.Tensor:
        """(B, H, W, d) embedded cells: projected features at tissue cells, the padding token elsewhere."""
        feats = batch.features if self.in_norm is None else self.in_norm(batch.features)
        return fill_grid(embed_cells(self.embed, feats), self.pad_token, batch)

    def forward_grid(self, batch: GridBatch, targets: torch.Tensor | None = None) -> MILOutput:
        mask = pooling_mask(batch, include_padding=self.config.pool_padding)
        layout = GridLayout.from_batch(batch)
        x = self.cells(batch)
        groups = lean_groups(self.config.checkpoint_blocks, self.config.channel_groups, self.block_width(),
                             tuple(batch.tissue.shape), self.training and torch.is_grad_enabled())
        for block in self.blocks:
            x = block(x, layout) if groups is None else block.forward_lean(x, layout, groups)
        pooled, weights = self.pool(self.norm(x), mask)
        return MILOutput(self.head(pooled), weights)

    def block_width(self) -> int:
        """Channels of a block's scan, whose activations and row checkpoints set the block's memory."""
        return self.config.expand * self.config.d_model


class Mamba2DResidual(nn.Module):
    """x + Mamba2DBlock(RMSNorm(x))."""

    def __init__(self, d_model: int, **block_args) -> None:
        super().__init__()
        self.norm = RMSNorm(d_model)
        self.mixer = Mamba2DBlock(d_model, **block_args)

    def forward(self, x: torch.Tensor, layout: GridLayout) -> torch.Tensor:
        return x + self.mixer(self.norm(x), layout)

    def forward_lean(self, x: torch.Tensor, layout: GridLayout, groups: int) -> torch.Tensor:
        """:meth:`forward` with the mixer's activations recomputed in the backward pass, by channel groups."""
        return x + self.mixer.forward_lean(self.norm(x), layout, groups)


class Mamba2DMILConfig(GridSSMConfig):
    """2DMambaMIL options (see :class:`GridSSMConfig`), plus:

    Attributes:
        conv: local conv before the scan: ``dw2d`` (depthwise 2D), ``causal1d`` (causal depthwise Conv1d
            along the raster order, as published) or ``none``.
        conv_kernel: kernel size of that conv (odd for ``dw2d``).
        corners: corners the 2D scan starts from (``tl``, ``tr``, ``bl``, ``br``), each with its own
            scan parameters; outputs are summed.
        scan: the token mixer: ``2d`` (the 2DMamba scan), ``raster1d`` (a 1D selective scan along each
            slide's raster order over the same grid) or ``none`` (no scan: local conv and gate only).
        init: ``mamba`` (Mamba's step initialisation) or ``paper`` (xavier-normal on every Linear, zero
            biases, as the published code does).
    """

    conv: Literal["dw2d", "causal1d", "none"] = "dw2d"
    conv_kernel: int = Field(default=3, gt=0)
    corners: tuple[str, ...] = ("tl",)
    init: Literal["mamba", "paper"] = "mamba"
    scan: Literal["2d", "raster1d", "none"] = "2d"

    @model_validator(mode="after")
    def _mixes_cells(self) -> "Mamba2DMILConfig":
        if self.scan == "none" and self.conv == "none" and self.n_layers > 0:
            raise ValueError("scan='none' with conv='none' leaves the blocks nothing that mixes cells")
        return self

    @field_validator("conv_kernel")
    @classmethod
    def _odd_2d(cls, v: int, info) -> int:
        if info.data.get("conv") == "dw2d" and v % 2 == 0:
            raise ValueError("a dw2d conv needs an odd kernel size (it is centred on the cell)")
        return v


PAPER_2DMAMBAMIL = {
    "d_model": 128, "n_layers": 1, "d_state": 16, "expand": 2, "dt_rank": 8, "attn_dim": 128, "dropout": 0.25,
    "conv": "causal1d", "conv_kernel": 4, "corners": ("tl",), "init": "paper", "pool_padding": True,
    "pad_token_init": "uniform", "input_norm": False,
}


# The ablations change one option each, so every other part of the model and its training is the same.
PRESETS_2DMAMBAMIL = {
    "paper": Preset(PAPER_2DMAMBAMIL, "the published model: causal 1D conv along the raster order, xavier "
                                      "init, attention over padding cells too"),
    "noscan": Preset({"scan": "none"}, "ablation: no scan; the 3×3 depthwise conv and the gate alone mix cells"),
    "noconv": Preset({"conv": "none"}, "ablation: no local conv; the 2D scan alone mixes cells"),
    "4corners": Preset({"corners": ("tl", "tr", "bl", "br")},
                       "the 2D scan from all four corners (own parameters each), outputs summed"),
    "raster1d": Preset({"scan": "raster1d"}, "ablation: a 1D selective scan along the raster order of the "
                                             "same grid instead of the 2D scan"),
}

PRESETS_M2DMIL = {
    "noscan": Preset({"ssm_path": False}, "ablation: no M2D scan; the local depthwise 3×3 path alone mixes cells"),
    "noconv": Preset({"local_path": False}, "ablation: no local path; the M2D scan alone mixes cells"),
    "2blocks": Preset({"n_layers": 2}, "two blocks, scanning from the top-left and then the bottom-right corner"),
}


@register_model("2dmambamil", "2DMambaMIL: residual 2D selective-scan (2DMamba) blocks on the slide's grid, "
                "attention pooling.", presets=PRESETS_2DMAMBAMIL)
class Mamba2DMIL(GridSSMMIL):
    config_class = Mamba2DMILConfig

    def __init__(self, config: Mamba2DMILConfig) -> None:
        super().__init__(config)
        self.blocks = nn.ModuleList(
            Mamba2DResidual(config.d_model, d_state=config.d_state, expand=config.expand, dt_rank=config.dt_rank,
                            conv=config.conv, conv_kernel=config.conv_kernel, corners=config.corners,
                            init=config.init, backend=config.scan_backend, scan=config.scan,
                            dt_range=config.dt_range)
            for _ in range(config.n_layers))
        if config.init == "paper":
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_normal_(m.weight)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        scale_state_projections(self.blocks, config.state_init_gain)


class M2DResidual(nn.Module):
    """x + γ · M2DMixer(LayerNorm(x)) with a learnable per-channel γ (MetaFormer residual scale)."""

    def __init__(self, d_model: int, **mixer_args) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.mixer = M2DMixer(d_model, **mixer_args)
        self.scale = nn.Parameter(torch.ones(d_model))

    def forward(self, x: torch.Tensor, layout: GridLayout) -> torch.Tensor:
        return x + self.scale * self.mixer(self.norm(x), layout)

    def forward_lean(self, x: torch.Tensor, layout: GridLayout, groups: int) -> torch.Tensor:
        """:meth:`forward` with the mixer's activations recomputed in the backward pass, by channel groups."""
        return x + self.scale * self.mixer.forward_lean(self.norm(x), layout, groups)


class M2DMILConfig(GridSSMConfig):
    """Mamba2D-MIL options (see :class:`GridSSMConfig`), plus:

    Attributes:
        corners: scan start of each block in turn (Mamba2D alternates ``tl`` and ``br``).
        local_path: add the depthwise-separable local path to the SSM path.
        ssm_path: the M2D-SSM path (off: the local path alone, an ablation).
    """

    expand: int = Field(default=1, gt=0)
    corners: tuple[str, ...] = ("tl", "br")
    local_path: bool = True
    ssm_path: bool = True

    @model_validator(mode="after")
    def _mixes_cells(self) -> "M2DMILConfig":
        if not (self.ssm_path or self.local_path):
            raise ValueError("ssm_path and local_path cannot both be off")
        return self


@register_model("m2dmil", "Mamba2D-MIL: the same frame with the Mamba2D mixer (M2D scan, two parameter "
                "sets, local path).", presets=PRESETS_M2DMIL)
class M2DMIL(GridSSMMIL):
    config_class = M2DMILConfig

    def __init__(self, config: M2DMILConfig) -> None:
        super().__init__(config)
        self.blocks = nn.ModuleList(
            M2DResidual(config.d_model, d_state=config.d_state, expand=config.expand, dt_rank=config.dt_rank,
                        corner=config.corners[i % len(config.corners)], local_path=config.local_path,
                        backend=config.scan_backend, ssm_path=config.ssm_path,
                        dt_range=config.dt_range)
            for i in range(config.n_layers))
        scale_state_projections(self.blocks, config.state_init_gain)
