"""The CuPy kernels of the 2D scans against the PyTorch references (run with: pytest -m gpu)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wsi2dmamba.ops import ScanTuning, cupy_available, mamba2d_scan, selective_scan_2d

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and cupy_available()), reason="needs a CUDA GPU and CuPy"),
]

SHAPES = [(1, 1, 1), (2, 1, 9), (2, 7, 1), (1, 5, 13), (2, 33, 40), (1, 70, 45), (1, 12, 300), (1, 9, 391)]


def _inputs(kind, batch, E, N, H, W, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g, device="cuda", dtype=torch.float64)

    if kind == "2dmamba":
        x = dict(u=r(batch, E, H, W), dt=r(batch, E, H, W) * 0.5 - 1.0, A=-torch.exp(r(E, N) * 0.5),
                 B=r(batch, N, H, W), C=r(batch, N, H, W), D=r(E), z=r(batch, E, H, W), dt_bias=r(E) * 0.3)
    else:
        x = dict(u=r(batch, E, H, W), dt_t=F.softplus(r(batch, E, H, W) - 1.0),
                 dt_l=F.softplus(r(batch, E, H, W) - 1.0), A_t=-torch.exp(r(E, N) * 0.5),
                 A_l=-torch.exp(r(E, N) * 0.5), B_t=r(batch, N, H, W), B_l=r(batch, N, H, W),
                 C=r(batch, N, H, W), D=r(E))
    return {k: v.to(dtype) if v.dim() == 4 else v.float() for k, v in x.items()}


def _run(kind, x, backend, dout, tuning=None):
    x = {k: v.detach().clone().requires_grad_() for k, v in x.items()}
    fn = selective_scan_2d if kind == "2dmamba" else mamba2d_scan
    y = fn(**x, backend=backend, tuning=tuning)
    y.backward(dout)
    return y.detach(), {k: v.grad for k, v in x.items()}


def _assert_matches_reference(kind, x, dout, tuning=None):
    """Output and every gradient of the kernels (laid out by ``tuning``) against the float64 reference
    (fp32 tolerances); returns the kernels' output."""
    y, grads = _run(kind, x, "cupy", dout, tuning)
    y_ref, grads_ref = _run(kind, {k: v.double() for k, v in x.items()}, "torch", dout.double())
    assert _rel(y, y_ref) <= 1e-5
    for name in grads_ref:
        assert _rel(grads[name], grads_ref[name]) <= 1e-4, name
    return y


def _rel(got, want):
    if want is None:  # the reference graph does not reach it (e.g. A on a 1x1 grid): the gradient is zero
        return got.abs().max().item()
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


# the 2DMamba backward runs on tiles by default; "2dmamba-rows" forces the row-sweep backward
KINDS = ["2dmamba", "2dmamba-rows", "mamba2d"]


def _backward_of(kind, **forced):
    """The scan of a KINDS entry and its kernels' tuning (``forced`` fields set), with the row-sweep
    2DMamba backward forced for "2dmamba-rows"."""
    if kind == "2dmamba-rows":
        return "2dmamba", ScanTuning(tiled_backward=False, **forced)
    return kind, ScanTuning(**forced)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch,H,W", SHAPES)
@pytest.mark.parametrize("N", [16, 5])
def test_fp32_kernels_match_reference(kind, batch, H, W, N):
    kind, tuning = _backward_of(kind)
    x = _inputs(kind, batch, 6, N, H, W, torch.float32, seed=H * 1000 + W)
    dout = torch.randn(batch, 6, H, W, device="cuda")
    assert _assert_matches_reference(kind, x, dout, tuning).dtype == torch.float32


@pytest.mark.parametrize("kind", ["2dmamba", "mamba2d"])
@pytest.mark.parametrize("batch,H,W", [(1, 1, 1), (2, 7, 1), (2, 33, 40), (1, 70, 45), (1, 12, 300)])
@pytest.mark.parametrize("N", [16, 5])
def test_forward_without_gradients_matches_reference(kind, batch, H, W, N):
    # without gradients no rows of states are kept (nothing to checkpoint)
    x = _inputs(kind, batch, 6, N, H, W, torch.float32, seed=H * 7 + W)
    fn = selective_scan_2d if kind == "2dmamba" else mamba2d_scan
    out = torch.full((batch, 6, H, W), float("nan"), device="cuda")
    with torch.no_grad():
        out.copy_(fn(**x, backend="cupy"))
        want = fn(**{k: v.double() for k, v in x.items()}, backend="torch")
    assert torch.isfinite(out).all()
    assert _rel(out, want) <= 1e-5


