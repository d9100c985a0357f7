"""CuPy RawKernel backend of the 2D scans: compile ``scan2d.cu`` at first use, launch on PyTorch's stream.

The kernels (``kernels/scan2d.cu``, see its header) sweep the rows of each (batch, channel) grid in
one thread block, keep the hidden states on chip and save one row of states every ``R`` rows for the
backward, which recomputes the states of each segment of ``R`` rows. The 2DMamba forward of wide rows
runs on 32 x 32 tiles instead (``scan2d_tile_fwd``; ``TILED_FORWARD_ABOVE``), writing the same
checkpoint rows. The 2DMamba backward runs on tiles of 16 x 32 cells (``scan2d_tile_bwd``), from the
checkpoint rows and the horizontal states at every 32nd column, which both forwards save for it.
Kernels get the tensors' device pointers and PyTorch's current stream directly (no copy, no DLPack view
per call); compiled modules are cached per configuration.
"""

from __future__ import annotations

import ctypes
import functools
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

KERNEL_FILE = Path(__file__).resolve().parent.parent / "kernels" / "scan2d.cu"
IN_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# Shared memory of one backward block (scratch and recomputed rows): two blocks (each also reserving
# 1 KiB for the system) still fit in the 228 KiB of an H100 SM.
BWD_SMEM_BUDGET = 113 * 1024
SMEM_LIMIT = 227 * 1024
# Fewest rows per backward segment before the budget above is exceeded (see launch_config).
MIN_SEG_ROWS = 4
FIXED_SCALE = 2.0**-32  # the kernels' int64 fixed point of dB and dC
# States per thread of the forward and the backward: fewer means more warps per block to hide the
# latency of each row step, but more per-cell work repeated by each warp; the backward also needs
# shared memory for its recomputed rows. None: the per-width rules below; an int forces one layout
# (tests and benchmarks).
STATES_PER_THREAD: int | None = None
BWD_STATES_PER_THREAD: int | None = None


def forward_states_per_thread(mode: int, width: int) -> int:
    """States per thread of the forward (``mode`` 0: 2DMamba, 1: Mamba2D) for rows of ``width`` columns.

    Fastest of 1, 2 and 4 in a sweep on an H100 (E = 256 at 64-256 columns, batch 16 x E = 192 at 56;
    docs/benchmarks.md, "2D scans"): rows of at most 64 columns give each thread only 2 columns, so
    4 states keep the per-thread work up; Mamba2D rows wider than 224 columns also prefer 4."""
    if width <= 64 or (mode == 1 and width > 224):
        return 4
    return 2


def backward_states_per_thread(mode: int, width: int) -> int:
    """States per thread of the backward, from the same sweep (rows wider than 256 columns: 4)."""
    if width > 256:
        return 4
    if mode == 0:
        if width <= 64 or width > 224:
            return 4
        return 2 if width <= 160 else 1
    return 1 if 160 < width <= 224 else 2


# Columns per thread of the backward on rows wider than 256 columns: 4 runs twice the warps of 8 per
# block (16 instead of 8 at 391 columns, one block per SM) with the same segments; 2DMamba at 391 x 391,
# E = 256 on an H100: forward+backward 23.9 -> 18.8 ms (docs/benchmarks.md, "2D scans").
BWD_WIDE_COLS_PER_THREAD = 4
# The 2DMamba forward on 32 x 32 tiles (scan2d_tile_fwd) for rows wider than TILED_FORWARD_ABOVE
# columns: at 240-512 columns it took 0.56-0.76x the time of the row sweep on an H100; up to 224 columns
# the row sweep was as fast or faster but at some multiples of 32 (tiles 1.33x at 196, whose last tile
# is mostly empty; benchmarks/tiled_forward.py, docs/benchmarks.md). TILED_FORWARD: None follows the
# width rule, True / False force either kernel. TILE_CHANNELS, TILE_STATES: the block layout (TileLayout;
# 1 x 1 ran fastest, wider layouts spill registers).
TILED_FORWARD: bool | None = None
TILED_FORWARD_ABOVE = 224
TILE_CHANNELS = 1
TILE_STATES = 1
TILE = 32
# The 2DMamba backward on tiles of 32 / TILE_BACKWARD_STATES rows x 32 columns (scan2d_tile_bwd), from
# checkpoint rows and horizontal carries the forward saves. It replaced the row-sweep backward wherever
# its block fits (any row width at N <= 32): on an H100 at E = 256, forward+backward 196^2 3.12 -> 1.90 ms,
# 391^2 14.6 -> 8.0 ms, batch 16 x 56^2 4.3 -> 1.8 ms, with less memory; 64^2 (launch-bound) unchanged
# (docs/benchmarks.md, "2D scans"). TILED_BACKWARD: None = wherever it fits, True / False force it on or
# off (False: the row sweep). TILE_BACKWARD_STATES: states per thread (one warp per group of them; 2 ran
# faster than 4, 1 does not fit the shared memory at N = 16); None: 2 where N is even, else 1.
TILED_BACKWARD: bool | None = None
TILE_BACKWARD_STATES: int | None = None
# Channels per block of the tiled backward: 2 share the loads of B and C and add their dB / dC terms before
# the atomics, halving the L2 traffic per channel that bounds the kernel (on an H100 at E = 256,
# forward+backward 196^2 1.91 -> 1.81 ms, 391^2 7.77 -> 7.11 ms; docs/benchmarks.md). None: 2 where the
# block's shared memory holds them (N up to 16 at 2 states per warp) and the call has more (batch,
# channel) grids than the GPU has multiprocessors (see tile_backward_layout), else 1.
TILE_BACKWARD_CHANNELS: int | None = None
# Extra NVRTC options (e.g. "-DPF_ROWS=4"), for benchmarking variants of the kernels.
EXTRA_OPTIONS: tuple[str, ...] = ()


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


