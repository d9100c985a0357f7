"""``wsi2dmamba export`` and ``predict``: thin wrappers of :mod:`wsi2dmamba.predict`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import run_layout as layout
from .common import CohortOpt, DeviceOpt, ForceOpt, OutOpt, QuietOpt, WorkersOpt, process_count


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export_command(
        run: Annotated[Path, typer.Argument(help="Run folder holding train/<model> (the --out of train).")],
        model: Annotated[str, typer.Option("--model", help="Model folder name in RUN/train.")] = "2dmambamil",
        out: Annotated[Path | None, typer.Option("--out", help="Bundle folder (default: "
                                                    "RUN/bundles/<model>).")] = None,
    ) -> None:
        """Write a model bundle: every fold's weights, the model, encoder, tiling and task (docs/bundles.md)."""
        from ..predict import export_bundle, read_manifest

        path = export_bundle(run, model, out)
        m = read_manifest(path)
        typer.echo(f"Bundle of {m.name} ({len(m.folds)} folds, {m.task.kind}; encoder {m.encoder.name}, "
                   f"{m.tiling.tile_px} px at {m.tiling.mpp:g} µm/px) written to {path}")
        typer.echo(f"Next: wsi2dmamba predict --model {path} --cohort new.csv --out RUN2")

    @app.command("predict")
    def predict_command(
        model: Annotated[Path, typer.Option("--model", help="Model bundle folder (from `wsi2dmamba export`).")],
        out: OutOpt,
        cohort: CohortOpt = None,
        features: Annotated[Path | None, typer.Option(
            "--features", help="Folder of existing <slide_id>.h5 feature grids (e.g. imported CLAM/TRIDENT "
            "features) instead of segmenting, tiling and extracting.")] = None,
        heatmaps: Annotated[bool, typer.Option("--heatmaps", help="Also write each slide's attention (PNG and "
                                               "QuPath GeoJSON).")] = False,
        device: DeviceOpt = "auto",
        mpp_tolerance: Annotated[float, typer.Option(
            "--mpp-tolerance", help="Relative µm/px difference between the features and the bundle that is "
            "refused.")] = 0.05,
        workers: WorkersOpt = None,
        force: ForceOpt = False,
        quiet: QuietOpt = False,
    ) -> None:
        """Apply a model bundle to new slides: every fold model and their ensemble → RUN2/predictions/<model>.csv.

        Raw slides are segmented, tiled and encoded with the bundle's recorded parameters first (what RUN2
        already holds is reused). With labels or survival in the cohort, `wsi2dmamba evaluate --out RUN2`
        and `report` give the external validation.
        """
        from ..cohort import load_cohort
        from ..devices import resolve_device
        from ..errors import ConfigError
        from ..predict import load_bundle, predict_cohort

        if cohort is None:
            raise ConfigError("predict needs --cohort new.csv (slide_id, path, and labels or survival when known).")
        bundle = load_bundle(model, device=str(resolve_device(device)))
        co = load_cohort(cohort, require_path=features is None, check_files=features is None)
        res = predict_cohort(bundle, co, out, features=features, heatmaps=heatmaps, device=device, workers=process_count(workers),
                             mpp_tolerance=mpp_tolerance, force=force, progress=not quiet)
        for s in res.stages.values():
            typer.echo(s.line())
        for n in res.notes:
            typer.secho(f"note: {n}", fg=typer.colors.YELLOW, err=True)
        for sid, why in sorted(res.failed.items()):
            typer.secho(f"  failed {sid}: {why}", fg=typer.colors.YELLOW, err=True)
        typer.echo(f"Predictions: {res.slides_csv} (slides) and {res.patients_csv} (patients).")
        if res.failed:
            typer.echo(f"Failures are recorded in {layout.ledger(out)}; fix them and rerun (done slides are "
                       "skipped).")
            raise typer.Exit(1)
