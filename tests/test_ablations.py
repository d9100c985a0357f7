"""The ablation presets and the cnn2d baseline train like every model: by model key, with resume and exact
checkpoints."""

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from training_data import base_grid, make_cohort, one_thread  # noqa: F401

from wsi2dmamba.cohort import load_cohort
from wsi2dmamba.errors import ConfigError
from wsi2dmamba.models import GridBatch, create
from wsi2dmamba.training import TrainConfig, load_checkpoint, save_checkpoint, train_cohort

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL_GRID_MODEL = {"d_model": 8, "attn_dim": 8}
ABLATIONS = ["2dmambamil:noscan", "2dmambamil:noconv", "2dmambamil:4corners", "2dmambamil:raster1d",
             "m2dmil:noscan", "m2dmil:noconv", "cnn2d"]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ablations")
    manifest, feats = make_cohort(folder, n_patients=10, seed=3)
    return load_cohort(manifest, require_path=False), feats


@pytest.mark.parametrize("key", ABLATIONS)
def test_each_ablation_trains_by_its_model_key(small, tmp_path, key):
    cohort, feats = small
    config = TrainConfig(folds=2, epochs=2, lr=5e-3, seed=0, device="cpu")
    res = train_cohort(cohort, feats, tmp_path, key, config, SMALL_GRID_MODEL, folds_to_run=[0], progress=False)
    folder = tmp_path / "train" / key.replace(":", "-")
    assert res.model_dir == folder
    saved = json.loads((folder / "fold_0" / "config.json").read_text())
    name, _, preset = key.partition(":")
    assert saved["model"]["model"] == name and saved["preset"] == (preset or None)
    expected = create(key, in_dim=16, n_classes=2, **SMALL_GRID_MODEL).config
    for field in ("scan", "conv", "corners", "ssm_path", "local_path"):
        if hasattr(expected, field):
            assert saved["model"][field] == json.loads(json.dumps(getattr(expected, field))), field
    log = pd.read_csv(folder / "fold_0" / "log.csv")
    assert log["epoch"].tolist() == [1, 2] and log["train_loss"].notna().all()


def test_a_preset_given_twice_must_agree(small, tmp_path):
    cohort, feats = small
    config = TrainConfig(folds=2, epochs=1, device="cpu")
    with pytest.raises(ConfigError, match="contradicts"):
        train_cohort(cohort, feats, tmp_path, "2dmambamil:noscan", config, preset="paper", progress=False)
    with pytest.raises(ConfigError, match="no preset"):
        train_cohort(cohort, feats, tmp_path, "cnn2d:nope", config, progress=False)


def test_cnn2d_resumes_to_the_uninterrupted_result(small, tmp_path):
    cohort, feats = small
    config = TrainConfig(folds=2, epochs=3, lr=5e-3, seed=4, device="cpu")
    train_cohort(cohort, feats, tmp_path / "a", "cnn2d", config, SMALL_GRID_MODEL, folds_to_run=[0], progress=False)

    def stop(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt  # as if the job were killed after epoch 2

    with pytest.raises(KeyboardInterrupt):
        train_cohort(cohort, feats, tmp_path / "b", "cnn2d", config, SMALL_GRID_MODEL, folds_to_run=[0],
                     callbacks=[stop], progress=False)
    train_cohort(cohort, feats, tmp_path / "b", "cnn2d", config, SMALL_GRID_MODEL, folds_to_run=[0], progress=False)
    a, b = tmp_path / "a" / "train" / "cnn2d" / "fold_0", tmp_path / "b" / "train" / "cnn2d" / "fold_0"
    pd.testing.assert_frame_equal(pd.read_csv(a / "predictions.csv"), pd.read_csv(b / "predictions.csv"))
    ta, tb = load_file(a / "best.safetensors"), load_file(b / "best.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[n], tb[n]) for n in ta)


@pytest.mark.parametrize("key", ["cnn2d", "2dmambamil:raster1d", "m2dmil:noscan"])
def test_checkpoint_round_trip_is_exact(tmp_path, key):
    torch.manual_seed(2)
    grid = base_grid()
    model = create(key, in_dim=grid.feature_dim, n_classes=2, **SMALL_GRID_MODEL).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_checkpoint(tmp_path / "m.safetensors", model, {"epoch": 1})
    back = load_checkpoint(tmp_path / "m.safetensors")
    batch = GridBatch.from_grids([grid])
    with torch.no_grad():
        assert torch.equal(model(batch).logits, back(batch).logits)


def test_clam_weighs_slide_and_instance_losses_as_published():
    """CLAM-SB trains on 0.7 · slide loss + 0.3 · instance loss (bag_weight 0.7 in CLAM's main.py)."""
    import numpy as np

    torch.manual_seed(0)
    model = create("clam-sb", in_dim=16, n_classes=2, hidden=16, attn_dim=8, k_sample=2, dropout=0.0)
    rng = np.random.default_rng(0)
    batch = GridBatch.from_arrays([(rng.standard_normal((4, 5, 16)).astype(np.float32), np.ones((4, 5), bool))])
    out = model.train()(batch, targets=torch.tensor([1]))
    assert out.slide_loss_weight == pytest.approx(0.7)
    inst = model.instance_loss(*_clam_parts(model, batch), torch.tensor([1]))
    torch.testing.assert_close(out.aux_loss, 0.3 * inst)
    assert model.eval()(batch).slide_loss_weight == 1.0  # validation loss: the slide loss alone


def _clam_parts(model, batch):
    from wsi2dmamba.models.base import embed_cells, pooling_mask

    mask = pooling_mask(batch)
    h = embed_cells(model.embed, batch.features)
    _, weights = model.pool(h, mask)
    return h, weights, mask


def test_mambamil_reorders_each_sequence_with_its_rate():
    from wsi2dmamba.models.mamba_mil import reorder_index

    order = reorder_index(torch.tensor([7, 4]), 7, 3)
    # slide 0: rows of 3 (0 1 2 / 3 4 5 / 6) read column by column; slide 1: 4 cells, then its padding
    assert order[0].tolist() == [0, 3, 6, 1, 4, 2, 5]
    assert order[1].tolist() == [0, 3, 1, 2, 4, 5, 6]
    with_branch = create("mambamil", in_dim=8, n_classes=2, d_model=16)
    without = create("mambamil", in_dim=8, n_classes=2, d_model=16, reorder_rate=None)
    assert len(with_branch.blocks[0].mixers) == 2 and len(without.blocks[0].mixers) == 1
