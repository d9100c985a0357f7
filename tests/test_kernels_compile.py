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
                # the banded 2DMamba forward's carry and output-correction passes
                assert (".entry scan2d_carry" in ptx and ".entry scan2d_fix" in ptx) == (mode == 0)


@pytest.mark.parametrize("mode,widest", [(0, 896), (1, 640)])
def test_default_layouts_cover_every_width_up_to_the_documented_limit(mode, widest):
    """The per-width rules pick a layout that fits the shared memory for every row width the docs
    promise with gradients (docs/scans.md, "Widest rows"), and none beyond."""
    u = torch.empty(1, 1, 64, 1)
    for W in range(1, widest + 2):
        cfg = cupy_scans._config_or_none(u.expand(1, 1, 64, W), 16, mode, need_grad=True)
        if W <= widest:
            assert cfg is not None, W
            fwd, bwd = cfg
            assert fwd.states_per_thread == cupy_scans.forward_states_per_thread(mode, W)
            assert bwd.states_per_thread == cupy_scans.backward_states_per_thread(mode, W)
            assert bwd.seg_rows >= 1
        else:
            assert cfg is None, W
