"""CuPy RawKernel backend of the 2D scans: compile ``scan2d.cu`` at first use, launch on PyTorch's stream.

The kernels (``kernels/scan2d.cu``, see its header) sweep the rows of each (batch, channel) grid in
one thread block, keep the hidden states on chip and save one row of states every ``R`` rows for the
backward, which recomputes the states of each segment of ``R`` rows. The 2DMamba forward of wide rows
runs on 32 x 32 tiles instead (``scan2d_tile_fwd``; ``ScanTuning.tiled_forward_above``), writing the same
checkpoint rows. The 2DMamba backward runs on tiles of 16 x 32 cells (``scan2d_tile_bwd``), from the
checkpoint rows and the horizontal states at every 32nd column, which both forwards save for it.
Kernels get the tensors' device pointers and PyTorch's current stream directly (no copy, no DLPack view
per call); compiled modules are cached per configuration.

How the kernels are laid out is one immutable value, :class:`ScanTuning`, passed to each call
(``DEFAULT_TUNING`` where none is given); :func:`plan_scan` turns it and a grid's shape into the
launches of one call (:class:`ScanPlan`).
"""

from __future__ import annotations

import ctypes
import functools
import math
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from types import MappingProxyType

import torch

from wsi2dmamba.errors import ConfigError

KERNEL_FILE = Path(__file__).resolve().parent.parent / "kernels" / "scan2d.cu"
IN_KIND = MappingProxyType({torch.float32: 0, torch.bfloat16: 1, torch.float16: 2})
# Shared memory of one backward block (scratch and recomputed rows): two blocks (each also reserving
# 1 KiB for the system) still fit in the 228 KiB of an H100 SM.
BWD_SMEM_BUDGET = 113 * 1024
SMEM_LIMIT = 227 * 1024
# Fewest rows per backward segment before the budget above is exceeded (see launch_config).
MIN_SEG_ROWS = 4
FIXED_SCALE = 2.0**-32  # the kernels' int64 fixed point of dB and dC
TILE = 32


def forward_states_per_thread(mode: int, width: int) -> int:
    """States per thread of the forward (``mode`` 0: 2DMamba, 1: Mamba2D) for rows of ``width`` columns.

    The fastest of 1, 2 and 4 per width (``benchmarks/scan_layouts.py``; figures in docs/benchmarks.md,
    "2D scans"): rows of at most 64 columns give each thread only 2 columns, so 4 states keep the
    per-thread work up."""
    if width <= 64 or (mode == 1 and width > 224):
        return 4
    return 2


def backward_states_per_thread(mode: int, width: int) -> int:
    """States per thread of the row-sweep backward, the fastest of the same sweep (docs/benchmarks.md)."""
    if width > 256:
        return 4
    if mode == 0:
        if width <= 64 or width > 224:
            return 4
        return 2 if width <= 160 else 1
    return 1 if 160 < width <= 224 else 2


def _is_count(value) -> bool:
    return type(value) is int and value >= 1


def _is_options(value) -> bool:
    return isinstance(value, (tuple, list)) and all(isinstance(o, str) for o in value)


def _tuning_field_problem(annotation: str, value) -> str | None:
    """What a ``ScanTuning`` field of this annotation must be, where ``value`` is not that; else None."""
    optional = annotation.endswith("| None")
    if value is None and optional:
        return None
    if annotation.startswith("int"):
        return None if _is_count(value) else "a positive int" + (" or None" if optional else "")
    if annotation.startswith("bool"):
        return None if type(value) is bool else "True, False or None"
    return None if _is_options(value) else "a tuple of strings (compiler options)"


