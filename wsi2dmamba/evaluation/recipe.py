"""How a training configuration departs from the published 2DMambaMIL recipe (the report and ``train``
say it for models with the ``paper`` preset)."""

from __future__ import annotations

from typing import Any


def paper_recipe_differences(train: dict[str, Any]) -> list[str]:
    """Where a training configuration departs from the published 2DMambaMIL recipe, in words.

    The published code (Zhang et al., CVPR 2025) trains with AdamW (lr 1e-4, weight decay 1e-5), 20
    epochs, one slide per optimiser step, no gradient clipping, no class weights; classification with a
    cosine schedule stepped once per epoch over an unshuffled loader, survival (4 bins, α = 0) at a
    constant learning rate; it keeps the epoch with the best validation AUC (classification; ``>=``, so
    ties go to the later epoch) or reports the best validation C-index (survival).

    Args:
        train: ``TrainConfig.model_dump(mode="json")``, or the ``train`` entry of a fold's ``config.json``.

    Returns:
        One sentence per difference; empty when there is none.
    """
    survival = train.get("task") == "survival"
    out = [f"{what} {train[key]} (published: {published})"
           for key, published, what in (("lr", 1e-4, "learning rate"), ("weight_decay", 1e-5, "weight decay"),
                                        ("epochs", 20, "epochs"), ("batch_size", 1, "slides per step"),
                                        ("accum_steps", 1, "accumulation steps"))
           if train.get(key, published) != published]
    out += _schedule_differences(train, survival)
    published_select = "c_index" if survival else "auc"
    if train.get("select_on") != published_select:
        out.append(f"epoch chosen on validation {train.get('select_on')} (published: {published_select})")
    out.append("ties in the validation score go to the earlier epoch (published: the later)")
    if train.get("restarts", 1) > 1:
        out.append(f"{train['restarts']} restarts per fold, chosen on validation (published: one)")
    return out


def _schedule_differences(train: dict[str, Any], survival: bool) -> list[str]:
    """Clipping, class weights, schedule, order and survival bins against the published recipe."""
    out = []
    if train.get("clip_grad") is not None:
        out.append(f"gradient norm clipped at {train['clip_grad']} (published: no clipping)")
    if train.get("class_weighting"):
        out.append("class-weighted cross-entropy (published: unweighted)")
    if survival:
        out.append("cosine learning-rate decay per optimiser step (published for survival: constant learning rate)")
        if train.get("n_bins", 4) != 4 or train.get("alpha", 0.0) != 0.0:
            out.append(f"{train.get('n_bins')} time bins, α = {train.get('alpha')} (published: 4 bins, α = 0)")
    else:
        out.append("cosine decay per optimiser step (published: per epoch)")
        out.append("training order shuffled every epoch (published: a fixed, unshuffled order)")
    if train.get("warmup_epochs", 0.0) or train.get("min_lr_ratio", 0.0):
        out.append("learning-rate warm-up or floor (published: none)")
    return out
