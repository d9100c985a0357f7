"""Cross-validated training of MIL models on feature grids.

>>> from wsi2dmamba.cohort import load_cohort
>>> from wsi2dmamba.training import TrainConfig, train_cohort
>>> cohort = load_cohort("cohort.csv", require_path=False)  # doctest: +SKIP
>>> train_cohort(cohort, "runs/x/features/uni", "runs/x", "2dmambamil", TrainConfig(task="classification"))  # doctest: +SKIP

Splits are patient-level and stratified (:func:`make_splits`), or read from CLAM-style ``splits_<k>.csv``
files (:func:`load_splits`); checkpoints are safetensors with a JSON configuration
(:func:`save_checkpoint`, :func:`load_checkpoint`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..evaluation.recipe import paper_recipe_differences
    from ..models.checkpoint import load_checkpoint, read_checkpoint_config, save_checkpoint
    from .config import TrainConfig
    from .data import class_names, load_feature_grids
    from .loop import FoldResult, TrainResults, train_cohort, train_fold
    from .losses import class_weights, hazards_to_survival, nll_survival_loss, survival_bin_edges, time_to_bin
    from .splits import (FoldSplit, Leak, SplitLeakError, find_leaks, load_splits, make_splits, resolve_splits,
                         write_splits)

# Where each public name lives. The modules load on first use, so that the configuration
# (``wsi2dmamba.training.config``, which the command line reads for its options) loads without torch.
_HOMES = {
    "wsi2dmamba.evaluation.recipe": ("paper_recipe_differences",),
    "wsi2dmamba.models.checkpoint": ("load_checkpoint", "read_checkpoint_config", "save_checkpoint"),
    ".config": ("TrainConfig",),
    ".data": ("class_names", "load_feature_grids"),
    ".loop": ("FoldResult", "TrainResults", "train_cohort", "train_fold"),
    ".losses": ("class_weights", "hazards_to_survival", "nll_survival_loss", "survival_bin_edges", "time_to_bin"),
    ".splits": ("FoldSplit", "Leak", "SplitLeakError", "find_leaks", "load_splits", "make_splits", "resolve_splits",
                "write_splits"),
}
_HOME_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = [
    "FoldResult",
    "FoldSplit",
    "Leak",
    "SplitLeakError",
    "TrainConfig",
    "TrainResults",
    "class_names",
    "class_weights",
    "find_leaks",
    "hazards_to_survival",
    "load_checkpoint",
    "load_feature_grids",
    "load_splits",
    "make_splits",
    "nll_survival_loss",
    "paper_recipe_differences",
    "read_checkpoint_config",
    "resolve_splits",
    "save_checkpoint",
    "survival_bin_edges",
    "time_to_bin",
    "train_cohort",
    "train_fold",
    "write_splits",
]


def __getattr__(name: str) -> Any:
    if name not in _HOME_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME_OF[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