@dataclass(frozen=True)
class ScanTuning:
    """How the CUDA kernels of the 2D scans are laid out and launched; never what they compute.

    Every choice picks among layouts that compute the same scan (up to the float rounding of their sums).
    ``None`` follows the rule measured fastest on an H100 (figures in docs/benchmarks.md, "2D scans");
    a value forces one layout (tests, benchmarks). The defaults are what a model runs.

    Attributes:
        states_per_thread: states per thread of the row-sweep forward (None: ``forward_states_per_thread``).
            Fewer means more warps per block to hide each row step's latency, but more per-cell work
            repeated by each warp.
        bwd_states_per_thread: the same for the row-sweep backward (None: ``backward_states_per_thread``),
            which also needs shared memory for its recomputed rows.
        bwd_wide_cols_per_thread: columns per thread of the row-sweep backward on rows wider than 256
            columns; 4 runs twice the warps per block of 8 with the same segments.
        bwd_smem_budget: bytes of shared memory of one row-sweep backward block, which sets its segment
            length (``launch_config``).
        tiled_forward: the 2DMamba forward on 32 x 32 tiles: None for rows wider than
            ``tiled_forward_above`` columns, True / False always / never (the row sweep).
        tiled_forward_above: the tiles are faster on wider rows only (narrower ones leave tiles mostly
            empty at some widths).
        tile_channels, tile_states: the tiled forward's block (``TileLayout``); wider ones spill registers.
        tiled_backward: the 2DMamba backward on tiles: None / True wherever its block fits (it beat the
            row sweep or matched it at every measured shape, with less memory), False never (the row sweep).
        tile_backward_states: states per warp of the tiled backward (None: 2 where N is even, else 1;
            2 beat 4, and 1 does not fit the shared memory at N = 16).
        tile_backward_channels: channels per block of the tiled backward (None: 2 where they fit and the
            call has more grids than the GPU has multiprocessors, else 1); two share the loads of B and C
            and halve the L2 traffic of the dB / dC atomics.
        extra_options: extra NVRTC options (e.g. ``("-DPF_ROWS=4",)``) compiling variants of the kernels.
    """

    states_per_thread: int | None = None
    bwd_states_per_thread: int | None = None
    bwd_wide_cols_per_thread: int = 4
    bwd_smem_budget: int = BWD_SMEM_BUDGET
    tiled_forward: bool | None = None
    tiled_forward_above: int = 224
    tile_channels: int = 1
    tile_states: int = 1
    tiled_backward: bool | None = None
    tile_backward_states: int | None = None
    tile_backward_channels: int | None = None
    extra_options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for f in fields(self):
            problem = _tuning_field_problem(f.type, getattr(self, f.name))
            if problem:
                raise ConfigError(f"ScanTuning.{f.name} must be {problem}, got {getattr(self, f.name)!r}")
        object.__setattr__(self, "extra_options", tuple(self.extra_options))

    def forward_states(self, mode: int, width: int) -> int:
        """States per thread of the row-sweep forward for rows of ``width`` columns."""
        return self.states_per_thread or forward_states_per_thread(mode, width)

    def backward_states(self, mode: int, width: int) -> int:
        """States per thread of the row-sweep backward for rows of ``width`` columns."""
        return self.bwd_states_per_thread or backward_states_per_thread(mode, width)

    def tiles_forward(self, width: int) -> bool:
        """Whether the 2DMamba forward of rows of ``width`` columns runs on tiles (where its block fits)."""
        return width > self.tiled_forward_above if self.tiled_forward is None else self.tiled_forward


DEFAULT_TUNING = ScanTuning()