@pytest.mark.parametrize("batch,H,W", SHAPES + [(1, 40, 225), (2, 64, 64), (1, 3, 33)])
@pytest.mark.parametrize("N,E", [(16, 6), (5, 3)])
@pytest.mark.parametrize("tiled_backward", [True, False])
def test_tiled_2dmamba_forward_matches_reference(batch, H, W, N, E, tiled_backward):
    # the tiled forward on every shape class (it runs only rows wider than 224 columns by default), with and
    # without gradients: its checkpoint rows (and horizontal carries) feed either backward
    tuning = ScanTuning(tiled_forward=True, tiled_backward=tiled_backward)
    x = _inputs("2dmamba", batch, E, N, H, W, torch.float32, seed=H * 7 + W)
    x64 = {k: v.double() for k, v in x.items()}
    with torch.no_grad():
        got = selective_scan_2d(**x, backend="cupy", tuning=tuning)
        assert _rel(got, selective_scan_2d(**x64, backend="torch")) <= 1e-5
    dout = torch.randn(batch, E, H, W, device="cuda")
    _assert_matches_reference("2dmamba", x, dout, tuning)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("W", [37, 260])
def test_tiled_2dmamba_forward_half_inputs(dtype, W):
    x = _inputs("2dmamba", 2, 8, 16, 23, W, dtype, seed=W)
    with torch.no_grad():
        y = selective_scan_2d(**x, backend="cupy", tuning=ScanTuning(tiled_forward=True))
        y_ref = selective_scan_2d(**{k: v.double() for k, v in x.items()}, backend="torch")
    assert y.dtype == dtype
    assert _rel(y, y_ref) <= (1e-2 if dtype == torch.bfloat16 else 2e-3)


@pytest.mark.parametrize("batch,H,W", [(1, 1, 1), (1, 1, 40), (1, 40, 1), (2, 37, 70), (1, 16, 32), (2, 17, 33),
                                     (1, 64, 225), (1, 5, 391)])
@pytest.mark.parametrize("N,states,channels", [(16, None, 2), (16, None, 1), (16, 4, 2), (5, None, 2), (6, None, 2),
                                              (32, None, None)])
def test_tiled_2dmamba_backward_matches_reference(batch, H, W, N, states, channels):
    # every tile boundary case (a single cell, one row, one column, partial tiles on both sides, exact
    # tiles, several bands and chunks) and each block layout: 2 states per warp (16-row tiles), 4 (8-row
    # tiles) and 1 for odd N (32-row tiles), over 1 to 16 warps; two channels per block (E = 5 leaves the
    # last block one) and one (the default for so few channels, and where two do not fit: N = 32)
    tuning = ScanTuning(tiled_backward=True, tile_backward_states=states, tile_backward_channels=channels)
    x = _inputs("2dmamba", batch, 5, N, H, W, torch.float32, seed=H * 31 + W + N)
    dout = torch.randn(batch, 5, H, W, device="cuda")
    _assert_matches_reference("2dmamba", x, dout, tuning)


@pytest.mark.parametrize("channels", [1, 2])
def test_tiled_2dmamba_backward_without_gate_or_skip(channels):
    # z, D and dt_bias are optional: the tiled backward's ungated path and absent parameters
    tuning = ScanTuning(tiled_backward=True, tile_backward_channels=channels)
    x = _inputs("2dmamba", 2, 3, 16, 21, 45, torch.float32, seed=11)
    for key in ("z", "D", "dt_bias"):
        x.pop(key)
    dout = torch.randn(2, 3, 21, 45, device="cuda")
    _assert_matches_reference("2dmamba", x, dout, tuning)


@pytest.mark.parametrize("kind", ["2dmamba-rows", "mamba2d"])
@pytest.mark.parametrize("fwd_states,bwd_states", [(4, 4), (1, 2), (2, 1)])
def test_other_thread_layouts_match_reference(kind, fwd_states, bwd_states):
    kind, tuning = _backward_of(kind, states_per_thread=fwd_states, bwd_states_per_thread=bwd_states)
    x = _inputs(kind, 2, 6, 16, 19, 40, torch.float32, seed=fwd_states * 10 + bwd_states)
    dout = torch.randn(2, 6, 19, 40, device="cuda")
    _assert_matches_reference(kind, x, dout, tuning)


