"""Every CUDA source in kernels/ compiles to PTX with nvcc, for each mode and input dtype the loader uses,
and the launch layouts a ``ScanTuning`` selects."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from wsi2dmamba.errors import ConfigError
from wsi2dmamba.ops import ScanTuning, cupy_scans
from wsi2dmamba.ops.cupy_scans import DEFAULT_TUNING, KERNEL_FILE, launch_config, plan_kernels, plan_scan

KERNELS = sorted((Path(__file__).resolve().parent.parent / "kernels").glob("*.cu"))
NVCC = shutil.which("nvcc")
LAYOUT_TABLE = Path(__file__).resolve().parent / "data" / "scan_launch_layouts.json"


def _nvcc_ptx(macros: dict[str, int], out: Path, extra: tuple[str, ...] = (), arch: str = "sm_90") -> str:
    """PTX of ``scan2d.cu`` compiled with ``-Dname=value`` macros and extra options, as the loader compiles it."""
    options = [f"-D{k}={v}" for k, v in macros.items()]
    proc = subprocess.run([NVCC, "--ptx", f"-arch={arch}", "-std=c++17", *options, *extra, str(KERNEL_FILE),
                           "-o", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return out.read_text()


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


def test_tiled_forward_takes_rows_wider_than_the_rule():
    """The tiled 2DMamba forward runs rows wider than ``tiled_forward_above`` columns, with a block that
    fits the shared memory up to the widest rows the backward holds, and never runs the narrower rows."""
    assert DEFAULT_TUNING.tiled_forward is None
    above = DEFAULT_TUNING.tiled_forward_above
    assert cupy_scans.tile_layout(16, above) is None
    for W in (above + 1, 391, 896):
        layout = cupy_scans.tile_layout(16, W)
        assert layout is not None and layout.threads == 512
        assert layout.smem(W) <= cupy_scans.SMEM_LIMIT
    always = ScanTuning(tiled_forward=True)
    assert cupy_scans.tile_layout(16, 1, always) is not None
    assert cupy_scans.tile_layout(64, 300, always) is None  # more than 32 warps: the row sweep runs it
    assert cupy_scans.tile_layout(16, 391, ScanTuning(tiled_forward=False)) is None
    assert cupy_scans.tile_layout(16, 200, ScanTuning(tiled_forward_above=128)) is not None


@pytest.mark.parametrize("mode,widest", [(0, 8192), (1, 640)])
def test_default_layouts_cover_every_width_up_to_the_documented_limit(mode, widest):
    """The per-width rules pick a layout that fits the shared memory for every row width the docs
    promise with gradients (docs/scans.md, "Widest rows"), and none beyond. The 2DMamba backward runs on
    tiles, whose block does not depend on the width: its limit is the forward's."""
    u = torch.empty(1, 1, 64, 1)
    widths = [*range(1, 1025), *range(widest - 64, widest + 2)] if widest > 1024 else range(1, widest + 2)
    for W in widths:
        plan = cupy_scans._plan(u.expand(1, 1, 64, W), 16, mode, True, None)
        if W <= widest:
            assert plan is not None, W
            fwd, bwd = plan.forward, plan.backward
            # rows beyond 1,024 columns may need more states per thread to keep the block at 1,024 threads
            rule = cupy_scans.forward_states_per_thread(mode, W)
            assert fwd.states_per_thread == rule if W <= 1024 else fwd.states_per_thread >= rule
            if mode == 0:
                assert bwd == cupy_scans.TileBackwardLayout(16, 2, 2)
            else:
                assert bwd.states_per_thread == cupy_scans.backward_states_per_thread(mode, W)
            assert bwd.seg_rows >= 1
        else:
            assert plan is None, W


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


def test_tiled_backward_layout_rule():
    """The tiled 2DMamba backward takes every state count whose block fits (two states per warp where N
    is even; two channels per block where they fit, else one), keeps a block of at most 1024 threads and the
    shared memory limit, and can be turned off."""
    assert DEFAULT_TUNING.tiled_backward is None and DEFAULT_TUNING.tile_backward_channels is None
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
    one = ScanTuning(tile_backward_channels=1)
    assert cupy_scans.tile_backward_layout(16, 196, tuning=one) == cupy_scans.TileBackwardLayout(16, 2, 1)
    assert cupy_scans.tile_backward_layout(64, 196) is None  # 412 KiB of shared memory: the row sweep runs it
    assert cupy_scans.tile_backward_layout(16, 196, tuning=ScanTuning(tile_backward_states=1)) is None  # 283 KiB
    four = ScanTuning(tile_backward_states=4)
    assert cupy_scans.tile_backward_layout(16, 196, tuning=four) == cupy_scans.TileBackwardLayout(16, 4, 2)
    rows = ScanTuning(tiled_backward=False)
    assert cupy_scans.tile_backward_layout(16, 196, tuning=rows) is None
    assert isinstance(plan_scan(0, 16, (1, 1, 64, 196), True, tuning=rows).backward, cupy_scans.LaunchConfig)