@dataclass(frozen=True)
class LaunchConfig:
    """Thread layout of one (batch, channel) block: see the header of ``scan2d.cu``."""

    n_state: int
    states_per_thread: int
    cols_per_thread: int
    col_warps: int
    seg_rows: int
    b_planes: int = 2  # planes of B (2DMamba 1, Mamba2D 2) whose per-row gradient terms the backward stages

    @property
    def groups(self) -> int:
        return self.n_state // self.states_per_thread

    @property
    def block(self) -> tuple[int, int, int]:
        return (32 * self.col_warps, self.groups, 1)

    @property
    def row_cap(self) -> int:
        return 32 * self.col_warps * self.cols_per_thread

    def fwd_smem(self, buffers: int = 2) -> int:
        """Bytes of the forward's shared memory (the layout is in the comment above ``scan2d_fwd``):
        scan scratch, then ``buffers`` rows of per-group sums of y and of per-cell inputs (2: one
        barrier per row step)."""
        n_cells = 2 if self.b_planes == 1 else 4
        floats = self.groups * self.states_per_thread * self.col_warps * 2
        return 4 * (floats + buffers * (self.groups + n_cells) * self.row_cap)

    def fwd_buffers(self) -> int:
        """Rows of sums and cells the forward double-buffers where they fit (wide Mamba2D rows: 1)."""
        return 2 if self.fwd_smem(buffers=2) <= SMEM_LIMIT else 1

    def bwd_smem(self, width: int) -> int:
        # scan scratch, row sums (at least 4 rows: they also hold the recompute's cells), one row of the
        # dB terms of each B plane and of dy, the adjoint's cells (u, d1, [d2,] dy), then R + 1 rows of states
        scratch = self.groups * self.states_per_thread * self.col_warps * 2 + max(3 * self.groups, 4) * self.row_cap
        scratch += (self.b_planes * self.n_state + 1) * self.row_cap + (self.b_planes + 2) * self.row_cap
        return 4 * (scratch + (self.seg_rows + 1) * self.n_state * width)


