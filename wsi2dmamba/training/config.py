"""Training configuration: one validated, frozen, hashable object per run of ``train``."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

Task = Literal["classification", "survival"]
#: Validation quantities that can pick a fold's best checkpoint; which of them a task offers is below.
Selector = Literal["loss", "auc", "balanced_accuracy", "accuracy", "f1", "c_index"]
#: Numbers a model trains with on a GPU ('auto': bf16 where supported, else fp16).
TrainPrecision = Literal["auto", "fp32", "bf16", "fp16"]

CLASSIFICATION_SELECTORS = ("loss", "auc", "balanced_accuracy", "accuracy", "f1")
SURVIVAL_SELECTORS = ("loss", "c_index")


class TrainConfig(BaseModel):
    """How to train one model on one cohort with k-fold cross-validation.

    Defaults follow the published 2DMambaMIL recipe (AdamW, lr 1e-4, weight decay 1e-5, 20 epochs,
    one slide per step, cosine schedule) with the defects of that recipe fixed (shuffled training
    order, a held-out test partition, selection on validation only).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: Task = Field("classification", description="What the model predicts: classification (the manifest's "
                       "label) or survival (its time and event).")
    folds: int = Field(5, ge=2, description="Number of cross-validation folds (each fold's test partition "
                                             "is one k-th of the patients).")
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="Fraction of each fold's non-test patients "
                                                                  "held out for validation (stratified).")
    epochs: int = Field(20, ge=1, description="Passes over each fold's training slides.")
    lr: float = Field(1e-4, gt=0.0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(1e-5, ge=0.0, description="AdamW decoupled weight decay.")
    warmup_epochs: float = Field(0.0, ge=0.0, description="Linear warm-up length in epochs (fractions allowed) "
                                                           "before the cosine decay.")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="Final learning rate as a fraction of lr.")
    batch_size: int = Field(1, ge=1, description="Slides per forward pass (grids are padded and masked).")
    accum_steps: int = Field(1, ge=1, description="Forward passes whose gradients are summed before one "
                                                  "optimiser step.")
    class_weighting: bool = Field(False, description="Weight the cross-entropy by inverse class frequency "
                                                     "of the training partition.")
    clip_grad: Optional[float] = Field(1.0, gt=0.0, description="Max global gradient norm per optimiser step; "
                                       "0 = no clipping. Default 1.0 for classification and none for survival.")
    select_on: Selector = Field("loss", description="Validation quantity that picks the 'best' checkpoint: loss "
                                                    "(lower is better), or auc, balanced_accuracy, accuracy, f1 "
                                                    "(classification), c_index (survival).")
    seed: int = Field(0, description="Seed of the folds, the initial weights and the order of the slides.")
    restarts: int = Field(1, ge=1, description="Trainings per fold, with seeds seed, seed+1, …; the fold keeps "
                                               "the one whose chosen checkpoint scores best on validation "
                                               "(ties: the earlier restart). Test data play no part in the choice.")
    input_axes: int = Field(0, ge=0, description="Project each cell's features on this many whitened principal "
                            "axes, fitted on each fold's training cells and stored in its checkpoint, before the "
                            "model reads them; 0 = the features as they are.")
    device: str = Field("auto", exclude=True, description="'auto' (CUDA when available), 'cpu', 'cuda', "
                        "'cuda:1', … (runtime: not hashed, so a fold resumes on another device).")
    precision: TrainPrecision = Field(
        "auto", description="Autocast precision on GPU; 'auto' = bf16 where supported, else fp16. CPU is fp32.")
    n_bins: int = Field(4, ge=2, description="Survival: number of discrete time bins (= hazards).")
    alpha: float = Field(0.0, ge=0.0, le=1.0, description="Survival NLL: weight of the uncensored-only term.")

    @model_validator(mode="before")
    @classmethod
    def _survival_clips_nothing(cls, data: Any) -> Any:
        # With one slide per step, each slide's gradient norm is several times any useful clip, so clipping
        # gives every slide the same step length. Under the survival NLL an event's gradient is the large
        # one, so clipping shrinks events more than censored slides and drives every hazard below its
        # Kaplan–Meier level (the training loss rises). Survival therefore clips nothing unless asked.
        if isinstance(data, dict) and "clip_grad" not in data and data.get("task") == "survival":
            return {**data, "clip_grad": None}
        if isinstance(data, dict) and data.get("clip_grad") == 0:  # 0 = off, as --clip-grad 0 (TOML has no null)
            return {**data, "clip_grad": None}
        return data

    @model_validator(mode="after")
    def _check_selector(self) -> TrainConfig:
        allowed = SURVIVAL_SELECTORS if self.task == "survival" else CLASSIFICATION_SELECTORS
        if self.select_on not in allowed:
            raise ValueError(f"select_on={self.select_on!r} is not available for {self.task}; "
                             f"choose one of {', '.join(allowed)}")
        return self

    @property
    def selection_lower_is_better(self) -> bool:
        return self.select_on == "loss"
