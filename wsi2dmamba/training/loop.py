"""Cross-validated training of a registry model on a cohort's feature grids.

Layout under the run folder::

    RUN/train/splits/splits_<k>.csv               shared by every model trained in the run
    RUN/train/<name>/fold_<k>/config.json         training + model configuration, classes / time bins
    RUN/train/<name>/fold_<k>/log.csv             one row per epoch: losses, validation metric, lr, seconds
    RUN/train/<name>/fold_<k>/best.safetensors    checkpoint chosen on validation (+ best.json)
    RUN/train/<name>/fold_<k>/last.safetensors    checkpoint of the last epoch (+ last.json)
    RUN/train/<name>/fold_<k>/predictions.csv     validation and test predictions of both checkpoints
    RUN/train/<name>/fold_<k>/done.json           written last: the fold is complete (+ sha256 of its files)
    RUN/train/<name>/fold_<k>/resume.safetensors  while a fold runs: state to continue it after a stop

With ``--restarts K`` (K > 1) each fold is trained K times with seeds ``seed … seed + K − 1``, each restart in
``fold_<k>/restart_<r>/`` with the files above; the fold's own files are copies of the restart whose chosen
checkpoint scores best on validation, and ``fold_<k>/restarts.csv`` and ``done.json`` record every restart's
validation figures and which one was chosen.

A complete fold with the same configuration is skipped; an unfinished one continues from its last
finished epoch and ends exactly as an uninterrupted run would.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock, Timeout

from .. import run_layout as layout
from ..cohort import Cohort
from ..cohort.options import RunOptions
from ..errors import ConfigError, TrainingError, WsiError
from ..devices import resolve_device
from ..fold_files import write_done, write_table
from ..fileio import (
    atomic_path,
    ensure_writable,
    params_hash,
    remove_stale_temporaries,
    write_json_atomic,
)
from ..grid import FeatureGrid
from ..models.input_axes import fit_input_axes
from ..models.checkpoint import load_checkpoint, load_training_state, save_checkpoint, save_training_state
from .config import TrainConfig
from .data import (BatchMaker, Targets, batch_ids, class_names, iter_batches, load_feature_grids, make_targets,
                   to_device, worker_feature_grids)
from .fold_identity import adopt_runtime_only_change, model_identity
from .losses import class_weights, hazards_to_survival, nll_survival_loss, survival_bin_edges
from .splits import FoldSplit, load_splits, make_splits, resolve_splits, write_splits

EpochCallback = Callable[[dict[str, Any]], None]

#: The files of a finished fold whose sha256 ``done.json`` records (under ``outputs``).
FOLD_OUTPUTS = layout.FOLD_OUTPUTS


@dataclass
class FoldResult:
    """Outcome of one fold."""

    fold: int
    fold_dir: Path
    best_epoch: int
    best_value: float
    epochs: int
    skipped: bool = False
    chosen_restart: int | None = None
    restarts: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class TrainResults:
    """Outcome of :func:`train_cohort`."""

    name: str
    run_dir: Path
    model_dir: Path
    folds: list[FoldResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------- helpers

def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for this device (None = plain fp32)."""
    if device.type != "cuda" or config.precision == "fp32":
        return None
    if config.precision == "bf16" or (config.precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Learning-rate multiplier at optimiser step ``step`` (0-based): linear warm-up, then cosine decay."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _set_rng_states(states: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def _is_better(value: float, best: float | None, lower_is_better: bool) -> bool:
    if best is None:
        return True
    if not math.isfinite(value):
        return False
    if not math.isfinite(best):
        return True
    return value < best if lower_is_better else value > best


def check_finite_epoch(losses: torch.Tensor, norms: list, batches: list, first_step: int, accum_steps: int,
                       where: str) -> None:
    """Raise :class:`TrainingError` naming the first batch whose loss, or gradient norm, was not finite.

    Args:
        losses: (n_batches,) the epoch's batch losses, on the CPU.
        norms: (batch position, gradient norm tensor) of each clipped optimiser step.
        batches: the epoch's (slide ids, batch) pairs.
        first_step: the optimiser step the epoch started at.
        accum_steps: forward passes per optimiser step.
    """
    bad = torch.nonzero(~torch.isfinite(losses)).flatten()
    if len(bad):
        i = int(bad[0])
        raise TrainingError(f"{where}: the training loss became {float(losses[i])} on slide(s) "
                            f"{', '.join(batches[i][0])} (optimiser step {first_step + i // accum_steps}). Nothing "
                            "was written for this epoch; lower --lr, use --precision fp32, or check these slides' "
                            "features.")
    if norms:
        values = torch.stack([n for _, n in norms]).float().cpu()
        bad = torch.nonzero(~torch.isfinite(values)).flatten()
        if len(bad):
            i = norms[int(bad[0])][0]
            raise TrainingError(f"{where}: the gradient norm became {float(values[int(bad[0])])} on slide(s) "
                                f"{', '.join(batches[i][0])}; lower --lr or use --precision fp32.")


# ------------------------------------------------------------------------------------------ one fold

class _FoldTrainer:
    """State and steps of training one fold (kept small; :func:`train_fold` drives it)."""

    def __init__(self, model: torch.nn.Module, config: TrainConfig, targets: Targets,
                 grids: dict[str, FeatureGrid], device: torch.device, weights: torch.Tensor | None) -> None:
        self.model = model
        self.config = config
        self.targets = targets
        self.grids = grids
        self.device = device
        self.weights = weights.to(device) if weights is not None else None
        self.amp = autocast_dtype(config, device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == torch.float16 else None
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.batches = BatchMaker(grids, device)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp) if self.amp is not None else nullcontext()

    def loss(self, out, ids: Sequence[str], reduction: str = "mean", targets: dict | None = None) -> torch.Tensor:
        t = targets if targets is not None else self.device_targets(ids)
        logits = out.logits.float()
        if self.config.task == "survival":
            loss = nll_survival_loss(logits, t["bins"], t["event"], alpha=self.config.alpha, reduction=reduction)
        else:
            loss = F.cross_entropy(logits, t["label"], weight=self.weights, reduction=reduction)
        if out.aux_loss is not None and reduction == "mean":
            loss = out.slide_loss_weight * loss + out.aux_loss.float()
        return loss

    def device_targets(self, ids: Sequence[str]) -> dict[str, torch.Tensor]:
        return {k: to_device(v, self.device) for k, v in self.targets.tensors(ids).items()}

    def forward(self, ids: Sequence[str], batch, training: bool, targets: dict | None = None):
        batch = to_device(batch, self.device)
        with self._autocast():
            if training and self.config.task == "classification":
                labels = (targets if targets is not None else self.device_targets(ids))["label"]
                return self.model(batch, labels)
            return self.model(batch)

    def train_epoch(self, order: Sequence[str], step: int, total_steps: int, warmup_steps: int,
                    where: str) -> tuple[float, int]:
        """One pass over ``order``; returns (mean training loss, optimiser steps done so far)."""
        cfg = self.config
        self.model.train()
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        losses, norms = [], []  # kept on the device and checked once, after the epoch: no host sync per step
        groups = batch_ids(order, cfg.batch_size)
        batches = [(ids, None) for ids in groups]  # each batch is made when its step starts
        first_step = step
        for i, ids in enumerate(groups):
            targets = self.device_targets(ids)
            out = self.forward(ids, self.batches(ids), training=True, targets=targets)
            loss = self.loss(out, ids, targets=targets)
            losses.append(loss.detach())
            scaled = loss / cfg.accum_steps
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            if (i + 1) % cfg.accum_steps == 0 or i + 1 == len(batches):
                for g in opt.param_groups:
                    g["lr"] = cfg.lr * lr_factor(step, total_steps, warmup_steps, cfg.min_lr_ratio)
                if self.scaler:
                    self.scaler.unscale_(opt)
                if cfg.clip_grad is not None:
                    norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
                    if self.scaler is None:  # the scaler skips the steps whose gradients overflowed
                        norms.append((i, norm.detach()))
                if self.scaler:
                    self.scaler.step(opt)
                    self.scaler.update()
                else:
                    opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
        values = torch.stack(losses).double().cpu() if losses else torch.zeros(0, dtype=torch.float64)
        check_finite_epoch(values, norms, batches, first_step, cfg.accum_steps, where)
        return float(values.mean()), step

    @torch.no_grad()
    def predict(self, slide_ids: Sequence[str]) -> tuple[dict[str, np.ndarray], float]:
        """Per-slide outputs (probabilities, or risk and survival) and the mean loss over ``slide_ids``."""
        self.model.eval()
        logits_all, losses = [], []
        for ids, batch in iter_batches(list(slide_ids), self.grids, self.config.batch_size, self.batches):
            out = self.forward(ids, batch, training=False)
            losses.append(self.loss(out, ids, reduction="none").detach().cpu())
            logits_all.append(out.logits.detach().float().cpu())
        if not logits_all:
            return {}, math.nan
        logits = torch.cat(logits_all)
        bad = ~torch.isfinite(logits).all(dim=1)
        if bool(bad.any()):
            ids = [slide_ids[i] for i in torch.nonzero(bad).flatten().tolist()]
            raise TrainingError(f"the model's output is NaN or inf for slide(s) {', '.join(ids[:10])}; nothing was "
                                "written for them. Check these slides' features (e.g. huge values), or lower --lr.")
        loss = float(torch.cat(losses).mean())
        if self.config.task == "survival":
            from ..models import survival_risk

            _, surv = hazards_to_survival(logits)
            return {"risk": survival_risk(logits).numpy(), "surv": surv.numpy()}, loss
        return {"probs": torch.softmax(logits, dim=1).numpy()}, loss


def _selection_value(config: TrainConfig, outputs: dict[str, np.ndarray], loss: float, ids: Sequence[str],
                     targets: Targets) -> tuple[float, dict[str, float]]:
    """(value of ``config.select_on``, validation metrics for the log)."""
    from ..evaluation.metrics import classification_metrics, survival_metrics

    metrics: dict[str, float] = {"val_loss": loss}
    if not ids:
        return loss, metrics
    if config.task == "survival":
        m = survival_metrics(np.array([targets.time[s] for s in ids]), np.array([targets.event[s] for s in ids]),
                             outputs["risk"])
        metrics["val_c_index"] = m["c_index"]
    else:
        m = classification_metrics(np.array([targets.label_index[s] for s in ids]), outputs["probs"])
        for k in ("auc", "balanced_accuracy", "accuracy", "f1"):
            metrics[f"val_{k}"] = m[k]
    value = loss if config.select_on == "loss" else metrics[f"val_{config.select_on}"]
    return float(value), metrics


def patient_survival(cohort: Cohort, slide_ids: Sequence[str]) -> dict[str, list[Any]]:
    """One (time, event) per patient of ``slide_ids``, each patient once (from its first slide), so that
    a patient with several slides weighs as much as one with a single slide in the survival bins and the
    censoring estimate.

    Returns:
        ``{"patient_id": [...], "time": [...], "event": [...]}`` in order of first appearance.
    """
    first: dict[str, Any] = {}
    for sid in slide_ids:
        first.setdefault(cohort[sid].patient_id, cohort[sid])
    return {"patient_id": list(first), "time": [float(r.time) for r in first.values()],
            "event": [int(r.event) for r in first.values()]}


def _prediction_rows(fold: int, checkpoint: str, epoch: int, partition: str, ids: Sequence[str],
                     outputs: dict[str, np.ndarray], cohort: Cohort, targets: Targets, classes: Sequence[str] | None,
                     ) -> list[dict[str, Any]]:
    rows = []
    for i, sid in enumerate(ids):
        rec = cohort[sid]
        row: dict[str, Any] = {"fold": fold, "checkpoint": checkpoint, "epoch": epoch, "partition": partition,
                               "slide_id": sid, "patient_id": rec.patient_id}
        if targets.task == "survival":
            row.update(time=targets.time[sid], event=targets.event[sid], bin=targets.bins[sid],
                       risk=float(outputs["risk"][i]))
            row.update({f"surv_{k}": float(v) for k, v in enumerate(outputs["surv"][i])})
        else:
            probs = outputs["probs"][i]
            row.update(label=rec.label, target=targets.label_index[sid], pred=int(np.argmax(probs)),
                       pred_label=classes[int(np.argmax(probs))] if classes else "")
            row.update({f"prob_{k}": float(v) for k, v in enumerate(probs)})
        rows.append(row)
    return rows


def _json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; {} when the file is missing, damaged or holds something else."""
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _done_record_ok(info: dict[str, Any]) -> bool:
    """``done.json`` holds what a finished fold records (else it was edited or damaged)."""
    number = (int, float)
    return (isinstance(info.get("best_epoch"), int) and isinstance(info.get("epochs"), int)
            and isinstance(info.get("best_value"), number) and not isinstance(info.get("best_epoch"), bool))


def train_fold(split: FoldSplit, cohort: Cohort, grids: dict[str, FeatureGrid], fold_dir: str | os.PathLike[str],
               model_name: str, config: TrainConfig, *, model_overrides: dict[str, Any] | None = None,
               preset: str | None = None, classes: Sequence[str] | None = None, features_dir: str = "",
               force: bool = False, callbacks: Sequence[EpochCallback] = (), progress: bool = True) -> FoldResult:
    """Train one fold and write its folder (see the module docstring).

    With ``config.restarts`` = K > 1 the fold is trained K times, with seeds ``seed … seed + K − 1``, each in
    ``fold_dir/restart_<r>/`` (each resumes by itself); the restart whose chosen checkpoint scores best on
    the validation partition becomes the fold's result (see :func:`choose_restart`).

    Args:
        split: the fold's slide ids per partition.
        cohort: labels, survival times and patients of the slides.
        grids: slide_id → feature grid, for at least the fold's slides.
        fold_dir: output folder of the fold.
        model_name: registry name (``wsi2dmamba models`` lists them).
        config: training configuration.
        model_overrides: model configuration fields to override.
        preset: the model's named preset.
        classes: class names in index order (classification; default: the cohort's labels sorted).
        features_dir: recorded in the configuration.
        force: redo a fold that is complete or was made with another configuration.
        callbacks: called after every epoch with the epoch's log row (to log elsewhere or to stop).
        progress: show a progress bar.

    Raises:
        TrainingError: the loss or the gradients became NaN or inf (nothing is written for that epoch), or
            another process trains this fold now (``fold_dir/.lock`` is held).
        ConfigError: the fold exists with another configuration and ``force`` is False.
    """
    fold_dir = Path(fold_dir)
    fold_dir.mkdir(parents=True, exist_ok=True)
    kwargs = {"model_overrides": model_overrides, "preset": preset, "classes": classes,
              "features_dir": features_dir, "force": force, "callbacks": callbacks, "progress": progress}
    with fold_lock(fold_dir, split.fold):
        # Inside the lock: the temporaries of a job training this fold right now are never removed.
        if config.restarts == 1:
            return _train_once(split, cohort, grids, fold_dir, model_name, config, **kwargs)
        return _train_restarts(split, cohort, grids, fold_dir, model_name, config, **kwargs)


@contextmanager
def fold_lock(fold_dir: Path, fold: int) -> Iterator[None]:
    """Hold ``fold_dir/.lock`` while this process trains the fold (one job per fold, as one run per stage).

    Raises:
        TrainingError: another process trains the same fold of the same model in this run.
    """
    lock = FileLock(str(layout.lock_file(fold_dir)))
    try:
        lock.acquire(timeout=0)
    except Timeout as exc:
        raise TrainingError(f"Another process is training {fold_dir.parent.name} fold {fold} in {fold_dir} (lock "
                            f"file {layout.lock_file(fold_dir)}). Wait for it to finish, train other folds (--fold), or "
                            "use another --out or --name.") from exc
    try:
        yield
    finally:
        lock.release()


def _train_once(split: FoldSplit, cohort: Cohort, grids: dict[str, FeatureGrid], fold_dir: str | os.PathLike[str],
                model_name: str, config: TrainConfig, *, model_overrides: dict[str, Any] | None = None,
                preset: str | None = None, classes: Sequence[str] | None = None, features_dir: str = "",
                force: bool = False, callbacks: Sequence[EpochCallback] = (), progress: bool = True,
                label: str | None = None) -> FoldResult:
    """Train one fold once (one seed) and write its folder; arguments as :func:`train_fold`, plus ``label``,
    the fold's name in messages and progress bars."""
    from ..models import create

    fold_dir = Path(fold_dir)
    fold_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(fold_dir)
    where = label or f"{fold_dir.parent.name} fold {split.fold}"
    task = config.task
    overrides = dict(model_overrides or {})
    classes, survival = _fold_classes(cohort, split, config, classes)
    targets = make_targets(cohort, task, classes, survival["bin_edges"])

    in_dim = next(iter(grids.values())).feature_dim
    identity = {
        "train": train_identity(config), "model_name": model_name, "preset": preset,
        "model_overrides": model_identity(model_name, overrides), "classes": classes, "in_dim": in_dim,
        "split": {"train": list(split.train), "val": list(split.val), "test": list(split.test)},
        "features": Path(features_dir).name if features_dir else "",
    }
    config_hash = params_hash(identity)
    finished = _finished_or_cleared(fold_dir, split, identity, config_hash, force)
    if finished is not None:
        return finished

    device = resolve_device(config.device)
    torch.manual_seed(config.seed * 1000 + split.fold)
    model = create(model_name, in_dim=in_dim, n_classes=len(classes) if classes else None, task=task,
                   n_bins=config.n_bins, preset=preset, **overrides, **input_axes_option(config))
    if model.input_axes is not None:
        model.input_axes.load(fit_input_axes((grids[s].features for s in split.train), config.input_axes, device))
    model = model.to(device)
    weights = None
    if task == "classification" and config.class_weighting:
        weights = class_weights(np.array([targets.label_index[s] for s in split.train]), len(classes))
    trainer = _FoldTrainer(model, config, targets, grids, device, weights)

    fold_config = {
        **identity, "config_hash": config_hash, "fold": split.fold, "task": task, "model": model.config_dict(),
        "features_dir": str(Path(features_dir).resolve()) if features_dir else "",
        "bin_edges": None if survival["bin_edges"] is None else survival["bin_edges"].tolist(),
        "bin_ends": None if survival["bin_ends"] is None else survival["bin_ends"].tolist(),
        "train_survival": survival["train_survival"], "n_parameters": sum(p.numel() for p in model.parameters()),
        "device": str(device),
    }
    write_json_atomic(layout.fold_file(fold_dir, layout.FOLD_CONFIG), fold_config)
    loop = _train_epochs(trainer, split, config, fold_dir, where, callbacks, progress)

    rows: list[dict[str, Any]] = []
    last_epoch = loop["epoch"]
    for name, epoch in (("best", loop["best_epoch"]), ("last", last_epoch)):
        trainer.model = load_checkpoint(layout.checkpoint_file(fold_dir, name), device) if name == "best" else model
        for part in ("val", "test"):
            ids = list(split.partition(part))
            if ids:
                outputs, _ = trainer.predict(ids)
                rows += _prediction_rows(split.fold, name, epoch, part, ids, outputs, cohort, targets, classes)
    write_table(layout.fold_file(fold_dir, layout.FOLD_PREDICTIONS), rows)
    best_value = float(loop["best_value"]) if loop["best_value"] is not None else math.nan
    write_done(fold_dir, {"best_epoch": loop["best_epoch"], "best_value": best_value, "select_on": config.select_on,
                          "epochs": last_epoch, "config_hash": config_hash})
    layout.fold_file(fold_dir, layout.FOLD_RESUME).unlink(missing_ok=True)
    return FoldResult(split.fold, fold_dir, loop["best_epoch"], best_value, last_epoch)


def _fold_classes(cohort: Cohort, split: FoldSplit, config: TrainConfig,
                  classes: Sequence[str] | None) -> tuple[list[str] | None, dict[str, Any]]:
    """(class names, survival binning): the classes given or the cohort's (classification), or the time bins
    fitted on the fold's training patients only (survival: ``bin_edges``, ``bin_ends``, ``train_survival``)."""
    survival: dict[str, Any] = {"bin_edges": None, "bin_ends": None, "train_survival": None}
    if config.task != "survival":
        return (list(classes) if classes is not None else class_names(cohort)), survival
    train_surv = patient_survival(cohort, split.train)
    t, e = np.array(train_surv["time"], np.float64), np.array(train_surv["event"], np.int64)
    bin_edges = survival_bin_edges(t, e, config.n_bins)
    survival.update(bin_edges=bin_edges, bin_ends=np.append(bin_edges, t.max()), train_survival=train_surv)
    return None, survival


def _finished_or_cleared(fold_dir: Path, split: FoldSplit, identity: dict[str, Any], config_hash: str,
                         force: bool) -> FoldResult | None:
    """The fold's result when it is finished with this configuration (and not ``force``d); else None, after
    removing the records of a fold that is to be trained again from its start.

    Raises:
        ConfigError: the fold was trained with another configuration and ``force`` is False.
    """
    done_path = layout.fold_file(fold_dir, layout.FOLD_DONE)
    resume_path = layout.fold_file(fold_dir, layout.FOLD_RESUME)
    if not (done_path.is_file() or resume_path.is_file()):
        return None
    prior = _json_object(layout.fold_file(fold_dir, layout.FOLD_CONFIG))
    info = _json_object(done_path)
    if done_path.is_file() and not _done_record_ok(info):  # edited or damaged: the fold is redone
        done_path.unlink()
    if prior.get("config_hash") != config_hash and not adopt_runtime_only_change(fold_dir, prior, identity,
                                                                                 config_hash):
        if not force:
            raise ConfigError(f"{fold_dir} holds a fold trained with another configuration; pass --force to "
                              "retrain it, or train into another --out or --name.")
        done_path.unlink(missing_ok=True)
        resume_path.unlink(missing_ok=True)
    elif done_path.is_file() and not force:
        resume_path.unlink(missing_ok=True)  # a stop between writing done.json and removing it
        return FoldResult(split.fold, fold_dir, int(info["best_epoch"]), float(info["best_value"]),
                          int(info["epochs"]), skipped=True)
    elif force:
        done_path.unlink(missing_ok=True)
        resume_path.unlink(missing_ok=True)
    return None


def _train_epochs(trainer: _FoldTrainer, split: FoldSplit, config: TrainConfig, fold_dir: Path, where: str,
                  callbacks: Sequence[EpochCallback], progress: bool) -> dict[str, Any]:
    """Train the fold's remaining epochs (from its resume state, if any), writing after each the checkpoints,
    the log and the resume state; returns the loop state (``epoch``, ``best_epoch``, ``best_value``, ``log``)."""
    from tqdm.auto import tqdm

    model, device = trainer.model, trainer.device
    resume_path = layout.fold_file(fold_dir, layout.FOLD_RESUME)
    steps_per_epoch = math.ceil(math.ceil(len(split.train) / config.batch_size) / config.accum_steps)
    total_steps = steps_per_epoch * config.epochs
    warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))

    loop = {"epoch": 0, "step": 0, "best_value": None, "best_epoch": 0, "log": []}
    if resume_path.is_file():
        loop, rng = load_training_state(resume_path, model, trainer.optimizer)
        _set_rng_states(rng, device)

    bar = tqdm(total=config.epochs, initial=loop["epoch"], desc=where, unit="epoch", disable=not progress)
    while loop["epoch"] < config.epochs:
        epoch = loop["epoch"] + 1
        t0 = time.perf_counter()
        # The training order of an epoch depends only on (seed, fold, epoch), so a resumed fold repeats it.
        order = [split.train[i] for i in np.random.default_rng([config.seed, split.fold, epoch])
                 .permutation(len(split.train))]
        train_loss, loop["step"] = trainer.train_epoch(order, loop["step"], total_steps, warmup_steps,
                                                       f"{where}, epoch {epoch}")
        outputs, val_loss = trainer.predict(split.val)
        if not math.isfinite(val_loss):
            raise TrainingError(f"{where}, epoch {epoch}: the validation loss is {val_loss}; training diverged. "
                                "Lower --lr or use --precision fp32.")
        value, metrics = _selection_value(config, outputs, val_loss, split.val, trainer.targets)
        row = {"epoch": epoch, "train_loss": train_loss, **metrics,
               "lr": trainer.optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
        improved = _is_better(value, loop["best_value"], config.selection_lower_is_better)
        if improved:
            loop["best_value"], loop["best_epoch"] = value, epoch
            save_checkpoint(layout.checkpoint_file(fold_dir, "best"), model,
                            {"epoch": epoch, "select_on": config.select_on, "value": value})
        row["selected"] = loop["best_epoch"] == epoch
        loop["log"].append(row)
        loop["epoch"] = epoch
        save_checkpoint(layout.checkpoint_file(fold_dir, "last"), model, {"epoch": epoch})
        write_table(layout.fold_file(fold_dir, layout.FOLD_LOG), loop["log"])
        save_training_state(resume_path, model, trainer.optimizer, loop, _rng_states(device))
        bar.update(1)
        bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val_loss:.3f}", best=loop["best_epoch"])
        for cb in callbacks:
            cb({**row, "fold": split.fold, "fold_dir": str(fold_dir)})
    bar.close()
    return loop