@functools.lru_cache(maxsize=256)
def launch_config(
    n_state: int, height: int, width: int, states_per_thread: int = 2, smem_budget: int = BWD_SMEM_BUDGET,
    mode: int = 1, wide_cols_per_thread: int = 8, backward: bool = True,
) -> LaunchConfig | None:
    """Pick the layout for a grid (``mode`` 0: 2DMamba, 1: Mamba2D); None when a row of states does not fit.

    Rows of at most 256 columns take one warp per state group; wider rows take ``wide_cols_per_thread``
    columns per thread and as many warps as that needs. With ``backward`` the segment length is chosen
    and the backward's shared memory must fit; without, only the forward's."""
    b_planes = 1 if mode == 0 else 2
    s = states_per_thread if n_state % states_per_thread == 0 else 1
    if width <= 256:
        k, cw = max(1, math.ceil(width / 32)), 1
    else:
        k = wide_cols_per_thread
        cw = math.ceil(width / (32 * k))
    while 32 * cw * (n_state // s) > 1024 and n_state % (2 * s) == 0:
        s *= 2
    if 32 * cw * (n_state // s) > 1024:
        return None
    cfg = LaunchConfig(n_state, s, k, cw, 1, b_planes)
    if not backward:
        return cfg if cfg.fwd_smem(buffers=1) <= SMEM_LIMIT else None
    row_bytes = 4 * n_state * width
    fixed = cfg.bwd_smem(width) - 2 * row_bytes
    rows = max(1, (smem_budget - fixed) // row_bytes - 1)
    if rows < MIN_SEG_ROWS:
        # wide rows: one block per SM with the whole shared memory, rather than a checkpoint row
        # every row or two (whose memory grows as H*W*N*E/R)
        rows = max(1, (SMEM_LIMIT - fixed) // row_bytes - 1)
    rows = min(rows, height)
    cfg = LaunchConfig(n_state, s, k, cw, int(rows), b_planes)
    if cfg.bwd_smem(width) > SMEM_LIMIT:
        return None
    return cfg


@dataclass(frozen=True)
class TileLayout:
    """Block of the tiled 2DMamba forward: ``channels`` channels of one batch element, ``states`` states
    per thread, one warp per (channel, group of ``states`` states)."""

    n_state: int
    channels: int
    states: int

    @property
    def threads(self) -> int:
        return 32 * self.channels * (self.n_state // self.states)

    def smem(self, width: int) -> int:
        # the tile of x / g / sums per (channel, state), four tiles of per-cell inputs per channel, and
        # one row of vertical carries per (channel, state)
        pitch = TILE * (TILE + 1)
        return 4 * (self.channels * (self.n_state + 4) * pitch + self.channels * self.n_state * width)


def tile_layout(n_state: int, width: int, tuning: ScanTuning = DEFAULT_TUNING) -> TileLayout | None:
    """The tiled forward's layout for rows of ``width`` columns, or None where the row sweep runs."""
    if not tuning.tiles_forward(width):
        return None
    states = tuning.tile_states if n_state % tuning.tile_states == 0 else 1
    layout = TileLayout(n_state, tuning.tile_channels, states)
    if layout.threads <= 1024 and layout.smem(width) <= SMEM_LIMIT:
        return layout
    return None


@dataclass(frozen=True)
class TileBackwardLayout:
    """Block of the tiled 2DMamba backward: ``channels`` channels of one batch element, one warp per
    ``states`` states (of every channel); tiles of ``rows`` = 32 / ``states`` rows by 32 columns (a lane of
    the row passes is one (state, row))."""

    n_state: int
    states: int
    channels: int = 1

    @property
    def rows(self) -> int:
        return 32 // self.states

    @property
    def seg_rows(self) -> int:
        """The forward's checkpoint interval: the states of the row above every tile."""
        return self.rows

    @property
    def threads(self) -> int:
        return 32 * (self.n_state // self.states)

    def blocks(self, batch: int, n_channels: int) -> int:
        """Thread blocks of a call on ``batch`` grids of ``n_channels`` channels (E)."""
        return batch * math.ceil(n_channels / self.channels)

    def smem(self) -> int:
        # per channel: two tiles per state (x/g, G/F), two per warp (its sums over states) and three of
        # per-cell inputs
        slots = 2 * self.n_state + 2 * (self.n_state // self.states) + 3
        return 4 * self.channels * slots * self.rows * (TILE + 1)


def tile_backward_layout(n_state: int, width: int, grids: int | None = None, sm_count: int | None = None,
                         tuning: ScanTuning = DEFAULT_TUNING) -> TileBackwardLayout | None:
    """The tiled 2DMamba backward's layout, or None where the row-sweep backward runs.

    ``grids``: the call's batch * E (batch, channel) grids; ``sm_count``: the GPU's multiprocessors. Two
    channels per block only where there are more grids than multiprocessors: with fewer, one channel per
    block spreads them over twice as many (as a model's channel groups do; docs/benchmarks.md)."""
    if tuning.tiled_backward is False:
        return None
    states = tuning.tile_backward_states or (2 if n_state % 2 == 0 else 1)
    if n_state % states or 32 % states:
        return None
    for channels in _tile_backward_channels(grids, sm_count, tuning):
        layout = TileBackwardLayout(n_state, states, channels)
        if layout.threads <= 1024 and layout.smem() <= SMEM_LIMIT:
            return layout
    return None


def _tile_backward_channels(grids: int | None, sm_count: int | None, tuning: ScanTuning) -> tuple[int, ...]:
    """Channels per block of the tiled backward to try, in order of preference."""
    if tuning.tile_backward_channels:
        return (tuning.tile_backward_channels,)
    if grids is not None and sm_count is not None and grids <= sm_count:
        return (1,)
    return (2, 1)


@dataclass(frozen=True)
class ScanPlan:
    """The launches of one scan call: the row-sweep ``forward`` (where ``tiles`` is None, else the tiled
    2DMamba forward), the ``backward`` (the forward's layout without gradients), and the kernels' extra
    compile options."""

    forward: LaunchConfig
    backward: LaunchConfig | TileBackwardLayout
    tiles: TileLayout | None
    need_grad: bool
    extra_options: tuple[str, ...] = ()


def _backward_layout(mode: int, n_state: int, shape: tuple[int, int, int, int], sm_count: int | None,
                     tuning: ScanTuning) -> LaunchConfig | TileBackwardLayout | None:
    """The 2DMamba backward on tiles where their block fits, else (and for Mamba2D, whose shared memory
    limits the row width far more than the forward's) the row sweep."""
    batch, E, H, W = shape
    if mode == 0:
        tiles = tile_backward_layout(n_state, W, batch * E, sm_count, tuning)
        if tiles is not None:
            return tiles
    return launch_config(n_state, H, W, tuning.backward_states(mode, W), tuning.bwd_smem_budget, mode,
                         wide_cols_per_thread=tuning.bwd_wide_cols_per_thread)


def plan_scan(mode: int, n_state: int, shape: tuple[int, int, int, int], need_grad: bool,
              sm_count: int | None = None, tuning: ScanTuning = DEFAULT_TUNING) -> ScanPlan | None:
    """The launches of a scan (``mode`` 0: 2DMamba, 1: Mamba2D) of ``n_state`` states on grids of ``shape``
    (batch, E, H, W), or None where the grid is beyond the kernels. ``sm_count``: the GPU's
    multiprocessors (None: unknown), for the tiled backward's channels per block."""
    W = shape[3]
    fwd = launch_config(n_state, shape[2], W, tuning.forward_states(mode, W), tuning.bwd_smem_budget, mode,
                        backward=False)
    if fwd is None:
        return None
    bwd = _backward_layout(mode, n_state, shape, sm_count, tuning) if need_grad else fwd
    if bwd is None:
        return None
    tiles = tile_layout(n_state, W, tuning) if mode == 0 else None
    return ScanPlan(fwd, bwd, tiles, need_grad, tuning.extra_options)


@functools.lru_cache(maxsize=None)
def _sm_count(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def row_sweep_macros(mode: int, in_kind: int, cfg: LaunchConfig) -> dict[str, int]:
    """Compile-time macros of the row-sweep kernels (``scan2d_fwd``, ``scan2d_bwd``) of a layout; the
    segment length is a kernel argument, not a macro."""
    return {"MODE": mode, "IN_KIND": in_kind, "NS": cfg.n_state, "S": cfg.states_per_thread,
            "K": cfg.cols_per_thread, "CW": cfg.col_warps, "NBUF": cfg.fwd_buffers()}


def tile_forward_macros(in_kind: int, layout: TileLayout) -> dict[str, int]:
    """Compile-time macros of the tiled 2DMamba forward (``scan2d_tile_fwd``; the row-sweep ones unused)."""
    return {"MODE": 0, "IN_KIND": in_kind, "NS": layout.n_state, "S": 1, "K": 1, "CW": 1,
            "TCH": layout.channels, "TS": layout.states}


def tile_backward_macros(in_kind: int, layout: TileBackwardLayout) -> dict[str, int]:
    """Compile-time macros of the tiled 2DMamba backward (``scan2d_tile_bwd``)."""
    return {"MODE": 0, "IN_KIND": in_kind, "NS": layout.n_state, "S": 1, "K": 1, "CW": 1,
            "BTS": layout.states, "BCH": layout.channels}


def plan_kernels(mode: int, in_kind: int, plan: ScanPlan) -> tuple[tuple[str, dict[str, int]], ...]:
    """(kernel name, macros) of the forward and, with gradients, the backward that a call on ``plan``
    launches (``in_kind`` as in ``IN_KIND``); each compiles with ``plan.extra_options`` added."""
    if plan.tiles is not None:
        fwd = ("scan2d_tile_fwd", tile_forward_macros(in_kind, plan.tiles))
    else:
        fwd = ("scan2d_fwd", row_sweep_macros(mode, in_kind, plan.forward))
    if not plan.need_grad:
        return (fwd,)
    if isinstance(plan.backward, TileBackwardLayout):
        return fwd, ("scan2d_tile_bwd", tile_backward_macros(in_kind, plan.backward))
    return fwd, ("scan2d_bwd", row_sweep_macros(mode, in_kind, plan.backward))


def _functions(macros: dict[str, int], names: tuple[str, ...], device: int, extra: tuple[str, ...]):
    """Compile ``scan2d.cu`` with ``-Dname=value`` macros (and ``extra`` options) and wrap its ``names``."""
    import cupy

    options = (*(f"-D{k}={v}" for k, v in macros.items()), "-std=c++17", *extra)
    with cupy.cuda.Device(device):
        module = cupy.RawModule(code=KERNEL_FILE.read_text(), options=options)
        return tuple(_Kernel(module.get_function(n), device) for n in names)


@functools.lru_cache(maxsize=None)
def _compiled(macros: tuple[tuple[str, int], ...], names: tuple[str, ...], device: int, extra: tuple[str, ...]):
    """One compiled module per (macros, options, device), cached for the process."""
    return _functions(dict(macros), names, device, extra)


def _kernels(mode: int, in_kind: int, cfg: LaunchConfig, device: int, extra: tuple[str, ...]):
    """(fwd, bwd) row-sweep kernels for a layout."""
    return _compiled(tuple(row_sweep_macros(mode, in_kind, cfg).items()), ("scan2d_fwd", "scan2d_bwd"), device, extra)


def _tile_kernel(in_kind: int, layout: TileLayout, device: int, extra: tuple[str, ...]):
    """The tiled 2DMamba forward for an input dtype and block layout."""
    return _compiled(tuple(tile_forward_macros(in_kind, layout).items()), ("scan2d_tile_fwd",), device, extra)[0]


def _tile_backward_kernel(in_kind: int, layout: TileBackwardLayout, device: int, extra: tuple[str, ...]):
    """The tiled 2DMamba backward for an input dtype and block layout."""
    return _compiled(tuple(tile_backward_macros(in_kind, layout).items()), ("scan2d_tile_bwd",), device, extra)[0]


class _Kernel:
    """A compiled kernel launched through the CUDA driver with raw pointers on a given stream.

    Building one CuPy array per argument (DLPack) and a CuPy stream object per call cost about
    0.3 ms of host time per scan; here a call packs device pointers and ints with ctypes.
    """

    def __init__(self, raw, device: int):
        self.raw = raw
        self.device = device
        self.func = None
        self.smem_limit = 48 * 1024

    def __call__(self, grid, block, args, smem: int, stream: int) -> None:
        import cupy

        if self.func is None or smem > self.smem_limit:
            with cupy.cuda.Device(self.device):
                self.func = self.raw.kernel.ptr  # compiles and loads the module on first use
                if smem > self.smem_limit:
                    self.raw.max_dynamic_shared_size_bytes = smem
                    self.smem_limit = smem
        holders = [
            ctypes.c_void_p(0) if a is None
            else ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor)
            else ctypes.c_int32(a)
            for a in args
        ]
        params = (ctypes.c_void_p * len(holders))(*[ctypes.addressof(h) for h in holders])
        grid = (tuple(grid) + (1, 1))[:3]
        cupy.cuda.driver.launchKernel(self.func, *grid, *block, smem, stream, ctypes.addressof(params), 0)


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _prep(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if t is None:
        return None
    if t.dtype != dtype:
        t = t.to(dtype)
    return t if t.is_contiguous() else t.contiguous()


def _from_fixed(acc: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (acc.to(torch.float64) * FIXED_SCALE).to(dtype)


class _Scan2d(torch.autograd.Function):
    """Forward and backward of either scan; ``mode`` 0 is 2DMamba, 1 is Mamba2D."""

    @staticmethod
    def forward(ctx, mode, plan, u, dt1, dt2, z, B1, B2, C, A1, A2, D, dt_bias):
        dtype = u.dtype
        cfg_fwd, cfg, need_grad = plan.forward, plan.backward, plan.need_grad
        act = [_prep(t, dtype) for t in (u, dt1, dt2, z, B1, B2, C)]
        par = [_prep(t, torch.float32) for t in (A1, A2, D, dt_bias)]
        batch, E, H, W = u.shape
        # checkpoint rows every seg_rows rows (the backward's segments); none without gradients
        seg_rows = min(cfg.seg_rows if need_grad else H, H)
        nseg = math.ceil(H / seg_rows)
        dev = u.device
        out = torch.empty_like(act[0])
        ckpt = torch.empty((batch * E, nseg - 1, cfg.n_state, W), device=dev, dtype=torch.float32)
        # the tiled backward also needs the horizontal states at the last column of every 32-column chunk
        gck = None
        if need_grad and isinstance(cfg, TileBackwardLayout):
            gck = torch.empty((batch * E, math.ceil(W / TILE) - 1, cfg.n_state, H), device=dev, dtype=torch.float32)
        stream = _stream(dev)
        tiles = plan.tiles
        if tiles is not None:
            u_, dt_, _, z_, B_, _, C_ = act
            A_, _, D_, bias_ = par
            kernel = _tile_kernel(IN_KIND[dtype], tiles, dev.index, plan.extra_options)
            kernel((batch * math.ceil(E / tiles.channels),), (tiles.threads, 1, 1),
                   [u_, dt_, z_, B_, C_, A_, D_, bias_, out, ckpt, gck, H, W, E, seg_rows], tiles.smem(W), stream)
        else:
            fwd = _kernels(mode, IN_KIND[dtype], cfg_fwd, dev.index, plan.extra_options)[0]
            fwd((batch * E,), cfg_fwd.block, [*act, *par, out, ckpt, gck, H, W, E, seg_rows],
                cfg_fwd.fwd_smem(cfg_fwd.fwd_buffers()), stream)
        ctx.mode, ctx.cfg, ctx.extra_options = mode, cfg, plan.extra_options
        ctx.in_dtypes = [None if t is None else t.dtype for t in (u, dt1, dt2, z, B1, B2, C, A1, A2, D, dt_bias)]
        ctx.save_for_backward(*act, *par, ckpt, gck)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        u, dt1, dt2, z, B1, B2, C, A1, A2, D, dt_bias, ckpt, gck = ctx.saved_tensors
        mode, cfg = ctx.mode, ctx.cfg
        batch, E, H, W = u.shape
        dtype = u.dtype
        grad_out = _prep(grad_out, dtype)
        du, ddt1 = torch.empty_like(u), torch.empty_like(u)
        ddt2 = torch.empty_like(u) if dt2 is not None else None
        dz = torch.empty_like(u) if z is not None else None
        fixed = lambda present: (  # noqa: E731
            torch.zeros(B1.shape, device=u.device, dtype=torch.int64) if present else None
        )
        dB1, dB2, dC = fixed(True), fixed(B2 is not None), fixed(True)
        part = lambda present: (  # noqa: E731
            torch.empty((batch, E, cfg.n_state), device=u.device, dtype=torch.float32) if present else None
        )
        dA1, dA2 = part(True), part(A2 is not None)
        dD = torch.empty((batch, E), device=u.device, dtype=torch.float32)
        dbias = torch.empty((batch, E), device=u.device, dtype=torch.float32)
        if isinstance(cfg, TileBackwardLayout):
            # the adjoint's vertical carries between bands of tiles, one row of states per (batch, channel)
            gcar = torch.empty((batch * E, cfg.n_state, W), device=u.device, dtype=torch.float32)
            bwd = _tile_backward_kernel(IN_KIND[dtype], cfg, u.device.index, ctx.extra_options)
            args = [u, dt1, z, B1, C, A1, D, dt_bias, grad_out, ckpt, gck, gcar,
                    du, ddt1, dz, dB1, dC, dA1, dD, dbias, H, W, E]
            bwd((cfg.blocks(batch, E),), (cfg.threads, 1, 1), args, cfg.smem(), _stream(u.device))
        else:
            bwd = _kernels(mode, IN_KIND[dtype], cfg, u.device.index, ctx.extra_options)[1]
            args = [u, dt1, dt2, z, B1, B2, C, A1, A2, D, dt_bias, grad_out, ckpt,
                    du, ddt1, ddt2, dz, dB1, dB2, dC, dA1, dA2, dD, dbias, H, W, E, min(cfg.seg_rows, H)]
            bwd((batch * E,), cfg.block, args, cfg.bwd_smem(W), _stream(u.device))
        t = ctx.in_dtypes
        grads = [
            du.to(t[0]),
            ddt1.to(t[1]),
            None if ddt2 is None else ddt2.to(t[2]),
            None if dz is None else dz.to(t[3]),
            _from_fixed(dB1, t[4]),
            None if dB2 is None else _from_fixed(dB2, t[5]),
            _from_fixed(dC, t[6]),
            dA1.sum(0).to(t[7]),
            None if dA2 is None else dA2.sum(0).to(t[8]),
            None if t[9] is None else dD.sum(0).to(t[9]),
            None if t[10] is None else dbias.sum(0).to(t[10]),
        ]
        return (None, None, *grads)


def _plan(u: torch.Tensor, n_state: int, mode: int, need_grad: bool, tuning: ScanTuning | None) -> ScanPlan | None:
    sms = _sm_count(u.device.index) if u.is_cuda else None
    return plan_scan(mode, n_state, tuple(u.shape), need_grad, sms, DEFAULT_TUNING if tuning is None else tuning)


def _warn_reference(scan: str, u: torch.Tensor) -> None:
    # Silent fallback would turn a wide grid into a sudden 10-100x slowdown and memory blow-up.
    warnings.warn(f"{scan} scan: a grid of {u.shape[2]} x {u.shape[3]} cells has rows wider than the CUDA "
                  "kernels' shared memory holds; running the PyTorch reference (much slower, and it stores "
                  "every hidden state). Tile the slide at a coarser resolution to stay on the kernels.",
                  RuntimeWarning, stacklevel=3)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def selective_scan_2d_cupy(u, dt, A, B, C, D=None, z=None, dt_bias=None, *, tuning: ScanTuning | None = None):
    """The 2DMamba scan on the CUDA kernels (same contract as ``selective_scan_2d``), laid out by ``tuning``
    (None: ``DEFAULT_TUNING``)."""
    plan = _plan(u, A.shape[1], 0, _needs_grad(u, dt, A, B, C, D, z, dt_bias), tuning)
    if plan is None:
        from wsi2dmamba.ops.reference import selective_scan_2d_reference

        _warn_reference("2DMamba", u)
        return selective_scan_2d_reference(u, dt, A, B, C, D, z, dt_bias)
    return _Scan2d.apply(0, plan, u, dt, None, z, B, None, C, A, None, D, dt_bias)


def mamba2d_scan_cupy(u, dt_t, dt_l, A_t, A_l, B_t, B_l, C, D=None, *, tuning: ScanTuning | None = None):
    """The Mamba2D scan on the CUDA kernels (same contract as ``mamba2d_scan``), laid out by ``tuning``
    (None: ``DEFAULT_TUNING``)."""
    plan = _plan(u, A_t.shape[1], 1, _needs_grad(u, dt_t, dt_l, A_t, A_l, B_t, B_l, C, D), tuning)
    if plan is None:
        from wsi2dmamba.ops.reference import mamba2d_scan_reference

        _warn_reference("Mamba2D", u)
        return mamba2d_scan_reference(u, dt_t, dt_l, A_t, A_l, B_t, B_l, C, D)
    return _Scan2d.apply(1, plan, u, dt_t, dt_l, None, B_t, B_l, C, A_t, A_l, D, None)
