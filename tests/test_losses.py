"""The discrete-time survival NLL against a hand-worked example, time bins, class weights."""

import math

import numpy as np
import pytest
import torch

from wsi2dmamba.models import survival_risk
from wsi2dmamba.training import class_weights, hazards_to_survival, nll_survival_loss, survival_bin_edges, time_to_bin


def _logit(p):
    return math.log(p / (1 - p))


# Hazards 0.5, 0.25, 0.2, 0.1  →  S = 0.5, 0.375, 0.3, 0.27 (S_k = Π_{j≤k} (1 − h_j)).
HAZARDS = [0.5, 0.25, 0.2, 0.1]
LOGITS = torch.tensor([[_logit(h) for h in HAZARDS]] * 4, dtype=torch.float64)
BINS = torch.tensor([2, 1, 0, 3])
EVENT = torch.tensor([1, 0, 1, 0])


def test_nll_matches_hand_worked_example():
    # A: event in bin 2:     −log S_1 − log h_2 = −log 0.375 − log 0.2
    # B: censored in bin 1:  −log S_1           = −log 0.375
    # C: event in bin 0:     −log S_{−1} − log h_0 = −log 1 − log 0.5
    # D: censored in bin 3:  −log S_3           = −log 0.27
    a = -math.log(0.375) - math.log(0.2)
    b = -math.log(0.375)
    c = -math.log(0.5)
    d = -math.log(0.27)
    per = nll_survival_loss(LOGITS, BINS, EVENT, reduction="none")
    assert per.tolist() == pytest.approx([a, b, c, d], rel=1e-12)
    assert float(nll_survival_loss(LOGITS, BINS, EVENT)) == pytest.approx((a + b + c + d) / 4, rel=1e-6)
    # alpha = 0.5: half the full NLL plus half the uncensored-only term (which is 0 for B and D).
    half = nll_survival_loss(LOGITS, BINS, EVENT, alpha=0.5, reduction="none")
    assert half.tolist() == pytest.approx([a, b / 2, c, d / 2], rel=1e-6)


def test_survival_and_risk_from_hazards():
    hazards, surv = hazards_to_survival(LOGITS[:1])
    assert hazards[0].tolist() == pytest.approx(HAZARDS, rel=1e-12)
    assert surv[0].tolist() == pytest.approx([0.5, 0.375, 0.3, 0.27], rel=1e-12)
    assert float(survival_risk(LOGITS[:1])[0]) == pytest.approx(-(0.5 + 0.375 + 0.3 + 0.27), rel=1e-6)


def test_nll_is_finite_with_extreme_logits_and_gradients_flow():
    logits = torch.tensor([[60.0, -60.0, 0.0, 30.0], [-80.0, 80.0, -5.0, 5.0]], requires_grad=True)
    loss = nll_survival_loss(logits, torch.tensor([1, 3]), torch.tensor([1, 0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    # Surviving bin 0 (hazard sigmoid(60)) and dying in bin 1 (hazard sigmoid(−60)) each cost about 60
    # nats; a clamp at 1e-7 would cap each at 16.1.
    assert float(nll_survival_loss(logits[:1].detach(), torch.tensor([1]), torch.tensor([1]))) == pytest.approx(120.0, abs=1e-3)


def test_bin_edges_use_uncensored_times_only_and_bins_are_half_open():
    time = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 100.0, 200.0])
    event = np.array([1, 1, 1, 1, 1, 0, 0])
    edges = survival_bin_edges(time, event, 4)
    assert edges.tolist() == pytest.approx(np.quantile([1, 2, 3, 4, 5], [0.25, 0.5, 0.75]).tolist())
    assert edges.tolist() == [2.0, 3.0, 4.0]
    # [−inf, 2), [2, 3), [3, 4), [4, inf): as pd.cut(right=False) assigns them.
    assert time_to_bin(np.array([0.5, 2.0, 2.99, 3.0, 4.0, 1e9]), edges).tolist() == [0, 1, 1, 2, 3, 3]


def test_bins_out_of_range_are_refused():
    from wsi2dmamba.errors import TrainingError

    with pytest.raises(TrainingError, match="n_bins"):
        nll_survival_loss(LOGITS, torch.tensor([0, 1, 2, 4]), EVENT)


def test_no_event_in_training_partition_is_a_clear_error():
    from wsi2dmamba.errors import TrainingError

    with pytest.raises(TrainingError, match="no observed event"):
        survival_bin_edges(np.array([1.0, 2.0]), np.array([0, 0]), 4)


def test_class_weights_equal_sklearn_balanced():
    from sklearn.utils.class_weight import compute_class_weight

    y = np.array([0, 0, 0, 0, 0, 1, 1, 2, 2, 2])
    expected = compute_class_weight("balanced", classes=np.array([0, 1, 2]), y=y)
    assert class_weights(y, 3).numpy() == pytest.approx(expected, rel=1e-6)
    w = class_weights(np.array([0, 0, 2]), 3).numpy()
    assert w[1] == 0.0 and w[0] == pytest.approx(0.75) and w[2] == pytest.approx(1.5)


def test_survival_training_clips_no_gradients_by_default():
    from wsi2dmamba.training import TrainConfig

    assert TrainConfig().clip_grad == 1.0
    assert TrainConfig(task="survival").clip_grad is None
    assert TrainConfig(task="survival", clip_grad=2.0).clip_grad == 2.0


def test_per_slide_clipping_biases_nll_hazards_low():
    # Why survival clips nothing: one slide per AdamW step, a gradient norm above the clip. Unclipped,
    # the shared hazards settle near the Kaplan–Meier hazards; clipped, event slides lose weight and
    # the hazards of all but the last interval fall well below them.
    rng = np.random.default_rng(0)
    n, k = 120, 4
    bins = torch.as_tensor(rng.integers(0, k, n))
    event = torch.as_tensor((rng.random(n) < 0.5).astype(np.float32))
    at_risk = torch.stack([(bins >= j).sum() for j in range(k)]).float()
    deaths = torch.stack([((bins == j) & (event == 1)).sum() for j in range(k)]).float()
    km = torch.logit(deaths / at_risk)

    def fit(clip):
        torch.manual_seed(0)
        logits = torch.zeros(k, requires_grad=True)
        opt = torch.optim.AdamW([logits], lr=3e-2, weight_decay=0.0)
        for epoch in range(12):
            for i in torch.randperm(n):
                loss = nll_survival_loss(logits.view(1, k), bins[i:i + 1], event[i:i + 1])
                opt.zero_grad()
                (10.0 * loss).backward()  # a slide's gradient ~10x the clip, as in the 2D models
                if clip:
                    torch.nn.utils.clip_grad_norm_([logits], 1.0)
                opt.step()
        return logits.detach()

    free, clipped = fit(False), fit(True)
    assert torch.allclose(free, km, atol=0.35), (free, km)
    assert (clipped[:-1] < km[:-1] - 0.5).all(), (clipped, km)