# -------------------------------------------------------------------------------------- restarts

def restart_config(config: TrainConfig, restart: int) -> TrainConfig:
    """The configuration of restart ``restart`` of a fold: seed ``config.seed + restart``, one training."""
    return config.model_copy(update={"seed": config.seed + restart, "restarts": 1})


def choose_restart(values: Sequence[float], lower_is_better: bool) -> int:
    """Index of the best validation value; ties and NaNs go to the earlier restart.

    Args:
        values: (K,) each restart's validation value of ``select_on`` at its chosen epoch.
        lower_is_better: True for a loss.
    """
    best: float | None = None
    chosen = 0
    for r, value in enumerate(values):
        if _is_better(float(value), best, lower_is_better):
            best, chosen = float(value), r
    return chosen


def _restart_record(restart: int, seed: int, restart_dir: Path) -> dict[str, Any]:
    """What a finished restart scored on validation: its chosen epoch, the value of ``select_on`` there,
    and every validation metric of that epoch's log row."""
    import json

    import pandas as pd

    done = json.loads(layout.fold_file(restart_dir, layout.FOLD_DONE).read_text())
    log = pd.read_csv(layout.fold_file(restart_dir, layout.FOLD_LOG))
    row = log[log["epoch"] == int(done["best_epoch"])]
    val = {c: float(row[c].iloc[0]) for c in log.columns if c.startswith("val_") and len(row)}
    return {"restart": restart, "seed": seed, "best_epoch": int(done["best_epoch"]),
            "best_value": float(done["best_value"]), "config_hash": done["config_hash"], **val}


