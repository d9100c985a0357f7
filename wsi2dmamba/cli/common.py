"""Options shared by the batch commands, so every stage spells them the same way."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..cohort import Cohort, RunOptions, StageSummary, load_cohort
from ..cohort.executors import ExecutorName
from ..errors import ConfigError


def process_count(workers: int | None) -> int:
    """``--workers`` of the slide stages as a number of processes (None: every core but one, at most 16)."""
    from ..features.loader import default_workers

    return default_workers() if workers is None else max(1, workers)


CohortOpt = Annotated[Optional[Path], typer.Option("--cohort", help="Cohort manifest CSV (slide_id, path, …).")]
OutOpt = Annotated[Path, typer.Option("--out", help="Run folder: the command reads its inputs from it and writes "
                                    "its outputs below it.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="Where the model runs: auto (a GPU when there is one), "
                                       "cpu, cuda or cuda:N.")]
WorkersOpt = Annotated[Optional[int], typer.Option(
    "--workers", min=0, help="Processes reading the slides (default: every core but one, at most 16; 0: this "
    "process only).", show_default=False)]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo slides that are already done.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
ShardOpt = Annotated[str | None, typer.Option(
    "--shard", help="Process only shard i of N ('i/N', 0-based), e.g. for Slurm array jobs; "
    "combine with `wsi2dmamba merge`.")]
ExecutorOpt = Annotated[ExecutorName, typer.Option("--executor", help="Where the per-slide tasks run: local "
                                             "processes, or Ray tasks.")]
RayAddressOpt = Annotated[Optional[str], typer.Option(
    "--ray-address", help="Ray cluster to connect to (default: start a local one).")]
SlidesDirOpt = Annotated[Path | None, typer.Option(
    "--slides-dir", help="Folder searched for slides whose manifest row has no path.")]


_CONTEXT = "_typer_context"


def config_options(config_class: Any, *, exclude: Collection[str] = (), options: Mapping[str, Any] | None = None,
                   into: str = "config", context: str = "Invalid options") -> Callable[[Callable], Callable]:
    """Give a command one ``--option`` per field of a configuration class, and hand it the validated
    configuration as its parameter ``into``.

    Each option takes its name (``field_name`` → ``--field-name``), type and choices (a ``Literal`` field
    lists its values), default and help from the field, so ``--help`` shows what the configuration
    accepts and a setting has one owner. Options the user does not give are left to the configuration
    (its defaults and the rules between fields); the given ones are checked there once, and a bad value
    is a :class:`ConfigError` that names the option.

    Args:
        config_class: a pydantic configuration class.
        exclude: fields without an option.
        options: field → the ``Annotated[type, typer.Option(...)]`` to use instead (an option shared by
            several commands, such as ``--device``).
        into: the command's parameter that receives the configuration; the options are listed where it is.
        context: first line of the error message.
    """
    from ..validation import validated

    fields = {name: f for name, f in config_class.model_fields.items() if name not in exclude}
    shared = dict(options or {})

    def option(name: str, field: Any) -> inspect.Parameter:
        annotation = shared.get(name)
        if annotation is None:
            flag = "--" + name.replace("_", "-")
            annotation = Annotated[field.annotation, typer.Option(flag, help=field.description or "")]
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=field.get_default(),
                                 annotation=annotation)

    def decorate(command: Callable) -> Callable:
        own = inspect.signature(command, eval_str=True)
        # typer hands the command's context to a parameter of this type: it says which options were given.
        params = [inspect.Parameter(_CONTEXT, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)]
        for p in own.parameters.values():
            if p.name == into:
                params += [option(name, f) for name, f in fields.items()]
            else:
                params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY))

        @functools.wraps(command)
        def run(**kwargs: Any) -> Any:
            ctx = kwargs.pop(_CONTEXT)
            given = {name: kwargs.pop(name) for name in fields}
            given = {name: value for name, value in given.items()
                     if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") != "DEFAULT"}
            return command(**kwargs, **{into: validated(config_class, given, context, key_style="flag")})

        run.__signature__ = own.replace(parameters=params)  # type: ignore[attr-defined]
        run.__annotations__ = {}  # the signature above holds the evaluated types
        return run

    return decorate


def cohort_from_args(cohort: Path | None, slides: list[Path] | None = None, *, require_path: bool = True,
                     slides_dir: Path | None = None, mpp: float | None = None) -> Cohort:
    """A cohort from ``--cohort M.csv`` or from slide files given on the command line (not both)."""
    if cohort is not None and slides:
        raise ConfigError("Give either --cohort or slide files, not both.")
    if cohort is not None:
        return load_cohort(cohort, require_path=require_path, slides_dir=slides_dir)
    if slides:
        return Cohort.from_paths(slides, mpp=mpp)
    raise ConfigError("No slides given: pass --cohort M.csv or one or more slide files.")


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'i/N' → (i, N); :class:`~wsi2dmamba.cohort.RunOptions` checks the range."""
    if text is None:
        return None
    try:
        i_text, n_text = text.split("/")
        return int(i_text), int(n_text)
    except ValueError:
        raise ConfigError(f"--shard must look like i/N (e.g. 0/4), got {text!r}") from None


def run_options(executor: ExecutorName, ray_address: str | None, *, force: bool = False, quiet: bool = False,
                shard: str | None = None, workers: int = 1) -> RunOptions:
    """The :class:`~wsi2dmamba.cohort.RunOptions` of a command's ``--executor``, ``--ray-address``,
    ``--force``, ``--quiet``, ``--shard`` and (processes, see :func:`process_count`) ``--workers``."""
    return RunOptions(workers=workers, executor=executor, ray_address=ray_address, shard=parse_shard(shard),
                      force=force, progress=not quiet)


def report_summary(summary: StageSummary) -> None:
    """Print a stage's summary; exit 1 when any slide failed (the batch itself went on)."""
    typer.echo(summary.line())
    for sid, why in sorted(summary.redone.items()):
        typer.secho(f"  warning: slide {sid}: {why}", fg=typer.colors.YELLOW, err=True)
    for sid, reason in sorted(summary.failed.items()):
        typer.secho(f"  failed {sid}: {reason}", fg=typer.colors.YELLOW, err=True)
    if summary.failed:
        typer.echo("Failures are recorded in the run's ledger.csv; fix them and rerun (done slides are skipped).")
        raise typer.Exit(1)
