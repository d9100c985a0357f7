"""MIL models: registry, shapes, gradients, padding and batching invariance, the published 2DMambaMIL."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from wsi2dmamba.errors import ConfigError, StageInputError
from wsi2dmamba.models import GridBatch, MILModel, create, create_from_config, list_models, model_info
from wsi2dmamba.models.base import survival_risk

IN_DIM = 24
# Small versions of every model (and of the variants that change how cells see their neighbours).
SMALL = {
    "meanpool": {"hidden": 16},
    "abmil": {"hidden": 16, "attn_dim": 8},
    "2dmambamil": {"d_model": 16, "attn_dim": 8},
    "2dmambamil-paper": {"preset": "paper", "d_model": 16, "attn_dim": 8},
    "2dmambamil-4corners": {"d_model": 16, "attn_dim": 8, "n_layers": 2, "corners": ["tl", "tr", "bl", "br"]},
    "m2dmil": {"d_model": 16, "attn_dim": 8, "n_layers": 2},
    "mambamil": {"d_model": 16, "attn_dim": 8},
    "mambamil-bidirectional": {"d_model": 16, "attn_dim": 8, "bidirectional": True},
    "clam-sb": {"hidden": 16, "attn_dim": 8, "k_sample": 2},
    "transmil": {"hidden": 16, "heads": 2, "landmarks": 4},
    "cnn2d": {"d_model": 16, "attn_dim": 8, "n_layers": 2},
    # the ablation presets, by model key
    "2dmambamil:noscan": {"d_model": 16, "attn_dim": 8},
    "2dmambamil:noconv": {"d_model": 16, "attn_dim": 8},
    "2dmambamil:raster1d": {"d_model": 16, "attn_dim": 8, "n_layers": 2},
    "m2dmil:noscan": {"d_model": 16, "attn_dim": 8, "n_layers": 2},
    "m2dmil:noconv": {"d_model": 16, "attn_dim": 8, "n_layers": 2},
}
GRID_MODELS = ["2dmambamil", "2dmambamil-paper", "2dmambamil-4corners", "m2dmil", "cnn2d", "2dmambamil:noscan",
               "2dmambamil:noconv", "2dmambamil:raster1d", "m2dmil:noscan", "m2dmil:noconv"]


def build(key: str, task: str = "classification", seed: int = 0, **extra) -> MILModel:
    name = key.split("-")[0] if key.startswith(("2dmambamil", "mambamil")) and ":" not in key else key
    torch.manual_seed(seed)
    return create(name, in_dim=IN_DIM, n_classes=3, task=task, n_bins=4, **{**SMALL.get(key, {}), **extra})


def grid(rng: np.random.Generator, h: int, w: int, tissue_fraction: float = 0.6):
    feats = rng.standard_normal((h, w, IN_DIM)).astype(np.float32)
    tissue = rng.random((h, w)) < tissue_fraction
    tissue[0, 0] = True
    return feats, tissue


@pytest.fixture(scope="module")
def grids():
    rng = np.random.default_rng(7)
    return [grid(rng, 5, 7), grid(rng, 3, 4), grid(rng, 6, 2)]


def test_registry_lists_every_model_with_a_description():
    assert set(list_models()) == {"meanpool", "abmil", "2dmambamil", "m2dmil", "mambamil", "clam-sb", "transmil",
                                  "cnn2d"}
    for name in list_models():
        info = model_info(name)
        assert info["description"] and "default" in info["presets"]
    assert "paper" in model_info("2dmambamil")["presets"]


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "nosuchmodel", "n_classes": 2}, "unknown model"),
    ({"name": "abmil"}, "needs n_classes"),
    ({"name": "abmil", "n_classes": 2, "preset": "paper"}, "no preset"),
    ({"name": "abmil", "n_classes": 2, "hiden": 3}, "hiden"),
    ({"name": "2dmambamil", "n_classes": 2, "corners": ["top"]}, "corners"),
    ({"name": "2dmambamil", "n_classes": 2, "conv_kernel": 4}, "odd kernel"),
])
def test_bad_configuration_is_a_config_error(kwargs, message):
    name = kwargs.pop("name")
    with pytest.raises(ConfigError, match=message):
        create(name, in_dim=8, **kwargs)


@pytest.mark.parametrize("key", list(SMALL))
@pytest.mark.parametrize("task", ["classification", "survival"])
def test_shapes_and_gradient_flow(key, task, grids):
    model = build(key, task)
    batch = GridBatch.from_arrays(grids)
    model.train()
    out = model(batch, targets=torch.tensor([0, 2, 1]))
    n_out = 4 if task == "survival" else 3
    assert out.logits.shape == (3, n_out)
    loss = out.logits.pow(2).sum() + (out.aux_loss if out.aux_loss is not None else 0)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        if pname.endswith("pool.score.bias"):
            continue  # a softmax ignores a shift of all its scores: this gradient is zero up to rounding
        assert p.grad.abs().sum() > 0, f"{key}: no gradient reaches {pname}"
    if out.attention is not None:
        assert out.attention.shape == batch.tissue.shape
        torch.testing.assert_close(out.attention.sum(dim=(1, 2)), torch.ones(3))
        assert (out.attention[~batch.valid] == 0).all()


@pytest.mark.parametrize("key", [k for k in SMALL if k != "2dmambamil-paper"])
def test_attention_only_on_tissue_cells_by_default(key, grids):
    out = build(key).eval()(GridBatch.from_arrays(grids))
    if out.attention is not None:
        batch = GridBatch.from_arrays(grids)
        assert (out.attention[~batch.tissue] == 0).all()
        assert (out.attention[batch.tissue] > 0).all()


def test_paper_preset_pools_over_padding_cells(grids):
    batch = GridBatch.from_arrays(grids)
    out = build("2dmambamil-paper").eval()(batch)
    assert (out.attention[batch.valid & ~batch.tissue] > 0).all()
    assert (out.attention[~batch.valid] == 0).all()


@pytest.mark.parametrize("key", list(SMALL))
def test_features_at_non_tissue_cells_do_not_matter(key, grids):
    model = build(key).eval()
    batch = GridBatch.from_arrays(grids)
    noisy = GridBatch(batch.features.clone(), batch.tissue, batch.valid, batch.sizes, batch.slide_ids)
    junk = torch.randn_like(noisy.features) * 100
    noisy.features[~batch.tissue] = junk[~batch.tissue]
    with torch.no_grad():
        torch.testing.assert_close(model(noisy).logits, model(batch).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("key", GRID_MODELS)
def test_padding_token_changes_the_output(key, grids):
    model = build(key).eval()
    batch = GridBatch.from_arrays(grids)
    # without a local conv the token reaches tissue cells only through the scan, whose initial steps are small
    threshold = 1e-6 if key.endswith("noconv") else 1e-4
    with torch.no_grad():
        before = model(batch).logits
        model.pad_token.add_(torch.randn_like(model.pad_token))
        after = model(batch).logits
    assert (before - after).abs().max() > threshold


@pytest.mark.parametrize("key", list(SMALL))
def test_a_slide_batched_with_larger_grids_gives_the_same_output_as_alone(key, grids):
    model = build(key).eval()
    rng = np.random.default_rng(3)
    big_wide, big_tall = grid(rng, 4, 11), grid(rng, 9, 3)
    with torch.no_grad():
        for i, g in enumerate(grids):
            alone = model(GridBatch.from_arrays([g]))
            mixed = model(GridBatch.from_arrays([big_wide, g, big_tall]))
            torch.testing.assert_close(mixed.logits[1], alone.logits[0], atol=1e-5, rtol=0)
            if alone.attention is not None:
                h, w = g[1].shape
                torch.testing.assert_close(mixed.attention[1, :h, :w], alone.attention[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("key", ["2dmambamil", "m2dmil", "mambamil", "transmil", "cnn2d", "2dmambamil:noscan",
                                 "2dmambamil:noconv", "2dmambamil:raster1d", "m2dmil:noscan", "m2dmil:noconv"])
def test_context_models_see_their_neighbours(key, grids):
    """Control for the invariance tests: changing another tissue cell's features changes the attention
    of a fixed cell in the context models (it cannot in ABMIL)."""
    model = build(key).eval()
    feats, tissue = grids[0]
    tissue = np.ones_like(tissue)
    changed = feats.copy()
    changed[0, 1] += 3.0
    with torch.no_grad():
        a = model(GridBatch.from_arrays([(feats, tissue)])).logits
        b = model(GridBatch.from_arrays([(changed, tissue)])).logits
    assert (a - b).abs().max() > 1e-5


def test_paper_preset_is_the_published_model():
    model = create("2dmambamil", in_dim=1024, n_classes=2, preset="paper")
    # Counted from the published architecture (research/2dmamba.md §3: 265,478 with 5 classes):
    # fc 131,200 + pad 128 + RMSNorm 128 + in_proj 65,536 + conv 1,280 + x_proj 10,240 + dt_proj 2,304
    # + A_log 4,096 + D 256 + out_proj 32,768 + LayerNorm 256 + attention 16,641 + head 258.
    assert model.num_parameters() == 265_091
    assert create("2dmambamil", in_dim=1024, n_classes=5, preset="paper").num_parameters() == 265_478
    block = model.blocks[0].mixer
    assert isinstance(block.conv, torch.nn.Conv1d) and block.conv.kernel_size == (4,)
    assert block.in_proj.weight.shape == (512, 128) and block.in_proj.bias is None
    assert block.scans[0].x_proj.weight.shape == (8 + 16 + 16, 256)
    assert (block.scans[0].dt_proj.bias == 0).all()  # the published init zeroes it (xavier on every Linear)
    torch.testing.assert_close(-torch.exp(block.scans[0].A_log[0]), -torch.arange(1.0, 17.0))
    assert ((model.pad_token >= 0) & (model.pad_token < 1)).all()
    survival = create("2dmambamil", in_dim=1024, task="survival", preset="paper")
    assert survival.head.out_features == 4  # one hazard per bin (the published code builds 8)


def test_default_2dmambamil_fixes_the_published_defects():
    model = create("2dmambamil", in_dim=1024, n_classes=2)
    block = model.blocks[0].mixer
    assert isinstance(block.conv, torch.nn.Conv2d) and block.conv.kernel_size == (3, 3)
    dt = torch.nn.functional.softplus(block.scans[0].dt_proj.bias)
    assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6  # Mamba's step initialisation is kept
    assert not model.config.pool_padding
    assert 0.25e6 < model.num_parameters() < 0.3e6


@pytest.mark.parametrize("key", list(SMALL))
def test_same_seed_same_model_and_output(key, grids):
    batch = GridBatch.from_arrays(grids)
    outs = []
    for _ in range(2):
        model = build(key, seed=123).train()
        torch.manual_seed(5)
        outs.append(model(batch, targets=torch.tensor([1, 0, 2])).logits)
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    other = build(key, seed=124).eval()
    assert any((p - q).abs().max() > 0 for p, q in zip(other.parameters(), build(key, seed=123).parameters()))


@pytest.mark.parametrize("key", list(SMALL))
def test_config_round_trips_through_json(key, grids):
    model = build(key).eval()
    config = json.loads(json.dumps(model.config_dict()))
    again = create_from_config(config)
    again.load_state_dict(model.state_dict())
    again.eval()
    batch = GridBatch.from_arrays(grids)
    with torch.no_grad():
        torch.testing.assert_close(again(batch).logits, model(batch).logits)
    assert again.config == model.config
    with pytest.raises(ConfigError, match="'model'"):
        create_from_config({k: v for k, v in config.items() if k != "model"})


def test_a_slide_without_tissue_is_refused_by_name(grids):
    feats, tissue = grids[1]
    batch = GridBatch.from_arrays([grids[0], (feats, np.zeros_like(tissue))], slide_ids=["ok", "blank-slide"])
    for key in ("abmil", "2dmambamil", "mambamil", "transmil"):
        with pytest.raises(StageInputError, match="blank-slide"):
            build(key)(batch)


def test_clam_instance_loss_only_in_training_with_targets(grids):
    model = build("clam-sb")
    batch = GridBatch.from_arrays(grids)
    assert model.eval()(batch, targets=torch.tensor([0, 1, 2])).aux_loss is None
    out = model.train()(batch, targets=torch.tensor([0, 1, 2]))
    assert out.aux_loss.ndim == 0 and torch.isfinite(out.aux_loss) and out.aux_loss > 0
    assert model(batch).aux_loss is None


def test_survival_risk_grows_with_the_hazards():
    low, high = torch.full((1, 4), -2.0), torch.full((1, 4), 2.0)
    assert survival_risk(high) > survival_risk(low)
    torch.testing.assert_close(survival_risk(torch.zeros(1, 2)), torch.tensor([-(0.5 + 0.25)]))


def test_models_command_prints_every_model_with_its_size():
    from wsi2dmamba.cli import app

    result = CliRunner().invoke(app, ["models", "--presets"])
    assert result.exit_code == 0, result.output
    for name in list_models():
        assert name in result.output
    assert "265,091" in result.output  # the published 2DMambaMIL with 1024-d features, 2 classes


def test_star_relu_gradients():
    from wsi2dmamba.models.ssm_blocks import _StarReLUFunction

    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([1.3], dtype=torch.float64, requires_grad=True)
    bias = torch.tensor([-0.2], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_StarReLUFunction.apply, (x, scale, bias))


def _train_step(model: MILModel, batch: GridBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(batch)
    out.logits.square().sum().backward()
    return out.logits.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("key, groups", [("2dmambamil", 1), ("2dmambamil-paper", 3), ("2dmambamil-4corners", 2),
                                         ("m2dmil", 3)])
def test_recomputed_blocks_in_channel_groups_give_the_same_output_and_gradients(key, groups, grids):
    batch = GridBatch.from_arrays(grids)  # padded: the groups must respect each slide's own grid
    plain = build(key, dropout=0.0, checkpoint_blocks="off").train()
    lean = build(key, dropout=0.0, checkpoint_blocks="on", channel_groups=groups).train()
    lean.load_state_dict(plain.state_dict())
    ref_logits, ref_grads = _train_step(plain, batch)
    logits, grads = _train_step(lean, batch)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    for k, g in ref_grads.items():
        torch.testing.assert_close(grads[k], g, atol=1e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")


def test_blocks_are_recomputed_only_in_training_on_large_grids():
    from wsi2dmamba.models.mamba2d_mil import lean_groups

    assert lean_groups("auto", None, 256, (1, 391, 391), training=True) == 2  # 150 MiB in 80 MiB groups
    assert lean_groups("auto", None, 128, (1, 391, 391), training=True) == 2  # 75 MiB: still two groups
    assert lean_groups("auto", None, 256, (1, 600, 600), training=True) == 5
    assert lean_groups("auto", None, 256, (1, 196, 196), training=True) is None
    assert lean_groups("auto", None, 256, (1, 391, 391), training=False) is None
    assert lean_groups("on", 4, 256, (1, 8, 8), training=True) == 4
    assert lean_groups("off", None, 256, (1, 391, 391), training=True) is None


@pytest.mark.parametrize("key", ["abmil", "2dmambamil"])
def test_a_float16_grid_gives_the_float32_result_without_a_float32_copy(key, grids):
    half = [(f.astype(np.float16), m) for f, m in grids]
    single = GridBatch.from_arrays(half, dtype=torch.float32)
    batch16 = GridBatch.from_arrays(half, dtype=torch.float16)
    model = build(key, dropout=0.0).train()
    ref_logits, ref_grads = _train_step(model, single)
    logits, grads = _train_step(model, batch16)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    for k, g in ref_grads.items():
        torch.testing.assert_close(grads[k], g, atol=1e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")


def test_cell_projection_in_row_blocks_matches_linear():
    from wsi2dmamba.models.base import _CellProjection

    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    fn = lambda x, w, b: _CellProjection.apply(x, w, b, torch.float64, 8)  # noqa: E731  (blocks of 8 rows)
    torch.testing.assert_close(fn(x, w, b), torch.nn.functional.linear(x, w, b))
    assert torch.autograd.gradcheck(fn, (x, w, b))


def _reach(key: str, source: tuple[int, int], size: tuple[int, int] = (7, 9), **extra) -> np.ndarray:
    """(H, W) bool: the cells whose block output changes when the features of ``source`` change."""
    model = build(key, dropout=0.0, **extra).eval()
    rng = np.random.default_rng(11)
    feats = rng.standard_normal((*size, IN_DIM)).astype(np.float32)
    changed = feats.copy()
    changed[source] += 3.0
    tissue = np.ones(size, dtype=bool)
    with torch.no_grad():
        outs = []
        for f in (feats, changed):
            batch = GridBatch.from_arrays([(f, tissue)])
            from wsi2dmamba.models.grid_layout import GridLayout

            x = model.cells(batch)
            for block in model.blocks:
                x = block(x, GridLayout.from_batch(batch))
            outs.append(x[0])
    return ((outs[0] - outs[1]).abs().amax(-1) > 1e-6).numpy()


def test_scan_off_ablations_see_only_their_local_window():
    """The ablations do what their names say: without the scan a block reads a 3 × 3 window; with the
    scan, a top-left scan reaches every cell below and to the right; the raster scan every later cell."""
    window = np.zeros((7, 9), dtype=bool)
    window[2:5, 3:6] = True
    assert (_reach("2dmambamil:noscan", (3, 4)) == window).all()
    assert (_reach("m2dmil:noscan", (3, 4), n_layers=1) == window).all()
    below_right = np.zeros((7, 9), dtype=bool)
    below_right[2:, 3:] = True  # the 3×3 conv first spreads the change one cell up and left
    assert (_reach("2dmambamil", (3, 4)) == below_right).all()
    only_scan = np.zeros((7, 9), dtype=bool)
    only_scan[3:, 4:] = True
    assert (_reach("m2dmil", (3, 4), n_layers=1) == (only_scan | window)).all()  # the two paths are added
    assert (_reach("2dmambamil:noconv", (3, 4)) == only_scan).all()
    assert (_reach("m2dmil:noconv", (3, 4), n_layers=1) == only_scan).all()
    raster = np.zeros(7 * 9, dtype=bool)
    raster[3 * 9 + 4:] = True
    assert (_reach("2dmambamil:raster1d", (3, 4), n_layers=1, conv="none") == raster.reshape(7, 9)).all()
    assert _reach("2dmambamil:4corners", (3, 4), d_model=16, attn_dim=8).all()


def test_model_keys_name_presets_everywhere():
    from wsi2dmamba.models.registry import list_model_keys, model_folder, split_model_key

    keys = list_model_keys()
    for key in ["2dmambamil:noscan", "2dmambamil:noconv", "2dmambamil:4corners", "2dmambamil:raster1d",
                "m2dmil:noscan", "m2dmil:noconv", "cnn2d"]:
        assert key in keys
    assert create("2dmambamil:noscan", in_dim=8, n_classes=2).config.scan == "none"
    assert create("m2dmil:noconv", in_dim=8, n_classes=2).config.local_path is False
    assert split_model_key("2dmambamil:default") == ("2dmambamil", None)
    assert model_folder("2dmambamil:noscan") == "2dmambamil-noscan"
    with pytest.raises(ConfigError, match="no preset 'nope'"):
        create("2dmambamil:nope", in_dim=8, n_classes=2)
    with pytest.raises(ConfigError, match="beside the key's preset"):
        create("2dmambamil:noscan", in_dim=8, n_classes=2, preset="paper")
    with pytest.raises(ConfigError, match="nothing that mixes cells"):
        create("2dmambamil:noscan", in_dim=8, n_classes=2, conv="none")
    with pytest.raises(ConfigError, match="cannot both be off"):
        create("m2dmil:noscan", in_dim=8, n_classes=2, local_path=False)
    noscan = create("2dmambamil:noscan", in_dim=8, n_classes=2)
    assert not any("x_proj" in k or "A_log" in k for k, _ in noscan.named_parameters())
    m2d = create("m2dmil:noscan", in_dim=8, n_classes=2)
    assert not any("A_log" in k for k, _ in m2d.named_parameters())


def test_cnn2d_reads_a_window_that_grows_with_depth():
    for layers in (1, 2):
        reach = _reach("cnn2d", (3, 4), n_layers=layers)
        expected = np.zeros((7, 9), dtype=bool)
        expected[3 - layers:4 + layers, 4 - layers:5 + layers] = True
        assert (reach == expected).all()
    with pytest.raises(ConfigError, match="odd"):
        create("cnn2d", in_dim=8, n_classes=2, kernel=4)
