"""The ``wsi2dmamba`` command line: a thin typer layer over the library.

Each stage's commands live in their own module here and register themselves on :data:`app`.
Errors caused by input (:class:`~wsi2dmamba.errors.WsiError`) are printed as one clear message,
without a traceback, and exit with status 2.
"""

from __future__ import annotations

import importlib
import sys

import typer

from ..errors import WsiError

app = typer.Typer(
    name="wsi2dmamba",
    help="Whole-slide images to cross-validated 2D state-space models: "
    "segment → tile → extract → train → evaluate → report.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

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
    """Console entry point."""
    try:
        app()
    except WsiError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)
