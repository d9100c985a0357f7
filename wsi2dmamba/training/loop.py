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

A complete fold with the same configuration is skipped; an unfinished one continues from its last
finished epoch and ends exactly as an uninterrupted run would.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock

from ..cohort import Cohort
from ..errors import ConfigError, TrainingError, WsiError
from ..devices import resolve_device
from ..fileio import file_sha256, params_hash, remove_stale_temporaries, write_json_atomic, write_text_atomic
from ..grid import FeatureGrid
from .checkpoint import load_checkpoint, load_training_state, save_checkpoint, save_training_state
from .config import TrainConfig
from .data import Targets, class_names, iter_batches, load_feature_grids, make_targets
from .losses import class_weights, hazards_to_survival, nll_survival_loss, survival_bin_edges
from .splits import FoldSplit, load_splits, make_splits, resolve_splits, write_splits

EpochCallback = Callable[[dict[str, Any]], None]

#: The files of a finished fold whose sha256 ``done.json`` records (under ``outputs``).
FOLD_OUTPUTS = ("config.json", "log.csv", "best.safetensors", "best.json", "last.safetensors", "last.json",
                "predictions.csv")


@dataclass
class FoldResult:
    """Outcome of one fold."""

    fold: int
    fold_dir: Path
    best_epoch: int
    best_value: float
    epochs: int
    skipped: bool = False


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


def _csv_text(rows: Sequence[dict[str, Any]]) -> str:
    import pandas as pd

    return pd.DataFrame(list(rows)).to_csv(index=False)


def _is_better(value: float, best: float | None, lower_is_better: bool) -> bool:
    if best is None:
        return True
    if not math.isfinite(value):
        return False
    if not math.isfinite(best):
        return True
    return value < best if lower_is_better else value > best


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

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp) if self.amp is not None else nullcontext()

    def loss(self, out, ids: Sequence[str], reduction: str = "mean") -> torch.Tensor:
        t = {k: v.to(self.device) for k, v in self.targets.tensors(ids).items()}
        logits = out.logits.float()
        if self.config.task == "survival":
            loss = nll_survival_loss(logits, t["bins"], t["event"], alpha=self.config.alpha, reduction=reduction)
        else:
            loss = F.cross_entropy(logits, t["label"], weight=self.weights, reduction=reduction)
        if out.aux_loss is not None and reduction == "mean":
            loss = loss + out.aux_loss.float()
        return loss

    def forward(self, ids: Sequence[str], batch, training: bool):
        batch = batch.to(self.device)
        with self._autocast():
            if training and self.config.task == "classification":
                return self.model(batch, self.targets.tensors(ids)["label"].to(self.device))
            return self.model(batch)

    def train_epoch(self, order: Sequence[str], step: int, total_steps: int, warmup_steps: int,
                    where: str) -> tuple[float, int]:
        """One pass over ``order``; returns (mean training loss, optimiser steps done so far)."""
        cfg = self.config
        self.model.train()
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        losses = []
        batches = list(iter_batches(order, self.grids, cfg.batch_size))
        for i, (ids, batch) in enumerate(batches):
            out = self.forward(ids, batch, training=True)
            loss = self.loss(out, ids)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainingError(f"{where}: the training loss became {value} on slide(s) {', '.join(ids)} "
                                    f"(optimiser step {step}). Nothing was written for this epoch; lower --lr, "
                                    "use --precision fp32, or check these slides' features.")
            losses.append(value)
            scaled = loss / cfg.accum_steps
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            if (i + 1) % cfg.accum_steps == 0 or i + 1 == len(batches):
                for g in opt.param_groups:
                    g["lr"] = cfg.lr * lr_factor(step, total_steps, warmup_steps, cfg.min_lr_ratio)
                if self.scaler:
                    self.scaler.unscale_(opt)
                if cfg.clip_grad is not None:
                    norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
                    if not torch.isfinite(norm) and self.scaler is None:
                        raise TrainingError(f"{where}: the gradient norm became {float(norm)} on slide(s) "
                                            f"{', '.join(ids)}; lower --lr or use --precision fp32.")
                if self.scaler:
                    self.scaler.step(opt)
                    self.scaler.update()
                else:
                    opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
        return float(np.mean(losses)), step

    @torch.no_grad()
    def predict(self, slide_ids: Sequence[str]) -> tuple[dict[str, np.ndarray], float]:
        """Per-slide outputs (probabilities, or risk and survival) and the mean loss over ``slide_ids``."""
        self.model.eval()
        logits_all, losses = [], []
        for ids, batch in iter_batches(list(slide_ids), self.grids, self.config.batch_size):
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


