"""``wsi2dmamba verify``: check a run's files against their recorded hashes and parameters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..cohort.verify import verify_run
from ..fileio import write_text_atomic
from .common import QuietOpt


def verify(
    run: Annotated[Path, typer.Argument(help="Run folder (the --out of the stages).")],
    no_content: Annotated[bool, typer.Option(
        "--no-content", help="Only compare hashes; do not validate file contents (grid files, JSON).")] = False,
    no_sources: Annotated[bool, typer.Option(
        "--no-sources", help="Do not compare slide files with their recorded fingerprints.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Fail on warnings too.")] = False,
    json_out: Annotated[Optional[Path], typer.Option(
        "--json", help="Also write the findings as JSON to this file.")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Check every file of a run against the sha256 and parameters recorded when it was written.

    Exit status: 0 when the run is intact, 1 when a problem was found (each is printed with what to do).
    """
    report = verify_run(run, content=not no_content, sources=not no_sources, progress=not quiet)
    for f in report.findings:
        typer.secho(f.line(), fg=typer.colors.RED if f.level == "error" else typer.colors.YELLOW, err=True)
    if json_out is not None:
        write_text_atomic(json_out, json.dumps(report.to_dict(), indent=2) + "\n")
    typer.echo(report.summary())
    if not report.ok or (strict and report.warnings):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("verify")(verify)
