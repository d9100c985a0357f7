"""Several slides per step: one optimiser step over a padded, masked batch of B slides equals B one-slide
steps whose gradients are accumulated, for every model whose slides do not interact in a batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from training_data import make_cohort, one_thread  # noqa: F401

from wsi2dmamba.cohort import load_cohort
from wsi2dmamba.models import create
from wsi2dmamba.training import TrainConfig
from wsi2dmamba.training.data import load_feature_grids, make_targets
from wsi2dmamba.training.loop import _FoldTrainer

pytestmark = pytest.mark.usefixtures("one_thread")

MODELS = {
    "meanpool": {"hidden": 16},
    "abmil": {"hidden": 16, "attn_dim": 8},
    "transmil": {"hidden": 16, "heads": 2, "landmarks": 4},
    "mambamil": {"d_model": 16, "attn_dim": 8},
    "2dmambamil": {"d_model": 16, "attn_dim": 8},
    "m2dmil": {"d_model": 16, "attn_dim": 8, "n_layers": 1},
}


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    """task → (cohort, its feature grids)."""
    out = {}
    for task in ("classification", "survival"):
        manifest, feats = make_cohort(tmp_path_factory.mktemp(task), n_patients=9, task=task, seed=3)
        cohort = load_cohort(manifest, require_path=False)
        out[task] = cohort, load_feature_grids(cohort, feats)
    return out


def _train_one_epoch(name: str, overrides: dict, task: str, cohort, grids, batch_size: int, accum: int):
    torch.manual_seed(0)
    model = create(name, in_dim=16, n_classes=2, task=task, n_bins=4, dropout=0.0, **overrides)
    config = TrainConfig(task=task, batch_size=batch_size, accum_steps=accum, lr=1e-2, device="cpu", folds=2)
    if task == "survival":
        edges = np.quantile([r.time for r in cohort], [0.25, 0.5, 0.75])
        targets = make_targets(cohort, task, bin_edges=edges)
    else:
        targets = make_targets(cohort, task)
    trainer = _FoldTrainer(model, config, targets, grids, torch.device("cpu"), None)
    order = sorted(grids)[:9]
    loss, steps = trainer.train_epoch(order, 0, 10, 0, "test")
    return loss, steps, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", list(MODELS))
def test_a_batch_of_three_slides_equals_three_accumulated_single_slides(name, cohorts):
    task = "survival" if name == "abmil" else "classification"
    cohort, grids = cohorts[task]
    loss_b, steps_b, batched = _train_one_epoch(name, MODELS[name], task, cohort, grids, 3, 1)
    loss_1, steps_1, single = _train_one_epoch(name, MODELS[name], task, cohort, grids, 1, 3)
    assert steps_b == steps_1 == 3
    assert loss_b == pytest.approx(loss_1, rel=1e-5)
    changed = 0
    for k in batched:
        if k.endswith("pool.score.bias"):
            # The softmax over cells ignores this bias: its gradient is zero up to rounding, which AdamW's
            # normalised step turns into a full step of either sign.
            continue
        torch.testing.assert_close(batched[k], single[k], atol=2e-5, rtol=1e-4, msg=f"{name}: {k}")
        changed += int(not torch.equal(batched[k], _initial(name, k, task)))
    assert changed > 0  # the epoch did train


def _initial(name: str, key: str, task: str) -> torch.Tensor:
    torch.manual_seed(0)
    model = create(name, in_dim=16, n_classes=2, task=task, n_bins=4, dropout=0.0, **MODELS[name])
    return model.state_dict()[key]


def test_the_first_non_finite_batch_is_named():
    from wsi2dmamba.errors import TrainingError
    from wsi2dmamba.training.loop import check_finite_epoch

    batches = [(["a", "b"], None), (["c", "d"], None), (["e"], None)]
    check_finite_epoch(torch.tensor([0.5, 0.2, 0.1]), [(1, torch.tensor(3.0))], batches, 7, 2, "fold 0")
    with pytest.raises(TrainingError, match=r"became nan on slide\(s\) c, d \(optimiser step 7\)"):
        check_finite_epoch(torch.tensor([0.5, float("nan"), float("inf")]), [], batches, 7, 2, "fold 0")
    with pytest.raises(TrainingError, match=r"gradient norm became inf on slide\(s\) e"):
        check_finite_epoch(torch.tensor([0.5, 0.2, 0.1]), [(1, torch.tensor(1.0)), (2, torch.tensor(float("inf")))],
                           batches, 7, 2, "fold 0")