def _copy_atomic(src: Path, dst: Path) -> None:
    import shutil

    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def _prior_restarts(fold_dir: Path, force: bool) -> dict[str, Any] | None:
    """The ``done.json`` of a fold already chosen among restarts (None if there is none); a fold trained
    once, without restarts, is refused unless ``force``."""
    import json

    done_path = layout.fold_file(fold_dir, layout.FOLD_DONE)
    prior = json.loads(done_path.read_text()) if done_path.is_file() else None
    if prior is not None and "restarts" not in prior and not force:
        raise ConfigError(f"{fold_dir} holds a fold trained once, without --restarts; pass --force to retrain "
                          "it, or train into another --out or --name.")
    return prior


def _train_restarts(split: FoldSplit, cohort: Cohort, grids: dict[str, FeatureGrid], fold_dir: Path,
                    model_name: str, config: TrainConfig, *, force: bool = False, **kwargs: Any) -> FoldResult:
    """Train ``config.restarts`` restarts of one fold and give the fold the files of the one that validation
    picks (copied into ``fold_dir``, so that every reader of a fold sees one ordinary fold).

    ``fold_dir/done.json`` records every restart's validation figures (``restarts``) and the choice
    (``chosen_restart``); ``fold_dir/restarts.csv`` lists the same figures for people.
    """
    fold_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(fold_dir)
    prior = _prior_restarts(fold_dir, force)
    where = f"{fold_dir.parent.name} fold {split.fold}"
    results, records = [], []
    for r in range(config.restarts):
        cfg = restart_config(config, r)
        results.append(_train_once(split, cohort, grids, layout.restart_dir(fold_dir, r), model_name, cfg,
                                   force=force, label=f"{where} restart {r + 1}/{config.restarts}", **kwargs))
        records.append(_restart_record(r, cfg.seed, layout.restart_dir(fold_dir, r)))
    chosen = choose_restart([rec["best_value"] for rec in records], config.selection_lower_is_better)
    config_hash = params_hash({"select_on": config.select_on, "restarts": [rec["config_hash"] for rec in records]})
    if prior is not None and prior.get("config_hash") == config_hash and all(res.skipped for res in results):
        return FoldResult(split.fold, fold_dir, int(prior["best_epoch"]), float(prior["best_value"]),
                          int(prior["epochs"]), skipped=True, chosen_restart=chosen, restarts=records)
    best = results[chosen]
    _write_chosen_restart(fold_dir, config, config_hash, chosen, records, best)
    return FoldResult(split.fold, fold_dir, best.best_epoch, best.best_value, best.epochs, chosen_restart=chosen,
                      restarts=records)


