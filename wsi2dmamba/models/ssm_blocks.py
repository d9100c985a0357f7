"""State-space token mixers on a grid of cells: the 2DMamba block and the Mamba2D (M2D) mixer.

Both read and write channels-last (B, H, W, d) cell vectors and call the scans of :mod:`wsi2dmamba.ops`,
which take channels-first (B, E, H, W) activations. Every scan starts at the top-left corner; a mixer
that scans from another corner mirrors each slide's own grid first (:func:`flip_to_corner`), so batch
padding, which sits at the bottom and right, never reaches a slide's cells.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import ops
from .grid_layout import GridLayout, flip_to_corner, raster_conv1d, to_raster_column, zero_padding

ConvKind = Literal["dw2d", "causal1d", "none"]
ScanKind = Literal["2d", "raster1d", "none"]
Init = Literal["mamba", "paper"]


ALL = slice(None)  # every channel


def _channels_bias(bias: torch.Tensor) -> torch.Tensor:
    return bias[None, :, None, None]


def _to_channels_first(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


def _to_channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


def channel_matmul(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Linear map (no bias) of the channels of (B, C, H, W) ``x`` → (B, O, H, W), channels-first and
    contiguous, without copying ``x`` (the scans want channels-first inputs)."""
    b, _, h, w = x.shape
    return torch.matmul(weight, x.reshape(b, x.shape[1], h * w)).view(b, -1, h, w)