def train_fold(split: FoldSplit, cohort: Cohort, grids: dict[str, FeatureGrid], fold_dir: str | os.PathLike[str],
               model_name: str, config: TrainConfig, *, model_overrides: dict[str, Any] | None = None,
               preset: str | None = None, classes: Sequence[str] | None = None, features_dir: str = "",
               force: bool = False, callbacks: Sequence[EpochCallback] = (), progress: bool = True) -> FoldResult:
    """Train one fold and write its folder (see the module docstring).

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
        TrainingError: the loss or the gradients became NaN or inf (nothing is written for that epoch).
        ConfigError: the fold exists with another configuration and ``force`` is False.
    """
    from tqdm.auto import tqdm

    from ..models import create

    fold_dir = Path(fold_dir)
    fold_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(fold_dir)
    where = f"{fold_dir.parent.name} fold {split.fold}"
    task = config.task
    overrides = dict(model_overrides or {})

    bin_edges = bin_ends = None
    train_surv = None
    if task == "survival":
        t = np.array([cohort[s].time for s in split.train], np.float64)
        e = np.array([cohort[s].event for s in split.train], np.int64)
        bin_edges = survival_bin_edges(t, e, config.n_bins)  # fitted on the training partition only
        bin_ends = np.append(bin_edges, t.max())
        train_surv = {"time": t.tolist(), "event": e.tolist()}
        classes = None
    else:
        classes = list(classes) if classes is not None else class_names(cohort)
    targets = make_targets(cohort, task, classes, bin_edges)

    in_dim = next(iter(grids.values())).feature_dim
    identity = {
        "train": config.model_dump(mode="json"), "model_name": model_name, "preset": preset,
        "model_overrides": overrides, "classes": classes, "in_dim": in_dim,
        "split": {"train": list(split.train), "val": list(split.val), "test": list(split.test)},
        "features": Path(features_dir).name if features_dir else "",
    }
    config_hash = params_hash(identity)
    done_path = fold_dir / "done.json"
    resume_path = fold_dir / "resume.safetensors"
    if done_path.is_file() or resume_path.is_file():
        import json

        prior = json.loads((fold_dir / "config.json").read_text()) if (fold_dir / "config.json").is_file() else {}
        if prior.get("config_hash") != config_hash:
            if not force:
                raise ConfigError(f"{fold_dir} holds a fold trained with another configuration; pass --force to "
                                  "retrain it, or train into another --out or --name.")
            done_path.unlink(missing_ok=True)
            resume_path.unlink(missing_ok=True)
        elif done_path.is_file() and not force:
            resume_path.unlink(missing_ok=True)  # a stop between writing done.json and removing it
            info = json.loads(done_path.read_text())
            return FoldResult(split.fold, fold_dir, int(info["best_epoch"]), float(info["best_value"]),
                              int(info["epochs"]), skipped=True)
        elif force:
            done_path.unlink(missing_ok=True)
            resume_path.unlink(missing_ok=True)

    device = resolve_device(config.device)
    torch.manual_seed(config.seed * 1000 + split.fold)
    model = create(model_name, in_dim=in_dim, n_classes=len(classes) if classes else None, task=task,
                   n_bins=config.n_bins, preset=preset, **overrides).to(device)
    weights = None
    if task == "classification" and config.class_weighting:
        weights = class_weights(np.array([targets.label_index[s] for s in split.train]), len(classes))
    trainer = _FoldTrainer(model, config, targets, grids, device, weights)

    fold_config = {
        **identity, "config_hash": config_hash, "fold": split.fold, "task": task, "model": model.config_dict(),
        "features_dir": str(Path(features_dir).resolve()) if features_dir else "",
        "bin_edges": None if bin_edges is None else bin_edges.tolist(),
        "bin_ends": None if bin_ends is None else bin_ends.tolist(),
        "train_survival": train_surv, "n_parameters": sum(p.numel() for p in model.parameters()),
        "device": str(device),
    }
    write_json_atomic(fold_dir / "config.json", fold_config)

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
        value, metrics = _selection_value(config, outputs, val_loss, split.val, targets)
        row = {"epoch": epoch, "train_loss": train_loss, **metrics,
               "lr": trainer.optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
        improved = _is_better(value, loop["best_value"], config.selection_lower_is_better)
        if improved:
            loop["best_value"], loop["best_epoch"] = value, epoch
            save_checkpoint(fold_dir / "best.safetensors", model,
                            {"epoch": epoch, "select_on": config.select_on, "value": value})
        row["selected"] = loop["best_epoch"] == epoch
        loop["log"].append(row)
        loop["epoch"] = epoch
        save_checkpoint(fold_dir / "last.safetensors", model, {"epoch": epoch})
        write_text_atomic(fold_dir / "log.csv", _csv_text(loop["log"]))
        save_training_state(resume_path, model, trainer.optimizer, loop, _rng_states(device))
        bar.update(1)
        bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val_loss:.3f}", best=loop["best_epoch"])
        for cb in callbacks:
            cb({**row, "fold": split.fold, "fold_dir": str(fold_dir)})
    bar.close()

    rows: list[dict[str, Any]] = []
    last_epoch = loop["epoch"]
    for name, epoch in (("best", loop["best_epoch"]), ("last", last_epoch)):
        trainer.model = load_checkpoint(fold_dir / f"{name}.safetensors", device) if name == "best" else model
        for part in ("val", "test"):
            ids = list(split.partition(part))
            if ids:
                outputs, _ = trainer.predict(ids)
                rows += _prediction_rows(split.fold, name, epoch, part, ids, outputs, cohort, targets, classes)
    write_text_atomic(fold_dir / "predictions.csv", _csv_text(rows))
    best_value = float(loop["best_value"]) if loop["best_value"] is not None else math.nan
    outputs = {n: file_sha256(fold_dir / n) for n in FOLD_OUTPUTS}  # compared by `wsi2dmamba verify`
    write_json_atomic(done_path, {"best_epoch": loop["best_epoch"], "best_value": best_value,
                                  "select_on": config.select_on, "epochs": last_epoch, "config_hash": config_hash,
                                  "outputs": outputs})
    resume_path.unlink(missing_ok=True)
    return FoldResult(split.fold, fold_dir, loop["best_epoch"], best_value, last_epoch)