def _write_chosen_restart(fold_dir: Path, config: TrainConfig, config_hash: str, chosen: int,
                          records: list[dict[str, Any]], best: FoldResult) -> None:
    """Give ``fold_dir`` the files of restart ``chosen``; ``done.json`` last."""
    import json

    layout.fold_file(fold_dir, layout.FOLD_DONE).unlink(missing_ok=True)  # unfinished until its files are chosen
    src = layout.restart_dir(fold_dir, chosen)
    for name in FOLD_OUTPUTS:
        if name != layout.FOLD_CONFIG:
            _copy_atomic(layout.fold_file(src, name), layout.fold_file(fold_dir, name))
    fold_config = json.loads(layout.fold_file(src, layout.FOLD_CONFIG).read_text())
    fold_config.update({"train": config.model_dump(mode="json"), "config_hash": config_hash,
                        "chosen_restart": chosen, "restart_seed": records[chosen]["seed"]})
    write_json_atomic(layout.fold_file(fold_dir, layout.FOLD_CONFIG), fold_config)
    write_table(layout.fold_file(fold_dir, layout.FOLD_RESTARTS),
                [{**rec, "chosen": rec["restart"] == chosen} for rec in records])
    write_done(fold_dir, {
        "best_epoch": best.best_epoch, "best_value": best.best_value, "select_on": config.select_on,
        "epochs": best.epochs, "config_hash": config_hash, "chosen_restart": chosen, "restarts": records})


