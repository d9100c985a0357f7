"""The PyTorch references of the 2D scans against per-cell loops of their definitions (docs/scans.md)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wsi2dmamba.errors import ConfigError
from wsi2dmamba.ops import mamba2d_scan, selective_scan_2d

SHAPE_CLASSES = [(1, 1), (1, 6), (5, 1), (3, 4), (4, 3), (5, 7)]


def _inputs_2dmamba(batch, E, N, H, W, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=dtype)

    return dict(
        u=r(batch, E, H, W),
        dt=r(batch, E, H, W) * 0.5 - 1.0,
        A=-torch.exp(r(E, N) * 0.5),
        B=r(batch, N, H, W),
        C=r(batch, N, H, W),
        D=r(E),
        z=r(batch, E, H, W),
        dt_bias=r(E) * 0.3,
    )


def _inputs_mamba2d(batch, E, N, H, W, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=dtype)

    return dict(
        u=r(batch, E, H, W),
        dt_t=F.softplus(r(batch, E, H, W) - 1.0),
        dt_l=F.softplus(r(batch, E, H, W) - 1.0),
        A_t=-torch.exp(r(E, N) * 0.5),
        A_l=-torch.exp(r(E, N) * 0.5),
        B_t=r(batch, N, H, W),
        B_l=r(batch, N, H, W),
        C=r(batch, N, H, W),
        D=r(E),
    )


def naive_2dmamba(u, dt, A, B, C, D, z, dt_bias):
    """Per-cell loop of scans.md §1, vectorised only over (batch, E, N)."""
    b, E, H, W = u.shape
    dt = F.softplus(dt + dt_bias[None, :, None, None])
    g = [[None] * W for _ in range(H)]
    h = [[None] * W for _ in range(H)]
    y = torch.zeros_like(u)
    for i in range(H):
        for j in range(W):
            abar = torch.exp(dt[:, :, i, j, None] * A)  # (b, E, N)
            bx = dt[:, :, i, j, None] * B[:, None, :, i, j] * u[:, :, i, j, None]
            g[i][j] = bx + (abar * g[i][j - 1] if j > 0 else 0)
            h[i][j] = g[i][j] + (abar * h[i - 1][j] if i > 0 else 0)
            y[:, :, i, j] = (h[i][j] * C[:, None, :, i, j]).sum(-1) + D * u[:, :, i, j]
    return y * F.silu(z)


def naive_mamba2d(u, dt_t, dt_l, A_t, A_l, B_t, B_l, C, D):
    """Per-cell loop of scans.md §2 with its boundary rules."""
    b, E, H, W = u.shape
    h = [[None] * W for _ in range(H)]
    y = torch.zeros_like(u)
    for i in range(H):
        for j in range(W):
            at = torch.exp(dt_t[:, :, i, j, None] * A_t)
            al = torch.exp(dt_l[:, :, i, j, None] * A_l)
            ut = dt_t[:, :, i, j, None] * B_t[:, None, :, i, j] * u[:, :, i, j, None]
            ul = dt_l[:, :, i, j, None] * B_l[:, None, :, i, j] * u[:, :, i, j, None]
            if i == 0 and j == 0:
                h[i][j] = ul
            elif i == 0:
                h[i][j] = al * h[i][j - 1] + ul
            elif j == 0:
                h[i][j] = at * h[i - 1][j] + ut
            else:
                h[i][j] = 0.5 * (al * h[i][j - 1] + ul + at * h[i - 1][j] + ut)
            y[:, :, i, j] = (h[i][j] * C[:, None, :, i, j]).sum(-1) + D * u[:, :, i, j]
    return y


def mamba_1d(u, dt, A, B, C, D):
    """Mamba's 1D selective scan along the last axis; u, dt (b, E, L), B, C (b, N, L)."""
    h = 0
    ys = []
    for k in range(u.shape[-1]):
        h = torch.exp(dt[..., k, None] * A) * h + dt[..., k, None] * B[:, None, :, k] * u[..., k, None]
        ys.append((h * C[:, None, :, k]).sum(-1) + D * u[..., k])
    return torch.stack(ys, -1)