def _launch_of(plan, W: int) -> dict | None:
    """A plan's layouts in the terms of ``tests/data/scan_launch_layouts.json``."""
    if plan is None:
        return None
    fwd, bwd, tiles = plan.forward, plan.backward, plan.tiles
    launch = {"forward": {**dataclasses.asdict(fwd), "block": list(fwd.block), "smem": fwd.fwd_smem(fwd.fwd_buffers())},
              "backward": None, "tiled_forward": None}
    if isinstance(bwd, cupy_scans.TileBackwardLayout) and plan.need_grad:
        launch["backward"] = {"tiles": dataclasses.asdict(bwd), "smem": bwd.smem()}
    elif plan.need_grad:
        launch["backward"] = {"rows": dataclasses.asdict(bwd), "smem": bwd.bwd_smem(W)}
    if tiles is not None:
        launch["tiled_forward"] = {**dataclasses.asdict(tiles), "threads": tiles.threads, "smem": tiles.smem(W)}
    return launch


def test_tunings_select_the_recorded_launch_layouts():
    """For a table of calls (both scans, widths on each side of every rule boundary and of the kernels'
    limits, odd and large state counts, with and without gradients, grids below and above the GPU's
    multiprocessors), the default tuning and six forced ones select the recorded layouts: thread blocks,
    states and columns per thread, segment rows and shared memory of every launch. The table was recorded
    from the launcher's rules before they took a ``ScanTuning``; a change to any rule shows here."""
    table = json.loads(LAYOUT_TABLE.read_text())
    assert len(table) == 128 and sum(not row["call"]["tuning"] for row in table) == 92
    for row in table:
        call = row["call"]
        tuning = ScanTuning(**call["tuning"])
        plan = plan_scan(call["mode"], call["n_state"], tuple(call["shape"]), call["need_grad"], call["sm_count"], tuning)
        assert _launch_of(plan, call["shape"][3]) == row["launch"], call


def test_the_model_path_runs_the_default_tuning():
    """The public scans without ``tuning`` plan with ``DEFAULT_TUNING``, whose fields are the rules (None)."""
    assert ScanTuning() == DEFAULT_TUNING and hash(ScanTuning()) == hash(DEFAULT_TUNING)
    assert DEFAULT_TUNING.states_per_thread is None and DEFAULT_TUNING.bwd_states_per_thread is None
    assert DEFAULT_TUNING.extra_options == ()
    u = torch.empty(2, 6, 19, 391)
    assert cupy_scans._plan(u, 16, 0, True, None) == plan_scan(0, 16, (2, 6, 19, 391), True, None, DEFAULT_TUNING)
    forced = cupy_scans._plan(u, 16, 0, True, ScanTuning(tiled_backward=False))
    assert isinstance(forced.backward, cupy_scans.LaunchConfig)


def test_a_tuning_is_immutable_and_checked():
    tuning = ScanTuning(extra_options=["-DPF_ROWS=4"])
    assert tuning.extra_options == ("-DPF_ROWS=4",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        tuning.tiled_backward = False
    for bad in ({"states_per_thread": 0}, {"tile_backward_channels": 2.0}, {"tiled_forward": 1},
                {"tile_channels": None}, {"extra_options": "-DPF_ROWS=4"}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            ScanTuning(**bad)


# One tuning per case; each compiles the forward and backward of one call at 391 columns (rows of several
# warps) as the loader would, extra options included: the default 2DMamba tiles, then row sweeps forced
# off the rules for each scan.
TUNED_CALLS = {
    "2dmamba-default": (0, 0, ScanTuning()),
    "2dmamba-row-sweeps": (0, 2, ScanTuning(tiled_forward=False, tiled_backward=False, states_per_thread=1,
                                            bwd_states_per_thread=2, extra_options=("-DPF_ROWS=4",))),
    "mamba2d-forced": (1, 1, ScanTuning(states_per_thread=1, bwd_states_per_thread=2, bwd_wide_cols_per_thread=8,
                                        extra_options=("-DEARLY_C=0",))),
}


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("case", list(TUNED_CALLS))
def test_each_layout_a_tuning_selects_compiles(tmp_path, case):
    mode, in_kind, tuning = TUNED_CALLS[case]
    plan = plan_scan(mode, 16, (2, 6, 40, 391), True, 132, tuning)
    assert plan is not None and plan.extra_options == tuning.extra_options
    kernels = plan_kernels(mode, in_kind, plan)
    assert [name for name, _ in kernels][1].endswith("bwd")
    for i, (name, macros) in enumerate(kernels):
        ptx = _nvcc_ptx(macros, tmp_path / f"{case}_{i}.ptx", tuning.extra_options)
        assert f".entry {name}" in ptx