# ---------------------------------------------------------------------------------------- a cohort

def _check_before_training(cohort: Cohort, run_dir: Path, config: TrainConfig, executor: str) -> list[str] | None:
    """Refuse what would fail or mislead only later: an output folder that cannot be written, an unusable
    device, a classification cohort of one class. Returns the class names (None for survival)."""
    ensure_writable(layout.train_dir(run_dir))
    if executor == "local":  # on a Ray cluster the devices are those of its nodes
        resolve_device(config.device)
    classes = class_names(cohort) if config.task == "classification" else None
    if classes is not None and len(classes) < 2:
        where = cohort.source or "the cohort"
        raise ConfigError(f"{where}: the 'label' column holds {len(classes)} class ({', '.join(map(repr, classes))})"
                          "; a classifier needs slides of at least two classes (its AUC, balanced accuracy and F1 "
                          "would be undefined or trivially 1). Add the other classes' slides, or use --task survival "
                          "with time and event columns.")
    return classes


def train_identity(config: TrainConfig) -> dict[str, Any]:
    """The training options that are part of a fold's identity.

    ``restarts`` is left out: one restart's result depends on its seed only, as a plain run's does.
    ``input_axes`` is left out while 0, so folds trained before the option existed keep their hash.
    """
    return config.model_dump(mode="json", exclude={"restarts"} | ({"input_axes"} if not config.input_axes else set()))


