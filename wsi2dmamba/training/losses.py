"""Losses and the discrete-time survival model.

Survival follows the discrete-time hazard model of Zadeh & Schmid (2021), as used by MCAT, MambaMIL and
2DMambaMIL: time is cut into ``n_bins`` intervals at quantiles of the *uncensored* training times; the
model emits one logit per interval, ``hazard_k = sigmoid(logit_k)`` is the probability that the event
happens in interval k given survival up to it, and ``S_k = Π_{j≤k} (1 − hazard_j)`` the probability of
surviving past interval k. The risk score is ``−Σ_k S_k`` (higher = earlier expected event;
:func:`wsi2dmamba.models.survival_risk`).

The negative log-likelihood of a patient in bin ``y`` is
``−log S_{y−1} − log hazard_y`` if the event was observed and ``−log S_y`` if censored
(``S_{−1} = 1``), and the loss is ``(1 − α)·NLL + α·NLL_uncensored_only``. It is computed in log space
(``log hazard = −softplus(−z)``, ``log(1 − hazard) = −softplus(z)``), which equals the clamped
probability form of the reference code wherever neither is clamped and stays finite where it is.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import TrainingError


def survival_bin_edges(time: np.ndarray, event: np.ndarray, n_bins: int) -> np.ndarray:
    """Inner bin edges: the ``1/n, …, (n−1)/n`` quantiles of the uncensored times.

    Args:
        time: (N,) survival times of the training partition (any unit, > 0).
        event: (N,) 1 = event observed, 0 = censored.
        n_bins: number of intervals.

    Returns:
        (n_bins − 1,) non-decreasing inner edges, in the unit of ``time``. Interval k is
        ``[edge_{k−1}, edge_k)`` with ``edge_{−1} = −∞`` and ``edge_{n−1} = +∞``, as ``pd.cut(right=False)``
        assigns them in the reference code.

    Raises:
        TrainingError: no uncensored time to take quantiles of.
    """
    time = np.asarray(time, dtype=np.float64)
    event = np.asarray(event).astype(bool)
    observed = time[event]
    if observed.size == 0:
        raise TrainingError("The training partition has no observed event (all censored); survival bins "
                            "cannot be placed. Use fewer folds or a cohort with events.")
    qs = np.arange(1, n_bins) / n_bins
    return np.quantile(observed, qs)


def time_to_bin(time: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """(N,) int64 interval index in ``0 … len(edges)`` of each time (see :func:`survival_bin_edges`)."""
    return np.searchsorted(np.asarray(edges, np.float64), np.asarray(time, np.float64), side="right").astype(np.int64)


def log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """``log(sigmoid(x))`` computed as ``−softplus(−x)``: exact in float and, unlike
    ``F.logsigmoid`` in some torch CPU builds, not thousands of times slower on small tensors."""
    return -F.softplus(-x)


def hazards_to_survival(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K) logits → (hazards (B, K), survival S (B, K))."""
    hazards = torch.sigmoid(logits)
    surv = torch.exp(torch.cumsum(log_sigmoid(-logits), dim=1))
    return hazards, surv


def nll_survival_loss(logits: torch.Tensor, bins: torch.Tensor, event: torch.Tensor, alpha: float = 0.0,
                      reduction: str = "mean") -> torch.Tensor:
    """Discrete-time survival negative log-likelihood.

    Args:
        logits: (B, K) hazard logits, float.
        bins: (B,) int64 interval of each time, in 0 … K−1.
        event: (B,) 1 = event observed, 0 = censored (float or int).
        alpha: weight of the uncensored-only term (0 = plain NLL).
        reduction: "mean", "sum" or "none".
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    b, k = logits.shape
    bins = bins.long().view(b, 1)
    if bool((bins < 0).any()) or bool((bins >= k).any()):
        raise TrainingError(f"survival bins must lie in 0…{k - 1}; the model has {k} hazards — "
                            "its n_bins must equal the training configuration's n_bins")
    event = event.float().view(b)
    log_h = log_sigmoid(logits)
    log_1mh = log_sigmoid(-logits)
    # log S padded with log S_{-1} = 0 in front: column j holds log S_{j-1}.
    log_s_pad = torch.cat([logits.new_zeros(b, 1), torch.cumsum(log_1mh, dim=1)], dim=1)
    log_s_before = log_s_pad.gather(1, bins).view(b)      # log S_{y-1}
    log_s_at = log_s_pad.gather(1, bins + 1).view(b)      # log S_y
    log_h_at = log_h.gather(1, bins).view(b)
    uncensored = -event * (log_s_before + log_h_at)
    censored = -(1.0 - event) * log_s_at
    loss = (1.0 - alpha) * (censored + uncensored) + alpha * uncensored
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """(n_classes,) inverse-frequency weights ``N / (n_present · count_c)``.

    The same as scikit-learn's ``compute_class_weight("balanced")`` over the classes present; a class
    absent from ``labels`` gets weight 0 (it cannot contribute to the loss anyway).
    """
    counts = np.bincount(np.asarray(labels, np.int64), minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / max(int((counts > 0).sum()), 1), 0.0)
    return torch.tensor(w, dtype=torch.float32)