@pytest.mark.parametrize("H,W", SHAPE_CLASSES)
def test_2dmamba_matches_per_cell_loop(H, W):
    x = _inputs_2dmamba(2, 3, 4, H, W)
    got = selective_scan_2d(**x, backend="torch")
    torch.testing.assert_close(got, naive_2dmamba(**x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("H,W", SHAPE_CLASSES)
def test_mamba2d_matches_per_cell_loop(H, W):
    x = _inputs_mamba2d(2, 3, 4, H, W)
    got = mamba2d_scan(**x, backend="torch")
    torch.testing.assert_close(got, naive_mamba2d(**x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("H,W", SHAPE_CLASSES)
def test_2dmamba_gradcheck(H, W):
    x = {k: v.requires_grad_() for k, v in _inputs_2dmamba(2, 2, 3, H, W).items()}
    assert torch.autograd.gradcheck(lambda *a: selective_scan_2d(*a, backend="torch"), tuple(x.values()))


@pytest.mark.parametrize("H,W", SHAPE_CLASSES)
def test_mamba2d_gradcheck(H, W):
    x = {k: v.requires_grad_() for k, v in _inputs_mamba2d(2, 2, 3, H, W).items()}
    assert torch.autograd.gradcheck(lambda *a: mamba2d_scan(*a, backend="torch"), tuple(x.values()))


def test_2dmamba_single_row_and_column_are_mamba_1d():
    x = _inputs_2dmamba(2, 3, 4, 1, 9)
    dt = F.softplus(x["dt"] + x["dt_bias"][None, :, None, None])
    want = mamba_1d(x["u"][:, :, 0], dt[:, :, 0], x["A"], x["B"][:, :, 0], x["C"][:, :, 0], x["D"])
    want = want * F.silu(x["z"][:, :, 0])
    torch.testing.assert_close(selective_scan_2d(**x, backend="torch")[:, :, 0], want)
    # a column is the same 1D scan read top to bottom
    xt = {k: (v.transpose(-1, -2) if v.dim() == 4 else v) for k, v in x.items()}
    torch.testing.assert_close(selective_scan_2d(**xt, backend="torch")[:, :, :, 0], want)


def test_mamba2d_first_row_and_column_are_1d_scans():
    x = _inputs_mamba2d(1, 3, 4, 6, 7)
    y = mamba2d_scan(**x, backend="torch")
    row = mamba_1d(x["u"][:, :, 0], x["dt_l"][:, :, 0], x["A_l"], x["B_l"][:, :, 0], x["C"][:, :, 0], x["D"])
    torch.testing.assert_close(y[:, :, 0], row)
    # the first column starts from the horizontal input at (0, 0), then follows the vertical parameters
    col = x["dt_l"][:, :, 0, 0, None] * x["B_l"][:, None, :, 0, 0] * x["u"][:, :, 0, 0, None]
    want = [(col * x["C"][:, None, :, 0, 0]).sum(-1) + x["D"] * x["u"][:, :, 0, 0]]
    for i in range(1, 6):
        col = torch.exp(x["dt_t"][:, :, i, 0, None] * x["A_t"]) * col
        col = col + x["dt_t"][:, :, i, 0, None] * x["B_t"][:, None, :, i, 0] * x["u"][:, :, i, 0, None]
        want.append((col * x["C"][:, None, :, i, 0]).sum(-1) + x["D"] * x["u"][:, :, i, 0])
    torch.testing.assert_close(y[:, :, :, 0], torch.stack(want, -1))


def test_very_negative_A_sees_only_its_own_cell():
    x = _inputs_2dmamba(2, 3, 4, 5, 6)
    x["A"] = torch.full_like(x["A"], -1e4)
    dt = F.softplus(x["dt"] + x["dt_bias"][None, :, None, None])
    own = dt * x["u"] * torch.einsum("bnhw,bnhw->bhw", x["B"], x["C"])[:, None] + x["D"][:, None, None] * x["u"]
    torch.testing.assert_close(selective_scan_2d(**x, backend="torch"), own * F.silu(x["z"]))

    m = _inputs_mamba2d(2, 3, 4, 5, 6)
    m["A_t"] = torch.full_like(m["A_t"], -1e4)
    m["A_l"] = torch.full_like(m["A_l"], -1e4)
    got = mamba2d_scan(**m, backend="torch")
    bt = m["dt_t"] * torch.einsum("bnhw,bnhw->bhw", m["B_t"], m["C"])[:, None]
    bl = m["dt_l"] * torch.einsum("bnhw,bnhw->bhw", m["B_l"], m["C"])[:, None]
    weight_t = torch.full((5, 6), 0.5, dtype=torch.float64)
    weight_t[:, 0], weight_t[0, :] = 1.0, 0.0
    weight_l = torch.full((5, 6), 0.5, dtype=torch.float64)
    weight_l[0, :], weight_l[1:, 0] = 1.0, 0.0
    want = m["u"] * (weight_t * bt + weight_l * bl) + m["D"][:, None, None] * m["u"]
    torch.testing.assert_close(got, want)


def test_constant_decay_impulse_responses():
    """A unit impulse at (1, 2) spreads as a^(di+dj) (2DMamba) and (a/2)^L·binom(L, di) (Mamba2D, interior)."""
    H, W, a = 6, 7, 0.8
    u = torch.zeros(1, 1, H, W, dtype=torch.float64)
    u[0, 0, 1, 2] = 1.0
    dt = torch.ones_like(u)
    A = torch.full((1, 1), math.log(a), dtype=torch.float64)
    ones = torch.ones(1, 1, H, W, dtype=torch.float64)
    raw = torch.full_like(u, math.log(math.expm1(1.0)))  # softplus(raw) == 1
    y = selective_scan_2d(u, raw, A, ones, ones)
    m = mamba2d_scan(u, dt, dt, A, A, ones, ones, ones)
    for i in range(H):
        for j in range(W):
            di, dj = i - 1, j - 2
            inside = di >= 0 and dj >= 0
            assert y[0, 0, i, j].item() == pytest.approx(a ** (di + dj) if inside else 0.0, abs=1e-12)
            # the source is interior, so its own input is ½ uT + ½ uL = 1
            wantm = (a / 2) ** (di + dj) * math.comb(di + dj, di) if inside else 0.0
            assert m[0, 0, i, j].item() == pytest.approx(wantm, abs=1e-12)


def test_half_precision_inputs_keep_fp32_state():
    x32 = _inputs_2dmamba(1, 4, 4, 9, 11, dtype=torch.float32)
    xb = {k: v.to(torch.bfloat16) for k, v in x32.items()}
    yb = selective_scan_2d(**xb, backend="torch")
    assert yb.dtype == torch.bfloat16
    ref = selective_scan_2d(**{k: v.float() for k, v in xb.items()}, backend="torch")
    torch.testing.assert_close(yb.float(), ref, rtol=1e-2, atol=1e-2)


def test_bad_arguments_raise_clear_errors():
    x = _inputs_2dmamba(1, 2, 3, 4, 4)
    with pytest.raises(ConfigError, match="unknown scan backend"):
        selective_scan_2d(**x, backend="triton")
    with pytest.raises(ConfigError, match="CUDA tensors"):
        selective_scan_2d(**x, backend="cupy")
    bad = dict(x, B=x["B"][:, :2])
    with pytest.raises(ValueError, match="B must have shape"):
        selective_scan_2d(**bad)
    with pytest.raises(ValueError, match="u must be"):
        selective_scan_2d(**dict(x, u=x["u"][0]))