def input_axes_option(config: TrainConfig) -> dict[str, int]:
    """The model option that gives a model its input axes (fitted by training), or nothing."""
    return {"input_axes": config.input_axes} if config.input_axes else {}


def _check_model(model_name: str, preset: str | None, overrides: dict[str, Any] | None, config: TrainConfig,
                 classes: list[str] | None) -> None:
    """Build the model once on the meta device (no memory), so that an unknown model or preset, or a bad
    option, is refused before the run's splits are written."""
    from ..models import create

    if "input_axes" in (overrides or {}):
        raise ConfigError(f"model {model_name!r}: input_axes is a training option (train --input-axes, or "
                          "[train] input_axes), because training fits the axes on each fold; not a model option")
    with torch.device("meta"):
        create(model_name, in_dim=max(8, config.input_axes), n_classes=len(classes) if classes else None,
               task=config.task, n_bins=config.n_bins, preset=preset, **dict(overrides or {}),
               **input_axes_option(config))


def run_splits(cohort: Cohort, run_dir: Path, config: TrainConfig, splits: str | os.PathLike[str] | None,
               ) -> tuple[list[FoldSplit], list[str]]:
    """The run's splits: given (``--splits``), already in the run, or made now; written to ``RUN/train/splits``.

    Every model trained in one run uses the same splits, so their results compare fold by fold.
    """
    split_dir = layout.splits_dir(run_dir)
    split_dir.mkdir(parents=True, exist_ok=True)
    # Jobs training other folds or models of the run share this folder: one at a time reads and writes it,
    # so temporaries left there by a killed job can be removed.
    with FileLock(str(layout.lock_file(split_dir))):
        remove_stale_temporaries(split_dir)
        if splits is not None:
            raw = load_splits(splits)
        elif split_dir.is_dir() and any(split_dir.glob(layout.SPLIT_GLOB)):
            raw = load_splits(split_dir)
            if len(raw) < config.folds:  # a run stopped while it wrote the split files: finish writing them
                fresh = make_splits(cohort, config.folds, config.seed, config.task, config.val_fraction)
                raw = fresh if raw == fresh[: len(raw)] else raw
            if len(raw) != config.folds:
                raise ConfigError(f"{split_dir} holds {len(raw)} folds but --folds is {config.folds}; use --folds "
                                  f"{len(raw)} to compare with the models already trained in this run, or another "
                                  "--out.")
        else:
            raw = make_splits(cohort, config.folds, config.seed, config.task, config.val_fraction)
        resolved, warnings = resolve_splits(raw, cohort)
        if splits is not None and split_dir.is_dir() and any(split_dir.glob(layout.SPLIT_GLOB)):
            existing, _ = resolve_splits(load_splits(split_dir), cohort)
            if existing != resolved:
                raise ConfigError(f"--splits {splits} differs from the splits already used in this run "
                                  f"({split_dir}); train into another --out to use other splits.")
        write_splits(resolved, split_dir, cohort, config.task)
        return resolved, warnings