@pytest.mark.parametrize("kind", ["2dmamba", "mamba2d"])
@pytest.mark.parametrize("define", ["PF_ROWS=2", "EARLY_C=0", "NO_PREFETCH"])
def test_kernel_variants_compute_the_same_scan(kind, define):
    # the compile-time variants a tuning may select through extra_options: each compiles to its own module
    # and gives the default kernels' results to float rounding
    tuning = ScanTuning(extra_options=(f"-D{define}",))
    x = _inputs(kind, 2, 6, 16, 19, 40, torch.float32, seed=17)
    dout = torch.randn(2, 6, 19, 40, device="cuda")
    _assert_matches_reference(kind, x, dout, tuning)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("W", [64, 65, 160, 161, 224, 225, 256])
def test_every_width_rule_matches_reference(kind, W):
    """The default layouts change with the row width (cupy_scans.*_states_per_thread): each side of
    every boundary of those rules, with gradients, against the reference."""
    kind, tuning = _backward_of(kind)
    x = _inputs(kind, 1, 3, 16, 9, W, torch.float32, seed=W)
    dout = torch.randn(1, 3, 9, W, device="cuda")
    _assert_matches_reference(kind, x, dout, tuning)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_kernels_match_reference(kind, dtype):
    kind, tuning = _backward_of(kind)
    x = _inputs(kind, 2, 8, 16, 23, 37, dtype, seed=7)
    dout = torch.randn(2, 8, 23, 37, device="cuda").to(dtype)
    y, grads = _run(kind, x, "cupy", dout, tuning)
    y_ref, grads_ref = _run(kind, {k: v.double() for k, v in x.items()}, "torch", dout.double())
    assert y.dtype == dtype
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert _rel(y, y_ref) <= tol
    for name in grads_ref:
        assert grads[name].dtype == x[name].dtype
        assert _rel(grads[name], grads_ref[name]) <= 2 * tol, name


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_are_bitwise_deterministic(kind):
    kind, tuning = _backward_of(kind)
    x = _inputs(kind, 2, 32, 16, 41, 53, torch.float32, seed=3)
    dout = torch.randn(2, 32, 41, 53, device="cuda")
    _, g1 = _run(kind, x, "cupy", dout, tuning)
    _, g2 = _run(kind, x, "cupy", dout, tuning)
    for name in g1:
        assert torch.equal(g1[name], g2[name]), name


@pytest.mark.parametrize("kind", KINDS)
def test_no_memory_growth_over_many_calls(kind):
    kind, tuning = _backward_of(kind)
    x = _inputs(kind, 1, 16, 16, 20, 24, torch.float32, seed=5)
    dout = torch.randn(1, 16, 20, 24, device="cuda")
    _run(kind, x, "cupy", dout, tuning)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(1000):
        _run(kind, x, "cupy", dout, tuning)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before


def test_kernels_run_on_pytorchs_current_stream():
    x = _inputs("mamba2d", 2, 8, 16, 30, 31, torch.float32, seed=2)
    want = mamba2d_scan(**x, backend="cupy")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = mamba2d_scan(**x, backend="cupy")
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(got, want)


def test_auto_backend_uses_kernels_on_cuda():
    x = _inputs("2dmamba", 1, 4, 16, 6, 7, torch.float32, seed=1)
    x["u"].requires_grad_()
    y = selective_scan_2d(**x)
    assert y.grad_fn is not None and "Scan2d" in type(y.grad_fn).__name__


@pytest.mark.parametrize("kind,W,grad", [("2dmamba", 2500, True), ("mamba2d", 640, True),
                                         ("2dmamba", 1500, False), ("mamba2d", 1500, False),
                                         ("mamba2d", 8192, False)])
def test_widest_rows_run_on_the_kernels(kind, W, grad):
    # the widest rows the Mamba2D backward's shared memory holds, a 2DMamba row past the tiled forward's
    # limit (row-sweep forward, tiled backward), and wider ones without gradients (at 8,192 columns the
    # Mamba2D forward keeps one row of sums and cells, two barriers per row): the kernels, not the
    # reference fallback, must run them
    import warnings

    x = _inputs(kind, 1, 4, 16, 3, W, torch.float32, seed=W)
    dout = torch.randn(1, 4, 3, W, device="cuda")
    x64 = {k: v.double() for k, v in x.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        if grad:
            y, grads = _run(kind, x, "cupy", dout)
        else:
            fn = selective_scan_2d if kind == "2dmamba" else mamba2d_scan
            with torch.no_grad():
                y = fn(**x, backend="cupy")
    if grad:
        y_ref, grads_ref = _run(kind, x64, "torch", dout.double())
        for name in grads_ref:
            assert _rel(grads[name], grads_ref[name]) <= 1e-4, name
    else:
        with torch.no_grad():
            y_ref = (selective_scan_2d if kind == "2dmamba" else mamba2d_scan)(**x64, backend="torch")
    assert _rel(y, y_ref) <= 1e-5