def tile_layout(n_state: int, width: int) -> TileLayout | None:
    """The tiled forward's layout for rows of ``width`` columns, or None where the row sweep runs."""
    if TILED_FORWARD is False or (TILED_FORWARD is None and width <= TILED_FORWARD_ABOVE):
        return None
    layout = TileLayout(n_state, TILE_CHANNELS, TILE_STATES if n_state % TILE_STATES == 0 else 1)
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


def tile_backward_layout(n_state: int, width: int, grids: int | None = None,
                         sm_count: int | None = None) -> TileBackwardLayout | None:
    """The tiled 2DMamba backward's layout, or None where the row-sweep backward runs.

    ``grids``: the call's batch * E (batch, channel) grids; ``sm_count``: the GPU's multiprocessors. Two
    channels per block only where there are more grids than multiprocessors: with fewer, one channel per
    block spreads them over twice as many (the channel groups of a model's lean blocks: a 2dmambamil step
    at 391 x 391, two groups of 128 channels, ran 33.3 ms with one channel per block, 34.5 with two)."""
    if TILED_BACKWARD is False:
        return None
    states = TILE_BACKWARD_STATES or (2 if n_state % 2 == 0 else 1)
    if n_state % states or 32 % states:
        return None
    if TILE_BACKWARD_CHANNELS:
        candidates = (TILE_BACKWARD_CHANNELS,)
    elif grids is not None and sm_count is not None and grids <= sm_count:
        candidates = (1,)
    else:
        candidates = (2, 1)
    for channels in candidates:
        layout = TileBackwardLayout(n_state, states, channels)
        if layout.threads <= 1024 and layout.smem() <= SMEM_LIMIT:
            return layout
    return None


