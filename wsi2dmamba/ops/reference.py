"""Plain PyTorch references of the two 2D selective scans (``docs/scans.md``).

Both run on CPU or GPU, differentiate with autograd and are the ground truth of the CuPy kernels.
Layouts: ``u, dt, z`` are (batch, E, H, W); ``A`` is (E, N); ``B, C`` are (batch, N, H, W);
``D, dt_bias`` are (E,). The recurrence runs in float32 for half-precision inputs (float64 stays
float64) and the output is cast back to ``u``'s dtype.

Vectorisation: the 2DMamba scan is a horizontal scan of every row at once (W steps) followed by a
vertical scan of every column at once (H steps). The Mamba2D scan sweeps the rows (H steps), each a
1D scan along the row (W steps) whose input depends on the row above.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the recurrence is computed in: float64 stays float64, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def linear_scan(a: torch.Tensor, b: torch.Tensor, dim: int, h0: torch.Tensor | None = None) -> torch.Tensor:
    """``h[k] = a[k] * h[k-1] + b[k]`` along ``dim`` with ``h[-1] = h0`` (zero when None).

    One step per position, each on a whole slab, so autograd keeps only slabs (no quadratic memory).
    """
    steps = []
    h = h0
    for a_k, b_k in zip(a.unbind(dim), b.unbind(dim)):
        h = b_k if h is None else torch.addcmul(b_k, a_k, h)
        steps.append(h)
    return torch.stack(steps, dim)


def _expand_ssm_inputs(u, dt, A, B):
    """Return ``exp(dt*A)`` and ``dt*B*u``, both (batch, E, N, H, W)."""
    dt5 = dt.unsqueeze(2)  # (b, E, 1, H, W)
    abar = torch.exp(dt5 * A[None, :, :, None, None])
    bx = dt5 * u.unsqueeze(2) * B.unsqueeze(1)
    return abar, bx


def _readout(h, u, C, D):
    """``y = sum_n C*h + D*u`` for states ``h`` (batch, E, N, H, W)."""
    y = torch.einsum("benhw,bnhw->behw", h, C)
    if D is not None:
        y = y + D[None, :, None, None] * u
    return y


def selective_scan_2d_reference(u, dt, A, B, C, D=None, z=None, dt_bias=None):
    """The 2DMamba scan (``docs/scans.md`` §1), with ``dt = softplus(dt + dt_bias)`` and gate ``y * silu(z)``.

    Args:
        u, dt, z: (batch, E, H, W); ``dt`` is the raw step before the bias and softplus.
        A: (E, N), negative. B, C: (batch, N, H, W). D, dt_bias: (E,) or None.
    Returns:
        (batch, E, H, W) in ``u``'s dtype.
    """
    out_dtype = u.dtype
    sd = state_dtype(out_dtype)
    u, dt, A, B, C = (t.to(sd) for t in (u, dt, A, B, C))
    if dt_bias is not None:
        dt = dt + dt_bias.to(sd)[None, :, None, None]
    dt = F.softplus(dt)
    abar, bx = _expand_ssm_inputs(u, dt, A, B)
    g = linear_scan(abar, bx, dim=4)  # along each row
    h = linear_scan(abar, g, dim=3)  # down each column, same decay
    y = _readout(h, u, C, None if D is None else D.to(sd))
    if z is not None:
        y = y * F.silu(z.to(sd))
    return y.to(out_dtype)


def mamba2d_scan_reference(u, dt_t, dt_l, A_t, A_l, B_t, B_l, C, D=None):
    """The Mamba2D scan (``docs/scans.md`` §2): two decays, the ½ average inside the grid.

    Args:
        u, dt_t, dt_l: (batch, E, H, W); ``dt_t``/``dt_l`` are the already positive vertical/horizontal steps.
        A_t, A_l: (E, N). B_t, B_l, C: (batch, N, H, W). D: (E,) or None.
    Returns:
        (batch, E, H, W) in ``u``'s dtype.
    """
    out_dtype = u.dtype
    sd = state_dtype(out_dtype)
    u, dt_t, dt_l, A_t, A_l, B_t, B_l, C = (t.to(sd) for t in (u, dt_t, dt_l, A_t, A_l, B_t, B_l, C))
    abar_t, u_t = _expand_ssm_inputs(u, dt_t, A_t, B_t)
    abar_l, u_l = _expand_ssm_inputs(u, dt_l, A_l, B_l)
    # one unbind per tensor: its backward is a single stack, not one zero-filled copy per row
    abar_t, u_t, abar_l, u_l = (t.unbind(3) for t in (abar_t, u_t, abar_l, u_l))
    rows = [linear_scan(abar_l[0], u_l[0], dim=3)]  # first row: plain scan, (b, E, N, W)
    for i in range(1, u.shape[2]):
        above = torch.addcmul(u_t[i], abar_t[i], rows[-1])
        # first column: vertical term only; inside the grid: half of both terms
        v = torch.cat([above[..., :1], 0.5 * (above[..., 1:] + u_l[i][..., 1:])], dim=-1)
        rows.append(linear_scan(0.5 * abar_l[i], v, dim=3))
    h = torch.stack(rows, dim=3)
    y = _readout(h, u, C, None if D is None else D.to(sd))
    return y.to(out_dtype)