def train_cohort(cohort: Cohort, features_dir: str | os.PathLike[str], run_dir: str | os.PathLike[str],
                 model_name: str, config: TrainConfig, model_overrides: dict[str, Any] | None = None,
                 options: RunOptions | None = None, *, preset: str | None = None, name: str | None = None,
                 splits: str | os.PathLike[str] | None = None, folds_to_run: Sequence[int] | None = None,
                 callbacks: Sequence[EpochCallback] = (), **settings: Any) -> TrainResults:
    """Train ``model_name`` with k-fold cross-validation on a cohort's feature grids.

    Args:
        cohort: slides with labels (classification) or time and event (survival), and patients.
        features_dir: folder of ``<slide_id>.h5`` feature grids (``RUN/features/<encoder>``).
        run_dir: the run folder; results go to ``RUN/train/<name>/fold_<k>/``.
        model_name: a model key: registry name of the model, optionally ``name:preset``.
        config: training configuration.
        model_overrides: model configuration fields to override.
        preset: named preset of the model (e.g. ``paper``), if the key names none.
        name: folder name of this model in the run (default: the model name, plus ``-<preset>``).
        splits: a folder of ``splits_<k>.csv`` (or one CSV) to use instead of making splits.
        folds_to_run: only these folds (e.g. one per job); default all.
        callbacks: called after every epoch with its log row (in the process that trains the fold).
        options: how the folds run (:class:`~wsi2dmamba.cohort.RunOptions`; or its fields as keywords):
            ``force`` retrains folds that are complete or were trained with another configuration;
            ``progress`` shows progress bars; ``executor``: ``"local"``: folds one after another in this
            process, or, when the device is a GPU (``auto``/``cuda``) and several GPUs are visible, one
            worker process per GPU training folds side by side; ``"ray"``: each fold a Ray task with one
            GPU (when the cluster has GPUs), on the cluster at ``ray_address``. ``workers`` and ``shard``
            are not used.
    """
    options = RunOptions.of(options, **settings)
    force, progress = options.force, options.progress
    run_dir = Path(run_dir)
    model_name, preset, folder = _resolve_model_key(model_name, preset)
    name = name or folder
    if not name or any(c in name for c in "/\\\0") or name in (".", "..", "splits"):
        raise ConfigError(f"--name {name!r} cannot be used as a folder name")
    classes = _check_before_training(cohort, run_dir, config, options.executor)
    _check_model(model_name, preset, model_overrides, config, classes)
    resolved, warnings = run_splits(cohort, run_dir, config, splits)
    folds = list(range(len(resolved))) if folds_to_run is None else sorted(set(folds_to_run))
    bad = [k for k in folds if not 0 <= k < len(resolved)]
    if bad:
        raise ConfigError(f"--fold {bad} out of range: the splits have folds 0…{len(resolved) - 1}")
    model_dir = layout.model_dir(run_dir, name)
    results = TrainResults(name, run_dir, model_dir, warnings=warnings)
    fold_kwargs = dict(model_overrides=model_overrides, preset=preset, classes=classes,
                       features_dir=str(features_dir), force=force, callbacks=callbacks)
    spread = _fold_executor(options.executor, config, len(folds), options.ray_address)
    if spread is not None:
        results.folds += _train_folds_spread(spread, [resolved[k] for k in folds], cohort, features_dir,
                                             model_dir, model_name, config, fold_kwargs, progress)
        return results
    needed = sorted({s for k in folds for s in resolved[k].partition_of()})
    grids = load_feature_grids(cohort, features_dir, needed, progress=progress)
    for k in folds:
        results.folds.append(train_fold(resolved[k], cohort, grids, layout.fold_dir(model_dir, k), model_name, config,
                                        model_overrides=model_overrides, preset=preset, classes=classes,
                                        features_dir=str(features_dir), force=force, callbacks=callbacks,
                                        progress=progress))
    return results


