"""``wsi2dmamba train``, ``evaluate``, ``report`` and ``heatmap``: thin wrappers of
:mod:`wsi2dmamba.training` and :mod:`wsi2dmamba.evaluation`."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .. import run_layout as layout
from ..errors import ConfigError
from ..cohort.executors import ExecutorName
from ..pipeline.config import EvaluateConfig
from ..training.config import TrainConfig
from .common import (CohortOpt, DeviceOpt, ForceOpt, OutOpt, QuietOpt, RayAddressOpt, config_options,
                     run_options)


def _overrides(items: list[str] | None) -> dict[str, Any]:
    """``key=value`` pairs; values are read as JSON when they parse (numbers, true/false, lists)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            out[key.strip()] = text
    return out


class Level(str, Enum):
    """Patient- or slide-level metrics."""

    patient = "patient"
    slide = "slide"


class Checkpoint(str, Enum):
    """Which weights of a fold."""

    best = "best"
    last = "last"


class Scale(str, Enum):
    """How heatmap colours are scaled."""

    rank = "rank"
    percentile = "percentile"
    linear = "linear"


def register(app: typer.Typer) -> None:
    @app.command("train")
    @config_options(TrainConfig, options={"device": DeviceOpt}, context="Invalid training options")
    def train_command(
        cohort: CohortOpt = None,
        out: OutOpt = Path("runs/run"),
        features: Annotated[Optional[Path], typer.Option(
            "--features", help="Folder of feature grids (RUN/features/<encoder>).")] = None,
        model: Annotated[str, typer.Option("--model", help="Model name (see `wsi2dmamba models`).")] = "2dmambamil",
        config: TrainConfig = TrainConfig(),
        preset: Annotated[Optional[str], typer.Option("--preset", help="Named model preset, e.g. paper.")] = None,
        name: Annotated[Optional[str], typer.Option("--name", help="Folder name of this model in the run "
                                                    "(default: model[-preset]).")] = None,
        splits: Annotated[Optional[Path], typer.Option("--splits", help="Folder of splits_<k>.csv (CLAM "
                                                       "layout) or one split CSV, instead of new splits.")] = None,
        fold: Annotated[Optional[list[int]], typer.Option("--fold", help="Train only this fold (repeatable).")] = None,
        set_: Annotated[Optional[list[str]], typer.Option("--set", help="Model option key=value (repeatable), "
                                                          "e.g. --set hidden=256.")] = None,
        force: Annotated[bool, typer.Option("--force", help="Retrain folds that are already done.")] = False,
        quiet: QuietOpt = False,
        executor: Annotated[ExecutorName, typer.Option(
            "--executor", help="Where the folds train: local processes (one per GPU), or Ray tasks.")
                            ] = "local",
        ray_address: RayAddressOpt = None,
    ) -> None:
        """Train a model with patient-level k-fold cross-validation; resumes unfinished folds.

        Folds train side by side on the visible GPUs (one process per GPU), or as Ray tasks with
        --executor ray.
        """
        from ..cohort import load_cohort
        from ..training import train_cohort

        if cohort is None or features is None:
            raise ConfigError("train needs --cohort M.csv and --features RUN/features/<encoder>.")
        c = load_cohort(cohort, require_path=False, check_files=False)
        res = train_cohort(c, features, out, model, config, _overrides(set_),
                           run_options(executor, ray_address, force=force, quiet=quiet), preset=preset, name=name,
                           splits=splits, folds_to_run=fold)
        for w in res.warnings:
            typer.secho(f"warning: {w}", fg=typer.colors.YELLOW, err=True)
        if preset == "paper" or model.endswith(":paper"):
            from ..evaluation.recipe import paper_recipe_differences

            typer.secho("note: the paper preset is the published architecture; its training here differs from "
                        "the published recipe in: " + "; ".join(paper_recipe_differences(config.model_dump(
                            mode="json"))), fg=typer.colors.YELLOW, err=True)
        for f in res.folds:
            state = "already done" if f.skipped else f"trained {f.epochs} epochs"
            chosen = "" if f.chosen_restart is None else (
                f"restart {f.chosen_restart + 1} of {len(f.restarts)} chosen on validation ("
                + ", ".join(f"{r['best_value']:.4f}" for r in f.restarts) + "); ")
            typer.echo(f"{res.name} fold {f.fold}: {state}; {chosen}best epoch {f.best_epoch} "
                       f"({config.select_on} {f.best_value:.4f})")
        typer.echo(f"Results in {res.model_dir}. Next: wsi2dmamba evaluate --out {out}")

    @app.command("evaluate")
    @config_options(EvaluateConfig, into="bootstrap")
    def evaluate_command(
        out: OutOpt = Path("runs/run"),
        bootstrap: EvaluateConfig = EvaluateConfig(),
        level: Annotated[Level, typer.Option("--level", help="Level of the printed metrics.")] = Level.patient,
    ) -> None:
        """Metrics of every model in the run, per fold and overall, with bootstrap CIs (RUN/eval/metrics.json)."""
        from ..evaluation import evaluate_run, format_summary

        metrics = evaluate_run(out, n_boot=bootstrap.n_boot, seed=bootstrap.seed)
        typer.echo(f"Test metrics ({level.value} level; mean ± std over folds, pooled [95% CI]; failed folds):")
        typer.echo(format_summary(metrics, level.value))
        typer.echo(f"Written {layout.eval_metrics(out)}")

    @app.command("report")
    @config_options(EvaluateConfig, into="bootstrap")
    def report_command(
        out: OutOpt = Path("runs/run"),
        bootstrap: EvaluateConfig = EvaluateConfig(),
    ) -> None:
        """One self-contained HTML page comparing the run's models (RUN/report/index.html)."""
        from ..evaluation import write_report

        path = write_report(out, n_boot=bootstrap.n_boot, seed=bootstrap.seed)
        typer.echo(f"Written {path}")

    @app.command("heatmap")
    def heatmap_command(
        out: OutOpt = Path("runs/run"),
        model: Annotated[str, typer.Option("--model", help="Model folder name in RUN/train.")] = "2dmambamil",
        slide: Annotated[Optional[list[str]], typer.Option(
            "--slide", help="Slide id (repeatable).")] = None,
        all_slides: Annotated[bool, typer.Option(
            "--all", help="Every test slide of every fold, each drawn by the fold that tested it.")] = False,
        fold: Annotated[Optional[int], typer.Option("--fold", help="Fold (default: where the slide is "
                                                    "in the test partition).")] = None,
        checkpoint: Annotated[Checkpoint, typer.Option("--checkpoint", help="Which weights of the fold.")
                              ] = Checkpoint.best,
        slide_path: Annotated[Optional[Path], typer.Option("--slide-path", help="Slide file (default: the "
                                                           "path recorded in the feature grid).")] = None,
        size: Annotated[int, typer.Option("--size", min=16, help="Longer side of the PNG in pixels.")] = 2048,
        scale: Annotated[Scale, typer.Option(
            "--scale", help="Colours: rank of each tile among the slide's, linear between the 1st and 99th "
            "percentiles, or linear between min and max.")] = Scale.rank,
        blur: Annotated[float, typer.Option(
            "--blur", min=0.0, help="Gaussian blur, sigma in tile strides (0: none).")] = 0.0,
        top_k: Annotated[int, typer.Option(
            "--top-k", min=0, help="Highest and lowest attended tiles in the montage (0: none).")] = 8,
        colorbar: Annotated[bool, typer.Option(
            "--colorbar/--no-colorbar", help="Also write <slide>_figure.png with a colour bar.")] = True,
        per_class: Annotated[Optional[bool], typer.Option(
            "--per-class/--no-per-class", help="One map per class (default: for more than two classes).",
            show_default=False)] = None,
        device: DeviceOpt = "auto",
        force: ForceOpt = False,
        quiet: QuietOpt = False,
    ) -> None:
        """Attention of a trained model over slides: PNG overlay, figure with colour bar, top/bottom tile
        montage, per-class maps and QuPath GeoJSON tiles (RUN/heatmaps/<model>/)."""
        from ..heatmaps import HeatmapStyle, heatmap, heatmap_cohort

        style = HeatmapStyle(scale=scale.value, blur=blur, top_k=top_k, colorbar=colorbar)
        if all_slides or (slide and len(slide) > 1):
            if fold is not None or slide_path is not None:
                raise ConfigError("--fold and --slide-path apply to one --slide, not to a batch.")
            res = heatmap_cohort(out, model, None if all_slides and not slide else slide,
                                 checkpoint=checkpoint.value, thumbnail_px=size, device=device, style=style,
                                 per_class=per_class, force=force, progress=not quiet)
            for sid, notes in sorted(res.notes.items()):
                for n in notes:
                    typer.secho(f"note: {sid}: {n}", fg=typer.colors.YELLOW, err=True)
            typer.echo(res.line())
            for sid, reason in sorted(res.failed.items()):
                typer.secho(f"  failed {sid}: {reason}", fg=typer.colors.YELLOW, err=True)
            if res.failed:
                raise typer.Exit(1)
            return
        if not slide:
            raise ConfigError("heatmap needs --slide SLIDE_ID (repeatable) or --all")
        res = heatmap(out, model, slide[0], fold=fold, checkpoint=checkpoint.value, slide_path=slide_path,
                      thumbnail_px=size, device=device, style=style, per_class=per_class)
        for n in res.notes:
            typer.secho(f"note: {n}", fg=typer.colors.YELLOW, err=True)
        typer.echo(f"fold {res.fold} ({res.partition} partition): {res.png} and {res.geojson} "
                   f"(+{len(res.files) - 2} more in {res.png.parent})")
