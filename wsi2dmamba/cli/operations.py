"""Commands that act on a whole run folder: ``merge``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..cohort import load_cohort
from ..cohort.shards import merge_shards


def merge(
    run: Annotated[Path, typer.Argument(help="Run folder the shards wrote to (their --out).")],
    cohort: Annotated[Optional[Path], typer.Option(
        "--cohort", help="The cohort manifest the shards ran on; only needed to name the slides of shards "
        "that never ran when the manifest has moved.")] = None,
) -> None:
    """Check the shards of a run (--shard i/N) and merge their ledgers into RUN/ledger.csv.

    Reports, for each sharded stage, the shards that never ran or did not finish, the slides that
    failed (with the reason) or are missing, and shards run with other parameters or another cohort.
    Exits 1 when anything is incomplete: rerun the shards it names (done slides are skipped), then merge
    again.
    """
    whole = load_cohort(cohort, require_path=False, check_files=False) if cohort is not None else None
    report = merge_shards(run, cohort=whole)
    for line in report.lines():
        typer.echo(line)
    if not report.ok:
        typer.secho("The run is incomplete: rerun the shards or slides named above, then merge again.",
                    fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("merge")(merge)