def _resolve_model_key(key: str, preset: str | None) -> tuple[str, str | None, str]:
    """(registry name, preset, run folder) of a model key and a separately given preset; both checked."""
    from ..models.registry import model_folder, model_key, resolve_model_key

    name, preset = resolve_model_key(key, preset)
    return name, preset, model_folder(model_key(name, preset))


# ------------------------------------------------------------------------- folds in other processes

def _fold_executor(executor: str, config: TrainConfig, n_folds: int, ray_address: str | None):
    """The executor that trains folds side by side, or None to train them here, one after another."""
    from ..cohort.executors import TaskResources, make_executor, visible_gpus

    on_gpu = config.device in ("auto", "cuda")
    if executor == "ray":
        if config.device.startswith("cuda:"):
            raise ConfigError(f"--device {config.device}: with --executor ray each fold gets its GPU from Ray; "
                              "use --device cuda or auto.")
        return make_executor("ray", resources=TaskResources(cpus=1, gpus=1 if on_gpu else 0),
                             ray_address=ray_address)
    if ray_address:
        raise ConfigError("--ray-address is only used with --executor ray.")
    if on_gpu and n_folds > 1 and len(visible_gpus()) > 1:
        return make_executor("local", resources=TaskResources(cpus=1, gpus=1))
    return None


def _train_fold_task(split: FoldSplit, cohort: Cohort, features_dir: str, fold_dir: Path, model_name: str,
                     config: TrainConfig, fold_kwargs: dict[str, Any]) -> FoldResult:
    """One fold in a worker process: its grids (read once per worker), trained there (on its GPU, if any)."""
    grids = worker_feature_grids(cohort, features_dir, sorted(split.partition_of()))
    return train_fold(split, cohort, grids, fold_dir, model_name, config, progress=False, **fold_kwargs)


def _train_folds_spread(executor: Any, splits: list[FoldSplit], cohort: Cohort, features_dir: Any,
                        model_dir: Path, model_name: str, config: TrainConfig, fold_kwargs: dict[str, Any],
                        progress: bool) -> list[FoldResult]:
    """Train ``splits`` as tasks of ``executor``; every fold runs to its end before the first error is raised."""
    from tqdm.auto import tqdm

    tasks = [(sp.fold, (sp, cohort, str(features_dir), layout.fold_dir(model_dir, sp.fold), model_name, config,
                        fold_kwargs)) for sp in splits]
    done: list[FoldResult] = []
    errors: list[tuple[int, BaseException]] = []
    with tqdm(total=len(tasks), desc=f"{model_dir.name} folds ({executor.describe()})", unit="fold",
              disable=not progress) as bar:
        for out in executor.map(_train_fold_task, tasks):
            if out.ok:
                done.append(out.value)
            else:
                errors.append((out.key, out.error))
            bar.update(1)
    if errors:
        fold, exc = min(errors, key=lambda e: e[0])
        if isinstance(exc, WsiError):
            raise exc
        raise TrainingError(f"{model_dir.name} fold {fold} did not finish: {type(exc).__name__}: {exc}") from exc
    return sorted(done, key=lambda r: r.fold)
