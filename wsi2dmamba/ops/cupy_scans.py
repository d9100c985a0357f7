"""CuPy RawKernel backend of the 2D scans: compile ``scan2d.cu`` at first use, launch on PyTorch's stream.

The kernels (``wsi2dmamba/kernels/scan2d.cu``, see its header) sweep the rows of each
(batch, channel) grid in one thread block, keep the hidden states on chip and save one row of states
every ``R`` rows for the backward, which recomputes the states of each segment of ``R`` rows.
Tensors go to CuPy through DLPack (no copy); compiled modules are cached per configuration.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import torch

KERNEL_FILE = Path(__file__).resolve().parent.parent / "kernels" / "scan2d.cu"
IN_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# Shared memory the backward may use for its recomputed rows: two blocks still fit on an H100 SM.
BWD_SMEM_BUDGET = 100 * 1024
SMEM_LIMIT = 227 * 1024
FIXED_SCALE = 2.0**-32  # the kernels' int64 fixed point of dB and dC
# States per thread of the forward and the backward: fewer means more warps per block to hide the
# latency of each row step; the backward also needs shared memory for its recomputed rows.
STATES_PER_THREAD = 4
BWD_STATES_PER_THREAD = 4


@dataclass(frozen=True)
class LaunchConfig:
    """Thread layout of one (batch, channel) block: see the header of ``scan2d.cu``."""

    n_state: int
    states_per_thread: int
    cols_per_thread: int
    col_warps: int
    seg_rows: int

    @property
    def groups(self) -> int:
        return self.n_state // self.states_per_thread

    @property
    def block(self) -> tuple[int, int, int]:
        return (32 * self.col_warps, self.groups, 1)

    @property
    def row_cap(self) -> int:
        return 32 * self.col_warps * self.cols_per_thread

    def fwd_smem(self) -> int:
        return 4 * (self.groups * self.states_per_thread * self.col_warps * 2 + self.groups * self.row_cap)

    def bwd_smem(self, width: int) -> int:
        scratch = self.groups * self.states_per_thread * self.col_warps * 2 + 3 * self.groups * self.row_cap
        return 4 * (scratch + (self.seg_rows + 1) * self.n_state * width)


def launch_config(
    n_state: int, height: int, width: int, states_per_thread: int = STATES_PER_THREAD, smem_budget: int = BWD_SMEM_BUDGET
) -> LaunchConfig | None:
    """Pick the layout for a grid; None when a row of states does not fit the kernels' limits."""
    s = states_per_thread if n_state % states_per_thread == 0 else 1
    if width <= 256:
        k, cw = max(1, math.ceil(width / 32)), 1
    else:
        k = 8
        cw = math.ceil(width / (32 * k))
    while 32 * cw * (n_state // s) > 1024 and n_state % (2 * s) == 0:
        s *= 2
    if 32 * cw * (n_state // s) > 1024:
        return None
    cfg = LaunchConfig(n_state, s, k, cw, 1)
    row_bytes = 4 * n_state * width
    fixed = cfg.bwd_smem(width) - 2 * row_bytes
    rows = max(1, (smem_budget - fixed) // row_bytes - 1)
    rows = min(rows, height)
    cfg = LaunchConfig(n_state, s, k, cw, int(rows))
    if cfg.bwd_smem(width) > SMEM_LIMIT:
        return None
    return cfg


@functools.lru_cache(maxsize=None)
def _kernels(mode: int, in_kind: int, cfg: LaunchConfig, device: int):
    import cupy

    options = (
        f"-DMODE={mode}",
        f"-DIN_KIND={in_kind}",
        f"-DNS={cfg.n_state}",
        f"-DS={cfg.states_per_thread}",
        f"-DK={cfg.cols_per_thread}",
        f"-DCW={cfg.col_warps}",
        "-std=c++17",
    )
    with cupy.cuda.Device(device):
        module = cupy.RawModule(code=KERNEL_FILE.read_text(), options=options)
        fwd = module.get_function("scan2d_fwd")
        bwd = module.get_function("scan2d_bwd")
    return fwd, bwd


def _cp(t: torch.Tensor | None):
    """Zero-copy CuPy view of a tensor (None stays None, passed as a null pointer)."""
    import cupy

    if t is None:
        return None
    return cupy.from_dlpack(t.detach())


def _launch(kernel, tensors_and_ints, grid, cfg: LaunchConfig, smem: int, device: torch.device):
    import cupy
    import numpy as np

    args = []
    for a in tensors_and_ints:
        if a is None:
            args.append(np.uint64(0))
        elif isinstance(a, torch.Tensor):
            args.append(_cp(a))
        else:
            args.append(np.int32(a))
    if smem > 48 * 1024 and kernel.max_dynamic_shared_size_bytes < smem:
        kernel.max_dynamic_shared_size_bytes = smem
    with cupy.cuda.Device(device.index), _cupy_stream(device):
        kernel(grid, cfg.block, tuple(args), shared_mem=smem)


def _cupy_stream(device: torch.device):
    """PyTorch's current stream on ``device`` as a CuPy stream (no new CUDA stream is created)."""
    import cupy

    torch_stream = torch.cuda.current_stream(device)
    try:
        return cupy.cuda.Stream.from_external(torch_stream)
    except (AttributeError, TypeError, ValueError):  # CuPy before the CUDA stream protocol
        return cupy.cuda.ExternalStream(torch_stream.cuda_stream, device.index)


def _prep(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype).contiguous()


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
        # without gradients no checkpoint rows are needed: one segment of all rows
        seg_rows = cfg.seg_rows if need_grad else H
        nseg = math.ceil(H / seg_rows)
        out = torch.empty_like(act[0])
        ckpt = torch.empty((batch * E, max(nseg - 1, 0), cfg.n_state, W), device=u.device, dtype=torch.float32)
        fwd, _ = _kernels(mode, IN_KIND[dtype], cfg_fwd, u.device.index)
        _launch(fwd, [*act, *par, out, ckpt, H, W, E, seg_rows], (batch * E,), cfg_fwd, cfg_fwd.fwd_smem(), u.device)
        ctx.mode, ctx.cfg = mode, cfg
        ctx.in_dtypes = [None if t is None else t.dtype for t in (u, dt1, dt2, z, B1, B2, C, A1, A2, D, dt_bias)]
        ctx.save_for_backward(*act, *par, ckpt)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        u, dt1, dt2, z, B1, B2, C, A1, A2, D, dt_bias, ckpt = ctx.saved_tensors
        mode, cfg = ctx.mode, ctx.cfg
        batch, E, H, W = u.shape
        dtype = u.dtype
        grad_out = grad_out.to(dtype).contiguous()
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
        _, bwd = _kernels(mode, IN_KIND[dtype], cfg, u.device.index)
        args = [u, dt1, dt2, z, B1, B2, C, A1, A2, D, dt_bias, grad_out, ckpt,
                du, ddt1, ddt2, dz, dB1, dB2, dC, dA1, dA2, dD, dbias, H, W, E, cfg.seg_rows]
        _launch(bwd, args, (batch * E,), cfg, cfg.bwd_smem(W), u.device)
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


def _config_or_none(u, n_state):
    """(forward, backward) layouts, or None when the grid is beyond the kernels."""
    _, _, H, W = u.shape
    fwd = launch_config(n_state, H, W, STATES_PER_THREAD, BWD_SMEM_BUDGET)
    bwd = launch_config(n_state, H, W, BWD_STATES_PER_THREAD, BWD_SMEM_BUDGET)
    return None if fwd is None or bwd is None else (fwd, bwd)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def selective_scan_2d_cupy(u, dt, A, B, C, D=None, z=None, dt_bias=None):
    """The 2DMamba scan on the CUDA kernels (same contract as ``selective_scan_2d``)."""
    cfg = _config_or_none(u, A.shape[1])
    if cfg is None:
        from wsi2dmamba.ops.reference import selective_scan_2d_reference

        return selective_scan_2d_reference(u, dt, A, B, C, D, z, dt_bias)
    cfgs = (*cfg, _needs_grad(u, dt, A, B, C, D, z, dt_bias))
    return _Scan2d.apply(0, cfgs, u, dt, None, z, B, None, C, A, None, D, dt_bias)


def mamba2d_scan_cupy(u, dt_t, dt_l, A_t, A_l, B_t, B_l, C, D=None):
    """The Mamba2D scan on the CUDA kernels (same contract as ``mamba2d_scan``)."""
    cfg = _config_or_none(u, A_t.shape[1])
    if cfg is None:
        from wsi2dmamba.ops.reference import mamba2d_scan_reference

        return mamba2d_scan_reference(u, dt_t, dt_l, A_t, A_l, B_t, B_l, C, D)
    cfgs = (*cfg, _needs_grad(u, dt_t, dt_l, A_t, A_l, B_t, B_l, C, D))
    return _Scan2d.apply(1, cfgs, u, dt_t, dt_l, None, B_t, B_l, C, A_t, A_l, D, None)
