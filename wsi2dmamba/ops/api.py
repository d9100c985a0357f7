"""Public entry points of the 2D selective scans and their backend choice."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

from wsi2dmamba.errors import ConfigError
from wsi2dmamba.ops.reference import mamba2d_scan_reference, selective_scan_2d_reference

if TYPE_CHECKING:
    from wsi2dmamba.ops.cupy_scans import ScanTuning

BACKENDS = ("auto", "torch", "cupy")


@functools.lru_cache(maxsize=1)
def cupy_available() -> bool:
    """True when CuPy imports and sees a CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # ImportError, or a CuPy without a usable driver
        return False


def _use_cupy(backend: str, u: torch.Tensor) -> bool:
    if backend not in BACKENDS:
        raise ConfigError(f"unknown scan backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return False
    if backend == "cupy":
        if not u.is_cuda:
            raise ConfigError("backend='cupy' needs CUDA tensors; move the inputs to a GPU or use backend='torch'")
        if not cupy_available():
            raise ConfigError(
                "backend='cupy' needs CuPy: install wsi2dmamba[cuda12] or wsi2dmamba[cuda13] "
                "to match your CUDA driver, or use backend='torch'"
            )
        return True
    return u.is_cuda and cupy_available()


def _check_shape(name: str, t: torch.Tensor | None, shape: tuple[int, ...]) -> None:
    if t is not None and tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def _check_common(u, A_list, BC_list, E_list=(), cell_list=()):
    if u.dim() != 4:
        raise ValueError(f"u must be (batch, E, H, W), got shape {tuple(u.shape)}")
    b, e, h, w = u.shape
    n = None
    for name, a in A_list:
        if a.dim() != 2 or a.shape[0] != e:
            raise ValueError(f"{name} must be (E={e}, N), got shape {tuple(a.shape)}")
        n = a.shape[1] if n is None else n
        _check_shape(name, a, (e, n))
    for name, t in BC_list:
        _check_shape(name, t, (b, n, h, w))
    for name, t in E_list:
        _check_shape(name, t, (e,))
    for name, t in cell_list:
        _check_shape(name, t, (b, e, h, w))
    tensors = [u] + [t for _, t in (*A_list, *BC_list, *E_list, *cell_list) if t is not None]
    if len({t.device for t in tensors}) > 1:
        raise ValueError("all scan inputs must be on the same device")
    if h < 1 or w < 1 or e < 1 or n < 1:
        raise ValueError(f"empty scan: batch={b}, E={e}, N={n}, H={h}, W={w}")


def selective_scan_2d(u, dt, A, B, C, D=None, z=None, dt_bias=None, *, backend: str = "auto",
                      tuning: ScanTuning | None = None):
    """The 2DMamba 2D selective scan (``docs/scans.md`` §1).

    Per channel e and state n: ``g[i,j] = Abar*g[i,j-1] + dt*B*u`` along each row, then
    ``h[i,j] = Abar*h[i-1,j] + g[i,j]`` down each column, ``y = sum_n C*h + D*u``, ``out = y*silu(z)``,
    with ``dt = softplus(dt + dt_bias)`` and ``Abar = exp(dt*A)``.

    Args:
        u, dt, z: (batch, E, H, W); ``dt`` raw (before bias and softplus); ``z`` optional gate.
        A: (E, N), negative. B, C: (batch, N, H, W). D, dt_bias: (E,) or None.
        backend: "torch" (reference), "cupy" (CUDA kernels) or "auto" (kernels on CUDA tensors when
            CuPy is installed, else the reference).
        tuning: how the CUDA kernels are laid out (:class:`~wsi2dmamba.ops.cupy_scans.ScanTuning`; None:
            the defaults). It never changes the result; the reference ignores it.
    Returns:
        (batch, E, H, W) in ``u``'s dtype; the state is kept in float32 (float64 for float64 inputs).
    """
    _check_common(u, [("A", A)], [("B", B), ("C", C)], [("D", D), ("dt_bias", dt_bias)], [("dt", dt), ("z", z)])
    if _use_cupy(backend, u):
        from wsi2dmamba.ops.cupy_scans import selective_scan_2d_cupy

        return selective_scan_2d_cupy(u, dt, A, B, C, D, z, dt_bias, tuning=tuning)
    return selective_scan_2d_reference(u, dt, A, B, C, D, z, dt_bias)


def mamba2d_scan(u, dt_t, dt_l, A_t, A_l, B_t, B_l, C, D=None, *, backend: str = "auto",
                 tuning: ScanTuning | None = None):
    """The Mamba2D (M2D-SSM) 2D scan (``docs/scans.md`` §2).

    ``h = ½(AbarL*h_left + dt_l*B_l*u + AbarT*h_up + dt_t*B_t*u)`` inside the grid, plain 1D scans on
    the first row (horizontal) and first column (vertical), ``y = sum_n C*h + D*u``.

    Args:
        u, dt_t, dt_l: (batch, E, H, W); the steps are already positive (no softplus here).
        A_t, A_l: (E, N), negative. B_t, B_l, C: (batch, N, H, W). D: (E,) or None.
        backend, tuning: as in :func:`selective_scan_2d`.
    Returns:
        (batch, E, H, W) in ``u``'s dtype.
    """
    _check_common(
        u,
        [("A_t", A_t), ("A_l", A_l)],
        [("B_t", B_t), ("B_l", B_l), ("C", C)],
        [("D", D)],
        [("dt_t", dt_t), ("dt_l", dt_l)],
    )
    if _use_cupy(backend, u):
        from wsi2dmamba.ops.cupy_scans import mamba2d_scan_cupy

        return mamba2d_scan_cupy(u, dt_t, dt_l, A_t, A_l, B_t, B_l, C, D, tuning=tuning)
    return mamba2d_scan_reference(u, dt_t, dt_l, A_t, A_l, B_t, B_l, C, D)
