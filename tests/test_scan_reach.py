"""The reach probe of ``benchmarks/scan_reach.py``: a model without its scan reaches no further than its
3 × 3 window, a scan reaches every cell above and left of a site, and Mamba2D's averaged recurrence
weakens a source along a row against one on the diagonal."""

import pytest
from training_data import benchmark_module, one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"d_model": 16, "d_state": 4}


@pytest.fixture(scope="module")
def probe():
    return benchmark_module("scan_reach")


def test_reach_ends_at_the_local_window_without_the_scan(probe):
    feats = probe.grid_features(None, 9, 32)
    local = probe.reach("2dmambamil:noscan", TINY, feats, (6, 6), seeds=1, projections=2)
    scan = probe.reach("2dmambamil:noconv", TINY, feats, (6, 6), seeds=1, projections=2)
    assert local["neighbour"] > 0 and all(local[k] == 0 for k in ("row 4", "row 5", "column 4", "diagonal 2,2"))
    assert all(scan[k] > 0 for k in ("row 4", "row 5", "column 4", "diagonal 2,2", "diagonal 3,3"))


def test_mamba2d_weakens_a_source_along_a_row_against_the_diagonal(probe):
    feats = probe.grid_features(None, 9, 32)
    m2d = probe.reach("m2dmil:noconv", TINY, feats, (6, 6), seeds=2, projections=4)
    mamba = probe.reach("2dmambamil:noconv", TINY, feats, (6, 6), seeds=2, projections=4)
    # same Manhattan distance (4): one path along the row, six to the diagonal cell, each step halved in M2D
    assert m2d["row 4"] < 0.5 * m2d["diagonal 2,2"]
    assert mamba["row 4"] > 0.5 * mamba["diagonal 2,2"]


@pytest.mark.parametrize("name", ["2dmambamil:noconv", "m2dmil:noconv"])
def test_state_init_gain_scales_the_scans_reach_by_its_square(probe, name):
    feats = probe.grid_features(None, 9, 32)
    plain = probe.reach(name, TINY, feats, (6, 6), seeds=1, projections=4)
    raised = probe.reach(name, {**TINY, "state_init_gain": 4.0}, feats, (6, 6), seeds=1, projections=4)
    for offset in ("row 4", "column 4", "diagonal 2,2"):
        assert 8 < raised[offset] / plain[offset] < 32  # B and C both × 4: about 16×


def test_state_init_gain_leaves_the_step_rows_alone():
    import torch

    from wsi2dmamba.models import create

    for name in ("2dmambamil", "m2dmil"):
        torch.manual_seed(0)
        plain = create(name, in_dim=8, n_classes=2, **TINY)
        torch.manual_seed(0)
        raised = create(name, in_dim=8, n_classes=2, **TINY, state_init_gain=3.0)
        projections = [(n, p) for n, p in plain.named_parameters() if n.endswith("x_proj.weight")]
        assert projections
        for n, w in projections:
            w3 = dict(raised.named_parameters())[n]
            rank = w.shape[0] - (3 if name == "m2dmil" else 2) * TINY["d_state"]
            torch.testing.assert_close(w3[:rank], w[:rank])
            torch.testing.assert_close(w3[rank:], 3.0 * w[rank:])
