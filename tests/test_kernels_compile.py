"""Every CUDA source in kernels/ compiles to PTX with nvcc, for each mode and input dtype the loader uses."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from wsi2dmamba.ops import cupy_scans
from wsi2dmamba.ops.cupy_scans import KERNEL_FILE, launch_config

KERNELS = sorted((Path(__file__).resolve().parent.parent / "kernels").glob("*.cu"))
NVCC = shutil.which("nvcc")


def test_kernel_sources_ship_inside_the_package():
    assert KERNEL_FILE.is_file(), KERNEL_FILE
    assert KERNELS and KERNEL_FILE.name in {k.name for k in KERNELS}


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("source", KERNELS, ids=lambda p: p.name)
def test_compiles_to_ptx(source, tmp_path):
    # the multi-warp layouts of wide rows (W > 256: forward, backward) and one single-warp layout with an
    # odd state count
    layouts = [launch_config(16, 40, 391, 2), launch_config(16, 40, 391, 4, wide_cols_per_thread=4),
               launch_config(5, 9, 33, 1)]
    for mode in (0, 1):
        for in_kind in (0, 1, 2):
            for cfg in layouts:
                macros = [f"-DMODE={mode}", f"-DIN_KIND={in_kind}", f"-DNS={cfg.n_state}",
                          f"-DS={cfg.states_per_thread}", f"-DK={cfg.cols_per_thread}", f"-DCW={cfg.col_warps}"]
                out = tmp_path / f"{source.stem}_{mode}_{in_kind}_{cfg.col_warps}.ptx"
                proc = subprocess.run([NVCC, "--ptx", "-arch=sm_90", "-std=c++17", *macros, str(source), "-o", str(out)],
                                      capture_output=True, text=True)
                assert proc.returncode == 0, proc.stderr
                ptx = out.read_text()
                assert ".entry scan2d_fwd" in ptx and ".entry scan2d_bwd" in ptx
                # the tiled 2DMamba forward of wide rows and the tiled 2DMamba backward
                assert (".entry scan2d_tile_fwd" in ptx) == (mode == 0)
                assert (".entry scan2d_tile_bwd" in ptx) == (mode == 0)


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("mode", [0, 1])
def test_forward_compiles_with_one_row_buffer_and_for_pre_hopper_gpus(tmp_path, mode):
    """The row-sweep forward's single-buffered layout (the widest Mamba2D rows) compiles, and the whole
    file compiles for an A100 (sm_80), where the Hopper-only L2 bulk prefetch is left out."""
    cfg = launch_config(16, 3, 8192, 2, mode=mode, backward=False)
    assert cfg is not None and (cfg.fwd_buffers() == 1) == (mode == 1)
    for arch, nbuf in (("sm_90", 1), ("sm_80", 2)):
        out = tmp_path / f"{arch}.ptx"
        macros = [f"-DMODE={mode}", "-DIN_KIND=1", f"-DNS={cfg.n_state}", f"-DS={cfg.states_per_thread}",
                  f"-DK={cfg.cols_per_thread}", f"-DCW={cfg.col_warps}", f"-DNBUF={nbuf}"]
        proc = subprocess.run([NVCC, "--ptx", f"-arch={arch}", "-std=c++17", *macros, str(KERNEL_FILE), "-o", str(out)],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        ptx = out.read_text()
        assert ".entry scan2d_fwd" in ptx
        assert ("cp.async.bulk.prefetch.L2" in ptx) == (arch == "sm_90")


def test_forward_double_buffers_where_it_fits():
    """Two rows of sums and cells (one barrier per row step) wherever they fit the shared memory."""
    for mode in (0, 1):
        for W in (1, 56, 196, 391, 1500):
            cfg = launch_config(16, 64, W, 2, mode=mode, backward=False)
            assert cfg.fwd_buffers() == 2, (mode, W)
            assert cfg.fwd_smem(2) == cfg.fwd_smem(1) + 4 * (cfg.groups + 2 * (1 + mode)) * cfg.row_cap
    wide = launch_config(16, 3, 8192, 2, mode=1, backward=False)
    assert wide.fwd_buffers() == 1 and wide.fwd_smem(1) <= cupy_scans.SMEM_LIMIT < wide.fwd_smem(2)


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("in_kind", [0, 1, 2])
@pytest.mark.parametrize("n_state,channels,states", [(16, 1, 1), (16, 2, 2), (5, 1, 1)])
def test_tiled_forward_compiles_for_each_layout(tmp_path, in_kind, n_state, channels, states):
    out = tmp_path / "tile.ptx"
    macros = ["-DMODE=0", f"-DIN_KIND={in_kind}", f"-DNS={n_state}", "-DS=1", "-DK=1", "-DCW=1",
              f"-DTCH={channels}", f"-DTS={states}"]
    proc = subprocess.run([NVCC, "--ptx", "-arch=sm_90", "-std=c++17", *macros, str(KERNEL_FILE), "-o", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert ".entry scan2d_tile_fwd" in out.read_text()


def test_tiled_forward_takes_rows_wider_than_the_rule(monkeypatch):
    """The tiled 2DMamba forward runs rows wider than TILED_FORWARD_ABOVE columns, with a block that fits
    the shared memory up to the widest rows the backward holds, and never runs the narrower rows."""
    assert cupy_scans.TILED_FORWARD is None
    above = cupy_scans.TILED_FORWARD_ABOVE
    assert cupy_scans.tile_layout(16, above) is None
    for W in (above + 1, 391, 896):
        layout = cupy_scans.tile_layout(16, W)
        assert layout is not None and layout.threads == 512
        assert layout.smem(W) <= cupy_scans.SMEM_LIMIT
    monkeypatch.setattr(cupy_scans, "TILED_FORWARD", True)
    assert cupy_scans.tile_layout(16, 1) is not None
    assert cupy_scans.tile_layout(64, 300) is None  # more than 32 warps: the row sweep runs it
    monkeypatch.setattr(cupy_scans, "TILED_FORWARD", False)
    assert cupy_scans.tile_layout(16, 391) is None


@pytest.mark.parametrize("mode,widest", [(0, 8192), (1, 640)])
def test_default_layouts_cover_every_width_up_to_the_documented_limit(mode, widest):
    """The per-width rules pick a layout that fits the shared memory for every row width the docs
    promise with gradients (docs/scans.md, "Widest rows"), and none beyond. The 2DMamba backward runs on
    tiles, whose block does not depend on the width: its limit is the forward's."""
    u = torch.empty(1, 1, 64, 1)
    widths = [*range(1, 1025), *range(widest - 64, widest + 2)] if widest > 1024 else range(1, widest + 2)
    for W in widths:
        cfg = cupy_scans._config_or_none(u.expand(1, 1, 64, W), 16, mode, need_grad=True)
        if W <= widest:
            assert cfg is not None, W
            fwd, bwd = cfg
            # rows beyond 1,024 columns may need more states per thread to keep the block at 1,024 threads
            rule = cupy_scans.forward_states_per_thread(mode, W)
            assert fwd.states_per_thread == rule if W <= 1024 else fwd.states_per_thread >= rule
            if mode == 0:
                assert bwd == cupy_scans.TileBackwardLayout(16, 2, 2)
            else:
                assert bwd.states_per_thread == cupy_scans.backward_states_per_thread(mode, W)
            assert bwd.seg_rows >= 1
        else:
            assert cfg is None, W


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("in_kind", [0, 1, 2])
@pytest.mark.parametrize("n_state,states,channels", [(16, 2, 2), (16, 2, 1), (16, 4, 2), (5, 1, 2), (32, 2, 1)])
def test_tiled_backward_compiles_for_each_layout(tmp_path, in_kind, n_state, states, channels):
    out = tmp_path / "tile_bwd.ptx"
    macros = ["-DMODE=0", f"-DIN_KIND={in_kind}", f"-DNS={n_state}", "-DS=1", "-DK=1", "-DCW=1", f"-DBTS={states}",
              f"-DBCH={channels}"]
    proc = subprocess.run([NVCC, "--ptx", "-arch=sm_90", "-std=c++17", *macros, str(KERNEL_FILE), "-o", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert ".entry scan2d_tile_bwd" in out.read_text()


def test_tiled_backward_layout_rule(monkeypatch):
    """The tiled 2DMamba backward takes every state count whose block fits (two states per warp where N
    is even; two channels per block where they fit, else one), keeps a block of at most 1024 threads and the
    shared memory limit, and can be turned off."""
    assert cupy_scans.TILED_BACKWARD is None and cupy_scans.TILE_BACKWARD_CHANNELS is None
    for n_state, states, channels in [(16, 2, 2), (32, 2, 1), (6, 2, 2), (5, 1, 2), (1, 1, 2)]:
        layout = cupy_scans.tile_backward_layout(n_state, 196)
        assert layout == cupy_scans.TileBackwardLayout(n_state, states, channels)
        assert layout.rows * states == 32 and layout.seg_rows == layout.rows
        assert layout.threads <= 1024 and layout.smem() <= cupy_scans.SMEM_LIMIT
    assert cupy_scans.TileBackwardLayout(32, 2, 2).smem() > cupy_scans.SMEM_LIMIT  # hence one channel at N = 32
    assert cupy_scans.TileBackwardLayout(16, 2, 2).blocks(3, 5) == 9  # the last block of each batch holds one
    # one channel per block where the grids would not fill the GPU with two
    assert cupy_scans.tile_backward_layout(16, 196, grids=64, sm_count=132) == cupy_scans.TileBackwardLayout(16, 2, 1)
    assert cupy_scans.tile_backward_layout(16, 196, grids=256, sm_count=132) == cupy_scans.TileBackwardLayout(16, 2, 2)
    monkeypatch.setattr(cupy_scans, "TILE_BACKWARD_CHANNELS", 1)
    assert cupy_scans.tile_backward_layout(16, 196) == cupy_scans.TileBackwardLayout(16, 2, 1)
    monkeypatch.setattr(cupy_scans, "TILE_BACKWARD_CHANNELS", None)
    assert cupy_scans.tile_backward_layout(64, 196) is None  # 412 KiB of shared memory: the row sweep runs it
    monkeypatch.setattr(cupy_scans, "TILE_BACKWARD_STATES", 1)
    assert cupy_scans.tile_backward_layout(16, 196) is None  # 283 KiB
    monkeypatch.setattr(cupy_scans, "TILE_BACKWARD_STATES", 4)
    assert cupy_scans.tile_backward_layout(16, 196) == cupy_scans.TileBackwardLayout(16, 4, 2)
    monkeypatch.setattr(cupy_scans, "TILED_BACKWARD", False)
    assert cupy_scans.tile_backward_layout(16, 196) is None
    u = torch.empty(1, 1, 64, 196)
    assert isinstance(cupy_scans._config_or_none(u, 16, 0)[1], cupy_scans.LaunchConfig)
