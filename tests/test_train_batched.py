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


def _grids(cohorts, n=4):
    _, grids = cohorts["classification"]
    return [grids[s] for s in sorted(grids)[:n]]


def test_a_batch_made_from_tissue_cells_equals_the_dense_one(cohorts):
    from wsi2dmamba.models import GridBatch
    from wsi2dmamba.models.batch import cells_on

    grids = _grids(cohorts)
    assert len({g.shape for g in grids}) > 1  # the batch has padding
    dense = GridBatch.from_grids(grids)
    cells = GridBatch.from_cells([cells_on(g, "cpu") for g in grids], [g.slide_id for g in grids])
    _assert_same_batch(cells, dense)
    assert cells.tissue_cells == tuple(g.n_tiles for g in grids)


def _assert_same_batch(a, b) -> None:
    for name in ("features", "tissue", "valid", "sizes"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.features.dtype == b.features.dtype
    assert (a.tissue_cells, a.slide_ids) == (b.tissue_cells, b.slide_ids)


def test_half_precision_cells_make_a_float32_batch(cohorts):
    from wsi2dmamba.models import GridBatch
    from wsi2dmamba.models.batch import cells_on

    grids = _grids(cohorts)
    f16 = GridBatch.from_cells([(torch.from_numpy(g.features).half(), *cells_on(g, "cpu")[1:]) for g in grids],
                               [g.slide_id for g in grids])
    assert f16.features.dtype == torch.float32
    assert torch.equal(f16.features, GridBatch.from_grids(grids).features.half().float())


def test_an_empty_slide_is_named_from_the_host_counts():
    from wsi2dmamba.errors import StageInputError
    from wsi2dmamba.models import GridBatch
    from wsi2dmamba.models.base import pooling_mask

    feats = torch.zeros(2, 3, 4, 5)
    tissue = torch.zeros(2, 3, 4, dtype=torch.bool)
    tissue[0, 1, 1] = True
    valid = torch.ones(2, 3, 4, dtype=torch.bool)
    sizes = torch.tensor([[3, 4], [3, 4]])
    batch = GridBatch(feats, tissue, valid, sizes, ["a", "b"], (1, 0))
    with pytest.raises(StageInputError, match=r"slide\(s\) b have no tissue cell"):
        pooling_mask(batch)
    assert pooling_mask(batch, include_padding=True).all()
    # the counts are what is read: a batch whose counts say every slide has tissue is not checked again
    trusted = GridBatch(feats, tissue, valid, sizes, ["a", "b"], (1, 1))
    assert pooling_mask(trusted).sum() == 1
    with pytest.raises(StageInputError, match=r"slide\(s\) b have"):
        pooling_mask(GridBatch(feats, tissue, valid, sizes, ["a", "b"]))  # no counts: counted on the device


def test_the_batch_maker_keeps_slides_within_its_budget(cohorts):
    from wsi2dmamba.training.data import BatchMaker, batch_ids

    grids = {g.slide_id: g for g in _grids(cohorts)}
    ids = sorted(grids)
    first = grids[ids[0]].features.nbytes + grids[ids[0]].n_tiles * 16
    maker = BatchMaker(grids, torch.device("cpu"), budget=first + 1)
    a = maker.cells(ids[0])
    assert maker.cells(ids[0]) is a and list(maker.kept) == [ids[0]]
    b = maker.cells(ids[1])
    assert maker.cells(ids[1]) is not b and list(maker.kept) == [ids[0]]  # over the budget: made again
    assert torch.equal(b[0], torch.from_numpy(grids[ids[1]].features))
    assert maker.kept_bytes == first
    assert batch_ids(ids, 3) == [ids[:3], ids[3:]]
    assert maker(ids[:2]).slide_ids == ids[:2]


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["abmil", "2dmambamil"])
def test_a_training_step_on_the_gpu_never_waits_for_it(name, cohorts):
    """Batch assembly, forward, loss, backward, clipping and AdamW run with CUDA's sync check set to
    raise; the batch made on the GPU equals the one made on the CPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from wsi2dmamba.models import GridBatch
    from wsi2dmamba.training.data import BatchMaker

    cohort, grids = cohorts["classification"]
    device = torch.device("cuda")
    ids = sorted(grids)[:3]
    made = BatchMaker(grids, device)(ids)
    ref = GridBatch.from_grids([grids[s] for s in ids])
    for attr in ("features", "tissue", "valid"):
        assert torch.equal(getattr(made, attr).cpu(), getattr(ref, attr)), attr
    torch.manual_seed(0)
    model = create(name, in_dim=16, n_classes=2, **MODELS[name]).to(device)
    config = TrainConfig(batch_size=3, lr=1e-3, device="cuda", folds=2)
    trainer = _FoldTrainer(model, config, make_targets(cohort, "classification"), grids, device, None)
    trainer.train_epoch(ids, 0, 10, 0, "warm-up")  # compiles the kernels, makes the optimiser state
    torch.cuda.synchronize()
    opt = trainer.optimizer
    torch.cuda.set_sync_debug_mode("error")
    try:
        targets = trainer.device_targets(ids)
        out = trainer.forward(ids, trainer.batches(ids), training=True, targets=targets)
        trainer.loss(out, ids, targets=targets).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
