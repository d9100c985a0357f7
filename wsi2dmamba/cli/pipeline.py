"""``wsi2dmamba run`` (a whole pipeline from one TOML file) and ``wsi2dmamba demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import ExecutorOpt, ForceOpt, QuietOpt, RayAddressOpt, run_options
from ..training.config import Task


def _finish(results) -> None:
    for r in results:
        typer.echo("")
        typer.echo(r.summary())
    if any(r.excluded for r in results):
        typer.secho("Some slides were left out; fix them and rerun the same command (done work is skipped).",
                    fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run_command(
        pipeline: Annotated[Path, typer.Argument(help="Pipeline file (TOML); see pipelines/ for examples.")],
        out: Annotated[Optional[Path], typer.Option("--out", help="Run folder: the command reads its inputs from it and writes its outputs below it "
            "(overrides [run] out).")] = None,
        slides_dir: Annotated[Optional[Path], typer.Option(
            "--slides-dir", help="Folder searched for slides whose manifest row has no path; overrides "
            "[cohort] slides_dir.")] = None,
        force: ForceOpt = False,
        quiet: QuietOpt = False,
        executor: ExecutorOpt = "local",
        ray_address: RayAddressOpt = None,
    ) -> None:
        """Run segment → tile → extract → train (every model, every fold) → evaluate → report from one
        pipeline file, resuming whatever is already done."""
        from ..pipeline import load_pipeline, run_pipeline

        overrides = {"cohort": {"slides_dir": str(slides_dir.expanduser().resolve())}} if slides_dir else None
        config = load_pipeline(pipeline, out=out, overrides=overrides)
        _finish([run_pipeline(config, run_options(executor, ray_address, force=force, quiet=quiet))])

    @app.command("demo")
    def demo_command(
        out: Annotated[Path, typer.Option("--out", help="Run folder: the command reads its inputs from it and writes its outputs below it.")] = Path("runs/demo"),
        quick: Annotated[bool, typer.Option(
            "--quick", help="A smaller demo (fewer slides, folds, epochs and models), as run by the tests.")] = False,
        slides: Annotated[Optional[int], typer.Option("--slides", min=4, help="Number of demo slides.")] = None,
        epochs: Annotated[Optional[int], typer.Option("--epochs", min=1, help="Training epochs.")] = None,
        folds: Annotated[Optional[int], typer.Option("--folds", min=2, help="Cross-validation folds.")] = None,
        task: Annotated[Optional[Task], typer.Option(
            "--task", help="Only this task (default: both).", show_default=False)] = None,
        force: ForceOpt = False,
        quiet: QuietOpt = False,
        executor: ExecutorOpt = "local",
        ray_address: RayAddressOpt = None,
    ) -> None:
        """Build the built-in demo cohort (mosaic slides of real tissue whose label depends on the 2D
        arrangement) and run the whole pipeline on it: a classification and a survival task, offline, on CPU."""
        from ..pipeline.demo import DEMO_TASKS, run_demo

        tasks = (task,) if task else DEMO_TASKS
        _finish(run_demo(out, quick=quick, tasks=tasks, slides=slides, epochs=epochs, folds=folds,
                         options=run_options(executor, ray_address, force=force, quiet=quiet)))