# ---------------------------------------------------------------------------------------- a cohort

def run_splits(cohort: Cohort, run_dir: Path, config: TrainConfig, splits: str | os.PathLike[str] | None,
               ) -> tuple[list[FoldSplit], list[str]]:
    """The run's splits: given (``--splits``), already in the run, or made now; written to ``RUN/train/splits``.

    Every model trained in one run uses the same splits, so their results compare fold by fold.
    """
    split_dir = run_dir / "train" / "splits"
    split_dir.mkdir(parents=True, exist_ok=True)
    # Jobs training other folds or models of the run share this folder: one at a time reads and writes it,
    # so temporaries left there by a killed job can be removed.
    with FileLock(str(split_dir / ".lock")):
        remove_stale_temporaries(split_dir)
        if splits is not None:
            raw = load_splits(splits)
        elif split_dir.is_dir() and any(split_dir.glob("splits_*.csv")):
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
        if splits is not None and split_dir.is_dir() and any(split_dir.glob("splits_*.csv")):
            existing, _ = resolve_splits(load_splits(split_dir), cohort)
            if existing != resolved:
                raise ConfigError(f"--splits {splits} differs from the splits already used in this run "
                                  f"({split_dir}); train into another --out to use other splits.")
        write_splits(resolved, split_dir, cohort, config.task)
        return resolved, warnings