def cells_to_channels(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Linear map (no bias) of channels-last (B, H, W, d) cells → channels-first (B, O, H, W)."""
    b, h, w, d = x.shape
    return torch.matmul(weight, x.reshape(b, h * w, d).transpose(1, 2)).view(b, -1, h, w)


def channels_to_cells(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Linear map (no bias) of channels-first (B, C, H, W) ``x`` → channels-last (B, H, W, O) cells.

    The product is taken channels-first (the result is a channels-last view of it), so the gradient of
    ``x`` comes out channels-first and contiguous, as the scans' backward wants it, without a copy.
    """
    b, c, h, w = x.shape
    return torch.matmul(weight, x.reshape(b, c, h * w)).view(b, -1, h, w).permute(0, 2, 3, 1)


class RMSNorm(nn.Module):
    """Root-mean-square normalisation over the last dimension with a learnable gain (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(F, "rms_norm"):  # fused, keeps only the input and 1/rms for backward (torch >= 2.4)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def init_dt_bias(n: int, dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4) -> torch.Tensor:
    """Mamba's step initialisation: softplus(bias) is log-uniform in [dt_min, dt_max] (at least ``floor``)."""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp_min(floor)
    return dt + torch.log(-torch.expm1(-dt))  # inverse of softplus


def s4d_real_a_log(channels: int, d_state: int) -> torch.Tensor:
    """log(1..N) for every channel: A = −[1, 2, …, N] (S4D-real initialisation)."""
    return torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(channels, 1)


def channel_parts(channels: int, parts: int) -> list[slice]:
    """Split ``channels`` into ``parts`` contiguous slices of nearly equal size."""
    parts = max(1, min(parts, channels))
    edges = [round(i * channels / parts) for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]


def checkpointed_sum(part: Callable[..., torch.Tensor], slices: list[slice], *args,
                     keep_last: bool = False) -> torch.Tensor:
    """Σ over ``slices`` of ``part(sl, *args)``, each term recomputed in the backward pass.

    Only ``args`` are kept for the backward; the activations of one term at a time exist while it
    is recomputed, so the peak memory of a block whose channels are summed falls by ``len(slices)``.
    With ``keep_last`` the last term keeps its activations instead: its backward runs first, before
    any other term is recomputed, so the peak is the same and one recomputation is saved. The terms
    hold no randomness, so the random state is not saved and restored.
    """
    total = None
    for i, sl in enumerate(slices):
        if keep_last and i == len(slices) - 1:
            term = part(sl, *args)
        else:
            term = checkpoint(part, sl, *args, use_reentrant=False, preserve_rng_state=False)
        total = term if total is None else total + term
    return total


class ScanParameters(nn.Module):
    """One set of selective-scan parameters: x_proj to (dt_low, B, C), dt_proj, A_log and D."""

    def __init__(self, channels: int, d_state: int, dt_rank: int, init: Init,
                 dt_range: tuple[float, float] = (1e-3, 0.1)) -> None:
        super().__init__()
        self.d_state, self.dt_rank = d_state, dt_rank
        self.x_proj = nn.Linear(channels, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, channels, bias=True)
        self.A_log = nn.Parameter(s4d_real_a_log(channels, d_state))
        self.D = nn.Parameter(torch.ones(channels))
        if init == "mamba":
            with torch.no_grad():
                nn.init.uniform_(self.dt_proj.weight, -dt_rank**-0.5, dt_rank**-0.5)
                self.dt_proj.bias.copy_(init_dt_bias(channels, *dt_range))

    def project(self, u: torch.Tensor, sl: slice = ALL) -> torch.Tensor:
        """(B, R + 2N, H, W) x_proj of (B, E, H, W) ``u``, or its share from the channels ``sl`` of u."""
        return channel_matmul(self.x_proj.weight[:, sl], u)

    @torch.no_grad()
    def scale_state_init(self, gain: float) -> None:
        """Multiply the x_proj rows of B and C (after the R step rows) by ``gain``, in place."""
        self.x_proj.weight[self.dt_rank:] *= gain

    def scan(self, u: torch.Tensor, z: torch.Tensor | None, proj: torch.Tensor, backend: str,
             sl: slice = ALL) -> torch.Tensor:
        """2DMamba scan of (B, E_sl, H, W) ``u`` (the channels ``sl``) from the top-left corner, gated by
        ``z`` when given; ``proj`` is :meth:`project` of the whole u, mirrored as u is."""
        dt_low, b, c = proj.split([self.dt_rank, self.d_state, self.d_state], dim=1)
        dt = channel_matmul(self.dt_proj.weight[sl], dt_low)  # the bias is added inside the scan, before softplus
        return ops.selective_scan_2d(u, dt, -torch.exp(self.A_log[sl].float()), b, c, self.D[sl].float(), z,
                                     self.dt_proj.bias[sl].float(), backend=backend)


def scale_state_projections(module: nn.Module, gain: float) -> None:
    """Multiply, in place, the rows of every scan's x_proj that make B and C (the state's input and
    read-out) by ``gain``; the step rows are left as they are.

    A cell's contribution to another's output through the scan is proportional to the product B · C, so a
    gain g multiplies the initial reach of the scan by about g² (``benchmarks/scan_reach.py``).
    """
    if gain == 1.0:
        return
    for m in module.modules():
        if isinstance(m, (ScanParameters, M2DMixer)):
            m.scale_state_init(gain)


class Mamba2DBlock(nn.Module):
    """The Mamba block of 2DMambaMIL with its 1D scan replaced by the 2DMamba scan.

    in_proj to x and z → local conv on x → SiLU → 2D selective scan(s) gated by silu(z) → out_proj.
    The local conv is a depthwise 2D ``conv_kernel`` × ``conv_kernel`` conv (``dw2d``), or, as published,
    a causal depthwise conv of ``conv_kernel`` taps along the raster order (``causal1d``). Each corner in
    ``corners`` has its own scan parameters; their gated outputs are summed.

    ``scan`` selects the token mixer for the ablations: ``2d`` (the 2DMamba scan), ``raster1d`` (the 1D
    selective scan along each slide's raster order, row after row, over the same grid) or ``none``
    (no scan: the gated, skip-scaled scan input D · u · silu(z), so only the local conv mixes cells).

    Everything but x_proj acts on each inner channel on its own, so :meth:`forward_lean` computes the
    block as a sum over groups of channels, each recomputed in the backward pass (see
    :func:`checkpointed_sum`): same output, a fraction of the activation memory.
    """

    def __init__(self, d_model: int, d_state: int = 16, expand: int = 2, dt_rank: int | None = None,
                 conv: ConvKind = "dw2d", conv_kernel: int = 3, corners: tuple[str, ...] = ("tl",),
                 init: Init = "mamba", backend: str = "auto", scan: ScanKind = "2d",
                 dt_range: tuple[float, float] = (1e-3, 0.1)) -> None:
        super().__init__()
        inner = expand * d_model
        self.inner = inner
        dt_rank = dt_rank or math.ceil(d_model / 16)
        self.scan_kind = scan
        self.conv_kind, self.backend = conv, backend
        self.corners = () if scan == "none" else tuple(corners)
        self.in_proj = nn.Linear(d_model, 2 * inner, bias=False)
        if conv == "dw2d":
            self.conv = nn.Conv2d(inner, inner, conv_kernel, padding=conv_kernel // 2, groups=inner)
        elif conv == "causal1d":
            self.conv = nn.Conv1d(inner, inner, conv_kernel, padding=conv_kernel - 1, groups=inner)
        else:
            self.conv = None
        self.scans = nn.ModuleList(ScanParameters(inner, d_state, dt_rank, init, dt_range) for _ in self.corners)
        self.skip = nn.Parameter(torch.ones(inner)) if scan == "none" else None
        self.out_proj = nn.Linear(inner, d_model, bias=False)

    def _sub(self, sl: slice) -> tuple[slice, slice]:
        """Rows of in_proj for the x and z halves of the inner channels ``sl``."""
        start, stop, _ = sl.indices(self.inner)
        return slice(start, stop), slice(self.inner + start, self.inner + stop)

    def _scan_input(self, x: torch.Tensor, layout: GridLayout, sl: slice) -> torch.Tensor:
        """(B, E_sl, H, W) u = silu(conv(x half of in_proj)) of the inner channels ``sl``."""
        xs = cells_to_channels(self.in_proj.weight[self._sub(sl)[0]], x)
        if self.conv_kind == "dw2d":
            n = xs.shape[1]
            xs = F.conv2d(zero_padding(xs, layout), self.conv.weight[sl], self.conv.bias[sl],
                          padding=self.conv.padding, groups=n)
        elif self.conv_kind == "causal1d":
            n = xs.shape[1]
            w, b, pad = self.conv.weight[sl], self.conv.bias[sl], self.conv.padding
            xs = raster_conv1d(xs, lambda seq: F.conv1d(seq, w, b, padding=pad, groups=n), layout)
        return F.silu(xs)

    def _projections(self, u: torch.Tensor, sl: slice = ALL) -> torch.Tensor:
        """x_proj of every corner's scan parameters, concatenated on the channels (unmirrored)."""
        if not self.scans:
            return u.new_zeros(u.shape[0], 0, *u.shape[2:])
        return torch.cat([params.project(u, sl) for params in self.scans], dim=1)

    def _scan_from(self, corner: str, params: ScanParameters, u: torch.Tensor, z: torch.Tensor,
                   proj: torch.Tensor, layout: GridLayout, sl: slice) -> torch.Tensor:
        """Gated scan of (B, E_sl, H, W) ``u`` from ``corner`` (2D, or along the raster order), unmirrored."""
        u, z, proj = (flip_to_corner(t, layout, corner) for t in (u, z, proj))
        if self.scan_kind == "raster1d":
            column = to_raster_column(layout)
            y = params.scan(*(column.gather(t) for t in (u, z, proj)), self.backend, sl)
            y = column.scatter(y)
        else:
            y = params.scan(u, z, proj, self.backend, sl)
        return flip_to_corner(y, layout, corner)

    def _mix(self, x: torch.Tensor, u: torch.Tensor, projs: torch.Tensor, layout: GridLayout,
             sl: slice) -> torch.Tensor:
        """out_proj share of the inner channels ``sl``: the scans of ``u`` from every corner, gated, summed."""
        z = cells_to_channels(self.in_proj.weight[self._sub(sl)[1]], x)
        if self.skip is not None:  # no scan: the scan's skip term alone, gated
            y = u * self.skip[sl].to(u.dtype)[None, :, None, None] * F.silu(z)
            return channels_to_cells(self.out_proj.weight[:, sl], y)
        y = None
        for corner, params, proj in zip(self.corners, self.scans, projs.chunk(len(self.corners), dim=1)):
            yc = self._scan_from(corner, params, u, z, proj, layout, sl)
            y = yc if y is None else y + yc
        return channels_to_cells(self.out_proj.weight[:, sl], y)

    def forward(self, x: torch.Tensor, layout: GridLayout) -> torch.Tensor:
        """(B, H, W, d) → (B, H, W, d)."""
        u = self._scan_input(x, layout, ALL)
        return self._mix(x, u, self._projections(u), layout, ALL)

    def forward_lean(self, x: torch.Tensor, layout: GridLayout, groups: int) -> torch.Tensor:
        """:meth:`forward` in ``groups`` groups of inner channels, each recomputed in the backward pass."""
        slices = channel_parts(self.inner, groups)
        projs = checkpointed_sum(self._projections_part, slices, x, layout)
        return checkpointed_sum(self._mix_part, slices, x, projs, layout, keep_last=True)

    def _projections_part(self, sl: slice, x: torch.Tensor, layout: GridLayout) -> torch.Tensor:
        return self._projections(self._scan_input(x, layout, sl), sl)

    def _mix_part(self, sl: slice, x: torch.Tensor, projs: torch.Tensor, layout: GridLayout) -> torch.Tensor:
        # u is recomputed once more, after the scan's backward: its in_proj and conv outputs are then
        # not held while the scan's row checkpoints are
        u = checkpoint(self._scan_input, x, layout, sl, use_reentrant=False, preserve_rng_state=False)
        return self._mix(x, u, projs, layout, sl)


class _StarReLUFunction(torch.autograd.Function):
    """s · relu(x)² + b that keeps only x for backward (autograd of the plain formula keeps two tensors)."""

    @staticmethod
    def forward(ctx, x, scale, bias):
        ctx.save_for_backward(x, scale)
        return torch.addcmul(bias.to(x.dtype), scale.to(x.dtype), F.relu(x).square())

    @staticmethod
    def backward(ctx, grad):
        x, scale = ctx.saved_tensors
        r = F.relu(x)
        grad_x = grad * r * (2 * scale).to(grad.dtype)
        grad_scale = (grad * r.square()).sum().reshape(1).to(scale.dtype)
        return grad_x, grad_scale, grad.sum().reshape(1).to(scale.dtype)


class StarReLU(nn.Module):
    """s · relu(x)² + b with learnable scalars s and b (Yu et al. 2023, MetaFormer baselines)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _StarReLUFunction.apply(x, self.scale, self.bias)


class M2DMixer(nn.Module):
    """The Mamba2D mixer: an M2D-SSM path plus an additive depthwise-separable local path.

    SSM path: Linear → GELU → M2D scan (two parameter sets: vertical T and horizontal L) → GELU → Linear.
    Local path: LayerNorm → pointwise (×2 channels) → StarReLU → depthwise 3×3 → StarReLU → pointwise.
    ``corner`` is where this mixer's scan starts (Mamba2D alternates TL and BR between blocks). For the
    ablations, ``ssm_path=False`` leaves the local path alone and ``local_path=False`` the SSM path alone.
    """

    def __init__(self, d_model: int, d_state: int = 16, expand: int = 1, dt_rank: int | None = None,
                 corner: str = "tl", local_path: bool = True, backend: str = "auto", ssm_path: bool = True,
                 dt_range: tuple[float, float] = (1e-3, 0.1)) -> None:
        super().__init__()
        if not (ssm_path or local_path):
            raise ValueError("an M2D mixer needs its SSM path, its local path, or both")
        self.ssm_path = ssm_path
        self.dt_rank, self.d_state = dt_rank or math.ceil(d_model / 16), d_state
        self.corner, self.backend = corner, backend
        if ssm_path:
            self._build_ssm(d_model, expand * d_model, dt_range)
        if local_path:
            self.local_norm = nn.LayerNorm(d_model)
            self.local_in = nn.Linear(d_model, 2 * d_model, bias=False)
            self.local_act1 = StarReLU()
            self.local_dw = nn.Conv2d(2 * d_model, 2 * d_model, 3, padding=1, groups=2 * d_model, bias=False)
            self.local_act2 = StarReLU()
            self.local_out = nn.Linear(2 * d_model, d_model, bias=False)
        else:
            self.local_norm = None

    def _build_ssm(self, d_model: int, inner: int, dt_range: tuple[float, float]) -> None:
        self.in_proj = nn.Linear(d_model, inner)
        self.x_proj = nn.Linear(inner, 2 * self.dt_rank + 3 * self.d_state, bias=False)
        self.dt_proj_t = nn.Linear(self.dt_rank, inner)
        self.dt_proj_l = nn.Linear(self.dt_rank, inner)
        self.A_log_t = nn.Parameter(s4d_real_a_log(inner, self.d_state))
        self.A_log_l = nn.Parameter(s4d_real_a_log(inner, self.d_state))
        self.D = nn.Parameter(torch.ones(inner))
        self.out_proj = nn.Linear(inner, d_model)
        with torch.no_grad():  # Mamba2D draws one step bias and gives it to both axes
            bias = init_dt_bias(inner, *dt_range)
            for proj in (self.dt_proj_t, self.dt_proj_l):
                nn.init.uniform_(proj.weight, -self.dt_rank**-0.5, self.dt_rank**-0.5)
                proj.bias.copy_(bias)

    @torch.no_grad()
    def scale_state_init(self, gain: float) -> None:
        """Multiply the x_proj rows of B_t, B_l and C (after the two sets of step rows) by ``gain``, in
        place; without the SSM path there are none."""
        if self.ssm_path:
            self.x_proj.weight[2 * self.dt_rank:] *= gain

    def _scan_input(self, x: torch.Tensor, sl: slice) -> torch.Tensor:
        """(B, E_sl, H, W) u = gelu(in_proj(x)) of the inner channels ``sl`` (unmirrored)."""
        return F.gelu(cells_to_channels(self.in_proj.weight[sl], x) + _channels_bias(self.in_proj.bias[sl]))

    def _projection(self, x: torch.Tensor, sl: slice) -> torch.Tensor:
        """Share of the inner channels ``sl`` in x_proj(u) (unmirrored)."""
        return channel_matmul(self.x_proj.weight[:, sl], self._scan_input(x, sl))

    def _ssm(self, u: torch.Tensor, proj: torch.Tensor, layout: GridLayout, sl: slice) -> torch.Tensor:
        """out_proj share (no bias) of the inner channels ``sl`` of the SSM path, from their ``u``."""
        u = flip_to_corner(u, layout, self.corner)
        r, n = self.dt_rank, self.d_state
        dt_t, dt_l, b_t, b_l, c = flip_to_corner(proj, layout, self.corner).split([r, r, n, n, n], dim=1)
        dt_t = F.softplus(channel_matmul(self.dt_proj_t.weight[sl], dt_t) + _channels_bias(self.dt_proj_t.bias[sl]))
        dt_l = F.softplus(channel_matmul(self.dt_proj_l.weight[sl], dt_l) + _channels_bias(self.dt_proj_l.bias[sl]))
        y = ops.mamba2d_scan(u, dt_t, dt_l, -torch.exp(self.A_log_t[sl].float()),
                             -torch.exp(self.A_log_l[sl].float()), b_t, b_l, c, self.D[sl].float(),
                             backend=self.backend)
        y = F.gelu(flip_to_corner(y, layout, self.corner))
        return channels_to_cells(self.out_proj.weight[:, sl], y)

    def _local(self, x: torch.Tensor, layout: GridLayout, sl: slice) -> torch.Tensor:
        """Share of the hidden channels ``sl`` of the local path."""
        h = self.local_act1(F.linear(self.local_norm(x), self.local_in.weight[sl]))
        h = _to_channels_first(h)
        h = F.conv2d(zero_padding(h, layout), self.local_dw.weight[sl], padding=1, groups=h.shape[1])
        return F.linear(self.local_act2(_to_channels_last(h)), self.local_out.weight[:, sl])

    def forward(self, x: torch.Tensor, layout: GridLayout) -> torch.Tensor:
        """(B, H, W, d) → (B, H, W, d)."""
        if not self.ssm_path:
            return self._local(x, layout, ALL)
        u = self._scan_input(x, ALL)
        out = self._ssm(u, channel_matmul(self.x_proj.weight, u), layout, ALL) + self.out_proj.bias
        return out if self.local_norm is None else out + self._local(x, layout, ALL)

    def forward_lean(self, x: torch.Tensor, layout: GridLayout, groups: int) -> torch.Tensor:
        """:meth:`forward` in ``groups`` groups of channels, each recomputed in the backward pass."""
        if not self.ssm_path:
            return checkpointed_sum(self._local_part, channel_parts(self.local_in.out_features, groups), x, layout)
        slices = channel_parts(self.in_proj.out_features, groups)
        proj = checkpointed_sum(self._projection_part, slices, x)
        # no kept last term here: its activations would still be held while the local path is recomputed
        out = checkpointed_sum(self._ssm_part, slices, x, proj, layout) + self.out_proj.bias
        if self.local_norm is not None:
            out = out + checkpointed_sum(self._local_part, channel_parts(self.local_in.out_features, groups),
                                         x, layout)
        return out

    def _projection_part(self, sl: slice, x: torch.Tensor) -> torch.Tensor:
        return self._projection(x, sl)

    def _ssm_part(self, sl: slice, x: torch.Tensor, proj: torch.Tensor, layout: GridLayout) -> torch.Tensor:
        return self._ssm(self._scan_input(x, sl), proj, layout, sl)

    def _local_part(self, sl: slice, x: torch.Tensor, layout: GridLayout) -> torch.Tensor:
        return self._local(x, layout, sl)
