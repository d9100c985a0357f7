"""The ``wsi2dmamba`` command line: a thin typer layer over the library.

Each stage's commands live in their own module here and register themselves on :data:`app`.
Errors caused by input (:class:`~wsi2dmamba.errors.WsiError`) are printed as one clear message,
without a traceback, and exit with status 2.
"""

from __future__ import annotations

import importlib
import sys
from typing import Annotated

import typer

from ..errors import WsiError
from ..fileio import os_error_message

app = typer.Typer(
    name="wsi2dmamba",
    help="Whole-slide images to cross-validated 2D state-space models: "
    "segment → tile → extract → train → evaluate → report.",
    no_args_is_help=True,
    add_completion=True,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)

def _show_version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"wsi2dmamba {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    pass


# Command modules, in the order their commands are listed by --help.
COMMAND_MODULES = (
    "slides",      # segment, tile, doctor
    "features",    # extract, import-features, encoders
    "models",      # models
    "training",    # train, evaluate, report, heatmap
    "predict",     # export, predict
    "pipeline",    # run, demo
    "operations",  # merge
    "integrity",   # verify
)

for _name in COMMAND_MODULES:
    try:
        _mod = importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as _exc:  # a command module not written yet
        if _exc.name != f"{__name__}.{_name}":
            raise
        continue
    _mod.register(app)


def main() -> None:
    """Console entry point; a command on a run folder is logged in ``RUN/logs/`` (see :mod:`.runlog`)."""
    from .runlog import run_log

    with run_log(sys.argv[1:]):
        try:
            app()
        except WsiError as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            sys.exit(2)
        except OSError as exc:  # the environment (disk, permissions), not the input or a bug
            message = os_error_message(exc)
            if message is None:
                raise
            typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
            sys.exit(2)
