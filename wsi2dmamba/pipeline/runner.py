"""Run a whole pipeline: segment → tile → extract → train (every model, k folds) → evaluate → report.

>>> from wsi2dmamba.pipeline import load_pipeline, run_pipeline
>>> result = run_pipeline(load_pipeline("pipelines/demo.toml", out="runs/demo"))  # doctest: +SKIP
>>> print(result.summary())            # ends with the report's path  # doctest: +SKIP

Every stage resumes: slides and folds already done with the same parameters are skipped, so a stopped
run is continued by running the same command again. A slide that fails a stage is recorded in the
run's ``ledger.csv`` and left out of the later stages; the run goes on with the others.

Layout: the per-slide stages write ``RUN/segment``, ``RUN/tiles``, ``RUN/features/<encoder>``; training,
evaluation and the report go to ``RUN/<train_dir>`` (``RUN`` itself unless ``[run] train_dir`` is set,
which lets several tasks share one set of feature grids): ``train/<model>/fold_<k>``, ``eval/``,
``report/index.html``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import run_layout as layout
from ..cohort import Cohort, StageSummary, load_cohort
from ..cohort.options import RunOptions
from ..errors import StageInputError
from ..fileio import ensure_writable, write_json_atomic
from ..stages import SLIDE_STAGES
from .config import PipelineConfig

STEP_NAMES = ("cohort", "segment", "tile", "extract", "train", "evaluate", "report")


@dataclass
class PipelineResult:
    """What a pipeline run did.

    Attributes:
        config: the pipeline.
        run_dir: folder of the per-slide stages.
        train_dir: folder of training, evaluation and the report.
        stages: summaries of the per-slide stages (segment, tile, extract).
        trained: model name → fold count trained now, skipped (already done) counted apart.
        metrics: what :func:`wsi2dmamba.evaluation.evaluate_run` returned.
        report: the HTML report.
        seconds: wall time of each step.
        excluded: slide id → the stage and reason it was left out.
    """

    config: PipelineConfig
    run_dir: Path
    train_dir: Path
    stages: dict[str, StageSummary] = field(default_factory=dict)
    trained: dict[str, dict[str, int]] = field(default_factory=dict)
    metrics: dict[str, Any] | None = None
    report: Path | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)
    external: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return not self.excluded and self.report is not None

    def summary(self) -> str:
        """Plain-text summary of the run for the terminal; the last line names the report."""
        from ..evaluation import format_summary

        lines = [f"pipeline {self.config.name} ({self.config.task}), run folder {self.run_dir}"]
        for name, s in self.stages.items():
            lines.append(f"  {s.line()}")
        for name, counts in self.trained.items():
            lines.append(f"  train {name}: {counts['trained']} fold(s) trained, {counts['skipped']} already done")
        if self.excluded:
            lines.append(f"  {len(self.excluded)} slide(s) left out (see {layout.ledger(self.run_dir)}):")
            lines.extend(f"    {sid}: {why}" for sid, why in sorted(self.excluded.items()))
        if self.metrics is not None:
            lines.append("Test metrics (patient level; mean ± std over folds, pooled [95% CI]):")
            lines.extend("  " + row for row in format_summary(self.metrics).splitlines())
        total = sum(self.seconds.values())
        lines.append(f"Done in {total:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in self.seconds.items())}).")
        if self.external is not None:
            from ..evaluation.external import format_external

            lines.append("External validation (patient level; training cohort cross-validated vs external):")
            lines.extend("  " + row for row in format_external(self.external).splitlines())
        if self.report is not None:
            lines.append(f"Report: {self.report}")
        return "\n".join(lines)


def run_pipeline(config: PipelineConfig, options: RunOptions | None = None, *,
                 echo: Callable[[str], None] | None = None, **settings: Any) -> PipelineResult:
    """Run every stage of ``config`` (see the module docstring).

    Args:
        config: from :func:`~wsi2dmamba.pipeline.load_pipeline`.
        options: how the run goes (:class:`~wsi2dmamba.cohort.RunOptions`; or its fields as keywords):
            ``force`` redoes every stage for every slide and fold; ``progress`` shows one bar for the run,
            with each stage's bar below it; ``executor`` (``"local"`` or ``"ray"``, see
            :mod:`wsi2dmamba.cohort.executors`) and ``ray_address`` say where the slides of the per-slide
            stages and the folds of train run. The per-slide stages use ``[run] workers`` processes.
        echo: where one-line stage messages go (default: the progress bar's ``write``).

    Raises:
        WsiError: the cohort or an option is invalid, or a stage left no slide to go on with.
    """
    from tqdm.auto import tqdm

    options = RunOptions.of(options, **settings)
    force, progress = options.force, options.progress
    check_options(config, options.executor)
    run_dir = ensure_writable(config.out)
    train_dir = run_dir / config.run.train_dir if config.run.train_dir else run_dir
    result = PipelineResult(config, run_dir, train_dir)
    n_steps = 6 + len(config.models) + (config.predict is not None)  # cohort, segment, tile, extract, each
    # model, evaluate + report, predict
    bar = tqdm(total=n_steps, desc=f"{config.name}", unit="step", position=0, leave=True,
               disable=not progress, dynamic_ncols=True,
               bar_format="{desc}: {n_fmt}/{total_fmt} steps |{bar}| {elapsed}")
    say = echo or (lambda text: bar.write(text))

    def step(name: str):
        bar.set_description_str(f"{config.name} [{name}]")
        return time.perf_counter()

    def done(name: str, t0: float) -> None:
        result.seconds[name] = result.seconds.get(name, 0.0) + time.perf_counter() - t0
        bar.update(1)

    try:
        t0 = step("cohort")
        cohort = _load_cohort(config, run_dir, progress)
        write_json_atomic(layout.pipeline_records(train_dir)["provenance"], _provenance(config))
        done("cohort", t0)

        slide_options = RunOptions.of(options, workers=config.run.workers)
        for stage in SLIDE_STAGES:
            name = stage.name
            t0 = step(name)
            summary = stage.runner()(cohort, run_dir, config.option(name), slide_options)
            result.stages[name] = summary
            say(summary.line())
            for sid, reason in summary.failed.items():
                result.excluded[sid] = f"{name}: {reason}"
            cohort = Cohort(tuple(r for r in cohort if r.slide_id not in summary.failed), cohort.source)
            if len(cohort) == 0:
                raise StageInputError(f"Every slide failed the {name} stage; see {layout.ledger(run_dir)}.")
            done(name, t0)

        features_dir = _features_dir(run_dir, config)
        for model in config.models:
            t0 = step(f"train {model}")
            res = _train(cohort, features_dir, train_dir, config, model, options)
            counts = {"trained": sum(not f.skipped for f in res.folds), "skipped": sum(f.skipped for f in res.folds)}
            result.trained[model] = counts
            for w in res.warnings:
                say(f"train {model}: {w}")
            say(f"train {model}: {counts['trained']} fold(s) trained, {counts['skipped']} already done")
            done(f"train {model}", t0)

        t0 = step("evaluate + report")
        from ..evaluation import evaluate_run, write_report

        ev = config.option("evaluate")
        result.metrics = evaluate_run(train_dir, n_boot=ev.n_boot, seed=ev.seed)
        result.report = write_report(train_dir, n_boot=ev.n_boot, seed=ev.seed, metrics=result.metrics)
        done("evaluate + report", t0)
        if config.predict is not None:
            t0 = step("predict")
            from ..predict.pipeline import run_predict_step

            result.external = run_predict_step(config, train_dir, force=force, progress=progress, say=say)
            done("predict", t0)
    finally:
        bar.close()
    write_json_atomic(layout.pipeline_records(train_dir)["result"], {
        "report": str(result.report) if result.report else None, "seconds": result.seconds,
        "excluded": result.excluded, "trained": result.trained,
        "stages": {k: {"done": len(s.done), "skipped": len(s.skipped), "failed": s.failed}
                   for k, s in result.stages.items()}})
    return result


def check_options(config: PipelineConfig, executor: str = "local") -> None:
    """Check what the stages' configuration classes cannot check alone, before any stage runs: the
    encoder exists and its weight file is found, and, with the local ``executor``, each device is usable
    here.

    Raises:
        ConfigError: naming the pipeline file, the table and the key (a WeightsError for the weights).
    """
    from ..devices import resolve_device
    from ..errors import ConfigError, WeightsError, WsiError
    from ..features.encoders import get_encoder

    ext = config.option("extract")
    checks = [
        ("extract", "encoder", lambda: get_encoder(ext.encoder)),
        ("extract", "weights", lambda: get_encoder(ext.encoder, ext.weights).weights_path()
         if ext.pretrained or ext.weights else None),
    ]
    if executor == "local":  # on a Ray cluster the devices are those of its nodes
        checks += [("extract", "device", lambda: resolve_device(ext.device)),
                   ("train", "device", lambda: resolve_device(config.option("train").device))]
    for table, key, check in checks:
        try:
            check()
        except WsiError as exc:
            cls = WeightsError if isinstance(exc, WeightsError) else ConfigError
            raise cls(f"{config.source}: [{table}] {key}: {exc} Nothing was run.") from None


# ------------------------------------------------------------------------------------------------ steps

def _load_cohort(config: PipelineConfig, run_dir: Path, progress: bool) -> Cohort:
    if config.demo is not None:
        from ..demo import build_demo_cohort

        manifest = build_demo_cohort(layout.cohort_dir(run_dir), config.demo.spec(), progress=progress,
                                     workers=config.run.workers)
        return load_cohort(manifest)
    return load_cohort(config.cohort.manifest, slides_dir=config.cohort.slides_dir)


def _features_dir(run_dir: Path, config: PipelineConfig) -> Path:
    from ..features.extract import encoder_dirname

    return layout.features_dir(run_dir, encoder_dirname(config.option("extract").encoder))


def _train(cohort: Cohort, features_dir: Path, train_dir: Path, config: PipelineConfig, model: str,
           options: RunOptions):
    from ..training.loop import train_cohort
    from .config import model_folder, split_model_entry

    name, preset = split_model_entry(model)
    splits = config.cohort.splits_dir if config.cohort is not None else None
    return train_cohort(cohort, features_dir, train_dir, name, config.option("train"),
                        config.model_options.get(model) or None, options, preset=preset,
                        name=model_folder(model), splits=splits)


def _provenance(config: PipelineConfig) -> dict[str, Any]:
    from .. import __version__

    def dump(v: Any) -> Any:
        return v.model_dump(mode="json") if hasattr(v, "model_dump") else v

    return {"pipeline": str(config.source), "name": config.name, "version": __version__,
            "cohort": config.cohort.model_dump(mode="json") if config.cohort else None,
            "demo": config.demo.model_dump(mode="json") if config.demo else None,
            "models": list(config.models), "model_options": config.model_options,
            "stages": {k: dump(v) for k, v in config.stage_options.items()},
            "predict": config.predict.model_dump(mode="json") if config.predict is not None else None}