@functools.lru_cache(maxsize=None)
def _sm_count(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _kernels(mode: int, in_kind: int, cfg: LaunchConfig, device: int):
    """(fwd, bwd) kernels for a layout; the segment length is a kernel argument, not a macro."""
    return _compiled(mode, in_kind, cfg.n_state, cfg.states_per_thread, cfg.cols_per_thread, cfg.col_warps, device,
                     EXTRA_OPTIONS, cfg.fwd_buffers())


def _functions(macros: dict[str, int], names: tuple[str, ...], device: int, extra: tuple[str, ...]):
    """Compile ``scan2d.cu`` with ``-Dname=value`` macros (and ``extra`` options) and wrap its ``names``."""
    import cupy

    options = (*(f"-D{k}={v}" for k, v in macros.items()), "-std=c++17", *extra)
    with cupy.cuda.Device(device):
        module = cupy.RawModule(code=KERNEL_FILE.read_text(), options=options)
        return tuple(_Kernel(module.get_function(n), device) for n in names)


@functools.lru_cache(maxsize=None)
def _compiled(mode: int, in_kind: int, n_state: int, states: int, cols: int, col_warps: int, device: int,
              extra: tuple[str, ...] = (), buffers: int = 2):
    macros = dict(MODE=mode, IN_KIND=in_kind, NS=n_state, S=states, K=cols, CW=col_warps, NBUF=buffers)
    return _functions(macros, ("scan2d_fwd", "scan2d_bwd"), device, extra)


@functools.lru_cache(maxsize=None)
def _tile_kernel(in_kind: int, layout: TileLayout, device: int, extra: tuple[str, ...] = ()):
    """The tiled 2DMamba forward for an input dtype and block layout (the row-sweep macros are unused)."""
    macros = dict(MODE=0, IN_KIND=in_kind, NS=layout.n_state, S=1, K=1, CW=1, TCH=layout.channels, TS=layout.states)
    return _functions(macros, ("scan2d_tile_fwd",), device, extra)[0]


@functools.lru_cache(maxsize=None)
def _tile_backward_kernel(in_kind: int, layout: TileBackwardLayout, device: int, extra: tuple[str, ...] = ()):
    """The tiled 2DMamba backward for an input dtype and block layout."""
    macros = dict(MODE=0, IN_KIND=in_kind, NS=layout.n_state, S=1, K=1, CW=1, BTS=layout.states,
                  BCH=layout.channels)
    return _functions(macros, ("scan2d_tile_bwd",), device, extra)[0]


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
    def forward(ctx, mode, cfgs, u, dt1, dt2, z, B1, B2, C, A1, A2, D, dt_bias):
        dtype = u.dtype
        cfg_fwd, cfg, need_grad = cfgs
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
        tiles = tile_layout(cfg.n_state, W) if mode == 0 else None
        if tiles is not None:
            u_, dt_, _, z_, B_, _, C_ = act
            A_, _, D_, bias_ = par
            kernel = _tile_kernel(IN_KIND[dtype], tiles, dev.index, EXTRA_OPTIONS)
            kernel((batch * math.ceil(E / tiles.channels),), (tiles.threads, 1, 1),
                   [u_, dt_, z_, B_, C_, A_, D_, bias_, out, ckpt, gck, H, W, E, seg_rows], tiles.smem(W), stream)
        else:
            fwd = _kernels(mode, IN_KIND[dtype], cfg_fwd, dev.index)[0]
            fwd((batch * E,), cfg_fwd.block, [*act, *par, out, ckpt, gck, H, W, E, seg_rows],
                cfg_fwd.fwd_smem(cfg_fwd.fwd_buffers()), stream)
        ctx.mode, ctx.cfg = mode, cfg
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
            bwd = _tile_backward_kernel(IN_KIND[dtype], cfg, u.device.index, EXTRA_OPTIONS)
            args = [u, dt1, z, B1, C, A1, D, dt_bias, grad_out, ckpt, gck, gcar,
                    du, ddt1, dz, dB1, dC, dA1, dD, dbias, H, W, E]
            bwd((cfg.blocks(batch, E),), (cfg.threads, 1, 1), args, cfg.smem(), _stream(u.device))
        else:
            bwd = _kernels(mode, IN_KIND[dtype], cfg, u.device.index)[1]
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


def _config_or_none(u, n_state, mode, need_grad=True):
    """(forward, backward) layouts, or None when the grid is beyond the kernels. Without gradients the
    backward's layout is not needed. The backward is a ``TileBackwardLayout`` (2DMamba, any width) or a
    ``LaunchConfig`` of the row sweep (Mamba2D, whose shared memory limits the row width far more than the
    forward's)."""
    _, _, H, W = u.shape
    s_fwd = STATES_PER_THREAD or forward_states_per_thread(mode, W)
    fwd = launch_config(n_state, H, W, s_fwd, BWD_SMEM_BUDGET, mode, backward=False)
    if not need_grad:
        return None if fwd is None else (fwd, fwd)
    if mode == 0 and fwd is not None:
        sms = _sm_count(u.device.index) if u.is_cuda else None
        tiles = tile_backward_layout(n_state, W, u.shape[0] * u.shape[1], sms)
        if tiles is not None:
            return fwd, tiles
    s_bwd = BWD_STATES_PER_THREAD or backward_states_per_thread(mode, W)
    bwd = launch_config(n_state, H, W, s_bwd, BWD_SMEM_BUDGET, mode, wide_cols_per_thread=BWD_WIDE_COLS_PER_THREAD)
    return None if fwd is None or bwd is None else (fwd, bwd)


def _warn_reference(scan: str, u: torch.Tensor) -> None:
    # Silent fallback would turn a wide grid into a sudden 10-100x slowdown and memory blow-up.
    warnings.warn(f"{scan} scan: a grid of {u.shape[2]} x {u.shape[3]} cells has rows wider than the CUDA "
                  "kernels' shared memory holds; running the PyTorch reference (much slower, and it stores "
                  "every hidden state). Tile the slide at a coarser resolution to stay on the kernels.",
                  RuntimeWarning, stacklevel=3)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def selective_scan_2d_cupy(u, dt, A, B, C, D=None, z=None, dt_bias=None):
    """The 2DMamba scan on the CUDA kernels (same contract as ``selective_scan_2d``)."""
    need_grad = _needs_grad(u, dt, A, B, C, D, z, dt_bias)
    cfg = _config_or_none(u, A.shape[1], 0, need_grad)
    if cfg is None:
        from wsi2dmamba.ops.reference import selective_scan_2d_reference

        _warn_reference("2DMamba", u)
        return selective_scan_2d_reference(u, dt, A, B, C, D, z, dt_bias)
    cfgs = (*cfg, need_grad)
    return _Scan2d.apply(0, cfgs, u, dt, None, z, B, None, C, A, None, D, dt_bias)


def mamba2d_scan_cupy(u, dt_t, dt_l, A_t, A_l, B_t, B_l, C, D=None):
    """The Mamba2D scan on the CUDA kernels (same contract as ``mamba2d_scan``)."""
    need_grad = _needs_grad(u, dt_t, dt_l, A_t, A_l, B_t, B_l, C, D)
    cfg = _config_or_none(u, A_t.shape[1], 1, need_grad)
    if cfg is None:
        from wsi2dmamba.ops.reference import mamba2d_scan_reference

        _warn_reference("Mamba2D", u)
        return mamba2d_scan_reference(u, dt_t, dt_l, A_t, A_l, B_t, B_l, C, D)
    cfgs = (*cfg, need_grad)
    return _Scan2d.apply(1, cfgs, u, dt_t, dt_l, None, B_t, B_l, C, A_t, A_l, D, None)