def train_cohort(cohort: Cohort, features_dir: str | os.PathLike[str], run_dir: str | os.PathLike[str],
                 model_name: str, config: TrainConfig, model_overrides: dict[str, Any] | None = None, *,
                 preset: str | None = None, name: str | None = None, splits: str | os.PathLike[str] | None = None,
                 folds_to_run: Sequence[int] | None = None, force: bool = False,
                 callbacks: Sequence[EpochCallback] = (), progress: bool = True,
                 executor: str = "local", ray_address: str | None = None) -> TrainResults:
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
        force: retrain folds that are complete or were trained with another configuration.
        callbacks: called after every epoch with its log row (in the process that trains the fold).
        progress: progress bars.
        executor: ``"local"``: folds one after another in this process, or, when the device is a GPU
            (``auto``/``cuda``) and several GPUs are visible, one worker process per GPU training folds
            side by side; ``"ray"``: each fold a Ray task with one GPU (when the cluster has GPUs).
        ray_address: the Ray cluster for ``executor="ray"`` (None: start a local one).
    """
    run_dir = Path(run_dir)
    model_name, preset, folder = _resolve_model_key(model_name, preset)
    name = name or folder
    if not name or any(c in name for c in "/\\\0") or name in (".", "..", "splits"):
        raise ConfigError(f"--name {name!r} cannot be used as a folder name")
    resolved, warnings = run_splits(cohort, run_dir, config, splits)
    folds = list(range(len(resolved))) if folds_to_run is None else sorted(set(folds_to_run))
    bad = [k for k in folds if not 0 <= k < len(resolved)]
    if bad:
        raise ConfigError(f"--fold {bad} out of range: the splits have folds 0…{len(resolved) - 1}")
    classes = class_names(cohort) if config.task == "classification" else None
    model_dir = run_dir / "train" / name
    results = TrainResults(name, run_dir, model_dir, warnings=warnings)
    fold_kwargs = dict(model_overrides=model_overrides, preset=preset, classes=classes,
                       features_dir=str(features_dir), force=force, callbacks=callbacks)
    spread = _fold_executor(executor, config, len(folds), ray_address)
    if spread is not None:
        results.folds += _train_folds_spread(spread, [resolved[k] for k in folds], cohort, features_dir,
                                             model_dir, model_name, config, fold_kwargs, progress)
        return results
    needed = sorted({s for k in folds for s in resolved[k].partition_of()})
    grids = load_feature_grids(cohort, features_dir, needed, progress=progress)
    for k in folds:
        results.folds.append(train_fold(resolved[k], cohort, grids, model_dir / f"fold_{k}", model_name, config,
                                        model_overrides=model_overrides, preset=preset, classes=classes,
                                        features_dir=str(features_dir), force=force, callbacks=callbacks,
                                        progress=progress))
    return results


def _resolve_model_key(key: str, preset: str | None) -> tuple[str, str | None, str]:
    """(registry name, preset, run folder) of a model key and a separately given preset; both checked."""
    from ..models.registry import check_model_key, model_folder, model_key, split_model_key

    name, key_preset = split_model_key(key)
    preset = None if preset in (None, "default") else preset
    if key_preset is not None and preset is not None and preset != key_preset:
        raise ConfigError(f"--preset {preset} contradicts the model key {key!r}; give the preset once")
    full = model_key(name, key_preset or preset)
    name, preset = check_model_key(full)
    return name, preset, model_folder(full)


# ------------------------------------------------------------------------- folds in other processes

def _fold_executor(executor: str, config: TrainConfig, n_folds: int, ray_address: str | None):
    """The executor that trains folds side by side, or None to train them here, one after another."""
    from ..cohort.executors import EXECUTORS, TaskResources, make_executor, visible_gpus

    if executor not in EXECUTORS:
        raise ConfigError(f"Unknown executor {executor!r}; use one of: {', '.join(EXECUTORS)}.")
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
    """One fold in a worker process: load its grids, train it there (on the worker's GPU, if any)."""
    grids = load_feature_grids(cohort, features_dir, sorted(split.partition_of()), progress=False)
    return train_fold(split, cohort, grids, fold_dir, model_name, config, progress=False, **fold_kwargs)


def _train_folds_spread(executor: Any, splits: list[FoldSplit], cohort: Cohort, features_dir: Any,
                        model_dir: Path, model_name: str, config: TrainConfig, fold_kwargs: dict[str, Any],
                        progress: bool) -> list[FoldResult]:
    """Train ``splits`` as tasks of ``executor``; every fold runs to its end before the first error is raised."""
    from tqdm.auto import tqdm

    tasks = [(sp.fold, (sp, cohort, str(features_dir), model_dir / f"fold_{sp.fold}", model_name, config,
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
