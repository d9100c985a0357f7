"""``wsi2dmamba extract``, ``import-features`` and ``encoders``: tile features into feature grid files."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..features.encoders import Precision
from ..features.extract import Decode, ExtractConfig
from .common import (CohortOpt, DeviceOpt, ExecutorOpt, ForceOpt, OutOpt, QuietOpt, RayAddressOpt,
                     ShardOpt, WorkersOpt, cohort_from_args, report_summary, run_options)
from .slides import SlideMppOpt

# Identity and runtime fields alike (model_dump would leave the runtime ones out).
_EXTRACT_DEFAULTS = {name: f.get_default() for name, f in ExtractConfig.model_fields.items()}


class ImportFormat(str, Enum):
    """Feature file layouts read and written."""

    clam = "clam"
    trident = "trident"


class Collision(str, Enum):
    """What import does with two tiles in one grid cell."""

    refuse = "refuse"
    keep_first = "keep-first"


def register(app: typer.Typer) -> None:
    @app.command("extract")
    def extract_command(
        out: OutOpt,
        cohort: CohortOpt = None,
        slides: Annotated[Optional[list[Path]], typer.Argument(help="Slide files (instead of --cohort).")] = None,
        encoder: Annotated[str, typer.Option("--encoder", help="Encoder name (see `wsi2dmamba encoders`) or "
                                             "timm:<model-name>.")] = _EXTRACT_DEFAULTS["encoder"],
        weights: Annotated[Optional[Path], typer.Option("--weights", help="Encoder weight file (default: the "
                                                        "packaged weights or the local HF / torch hub cache).")] = None,
        device: DeviceOpt = "auto",
        batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Tiles per batch.")
                              ] = _EXTRACT_DEFAULTS["batch_size"],
        workers: WorkersOpt = None,
        precision: Annotated[Optional[Precision], typer.Option(
            "--precision", help="Numbers the encoder computes with (default: the encoder's own on a GPU, fp32 "
            "on CPU).", show_default=False)] = None,
        slide_mpp: SlideMppOpt = None,
        decode: Annotated[Decode, typer.Option(
            "--decode", help="How tiles are decoded: openslide (reader processes), auto (the slide's stored "
            "JPEG tiles decoded on the GPU where the slide allows it, else OpenSlide) or jpeg (stored JPEG "
            "tiles on the encoder's device; an error for other slides). Does not change the features' "
            "identity.")] = _EXTRACT_DEFAULTS["decode"],
        gpus: Annotated[Optional[str], typer.Option(
            "--gpus", help="GPUs to use: all, or indices such as 0,1. With several, one process per GPU (each "
            "with its own reader processes) takes the slides from one queue, largest first.")] = None,
        random_weights: Annotated[bool, typer.Option(
            "--random-weights", help="Keep the encoder's random initial weights (speed tests only).")] = False,
        force: ForceOpt = False,
        quiet: QuietOpt = False,
        shard: ShardOpt = None,
        executor: ExecutorOpt = "local",
        ray_address: RayAddressOpt = None,
    ) -> None:
        """Encode the tiles of every slide: RUN/tiles/<slide_id>.h5 → RUN/features/<encoder>/<slide_id>.h5."""
        from ..features import extract_cohort, get_encoder
        from ..features.extract import blank_tile_count, encoder_dirname, resolve_gpus

        get_encoder(encoder, weights)  # an unknown encoder or weight path fails before any work
        gpu_list = resolve_gpus(gpus)
        co = cohort_from_args(cohort, slides, mpp=slide_mpp)
        config = ExtractConfig(encoder=encoder, weights=str(weights) if weights else None, device=device,
                               batch_size=batch_size, workers=workers,
                               precision=precision, pretrained=not random_weights, decode=decode)
        summary = extract_cohort(co, out, config, run_options(executor, ray_address, force=force, quiet=quiet,
                                                              shard=shard), gpus=gpu_list)
        n_tiles = sum(int(i.get("n_tiles", 0)) for i in summary.infos.values())
        if summary.done:
            from ..run_layout import features_dir

            typer.echo(f"{n_tiles} tiles encoded into {features_dir(out, encoder_dirname(encoder))}; "
                       f"{blank_tile_count(summary)} unreadable tile(s) replaced by white tiles (flagged).")
        report_summary(summary)

    @app.command("import-features")
    def import_command(
        src: Annotated[Path, typer.Argument(help="A CLAM or TRIDENT feature file, or a folder of them.")],
        out: OutOpt,
        fmt: Annotated[ImportFormat, typer.Option("--format", help="The tool that wrote the files.")],
        cohort: Annotated[Optional[Path], typer.Option(
            "--cohort", help="Cohort manifest CSV: each slide's µm/px comes from its mpp column, else the "
            "slide file.")] = None,
        mpp: Annotated[Optional[float], typer.Option(
            "--slide-mpp", help="µm per level-0 pixel of every slide (CLAM files record none; with --cohort, "
            "only for slides it gives none).")] = None,
        coords_dir: Annotated[Optional[Path], typer.Option(
            "--coords-dir", help="Folder of the matching patch files (their coords attributes give the "
            "patch size and level).")] = None,
        encoder: Annotated[Optional[str], typer.Option(
            "--encoder", help="Encoder name to record (default: the file's, else <format>-import).")] = None,
        step: Annotated[Optional[float], typer.Option(
            "--step", min=0.0, help="Step between patches in pixels at the patch level, as given to CLAM's "
            "--step_size (default: the patch size; CLAM does not store it).")] = None,
        max_offset: Annotated[float, typer.Option(
            "--max-offset", min=0.0, max=0.5, help="Largest distance of a tile from its lattice cell, as a "
            "fraction of the stride, moved onto the lattice; files with tiles further off are refused.")] = 0.1,
        on_collision: Annotated[Collision, typer.Option(
            "--on-collision", help="What to do when two tiles fall in one grid cell.")] = Collision.refuse,
        quiet: QuietOpt = False,
    ) -> None:
        """Turn CLAM or TRIDENT feature files (features + coords) into feature grid files."""
        from ..cohort import load_cohort
        from ..features.importers import import_features

        co = load_cohort(cohort, require_path=False, check_files=False) if cohort is not None else None
        summary = import_features(src, out, fmt.value, mpp=mpp, coords_dir=coords_dir, encoder=encoder,
                                  on_collision=on_collision.value, step=step, max_offset=max_offset, cohort=co,
                                  progress=not quiet)
        typer.echo(summary.line())
        for note in summary.warnings:
            typer.secho(f"  warning: {note}", fg=typer.colors.YELLOW, err=True)
        for name in summary.empty:
            typer.echo(f"  empty {name}: no tiles (a slide without tissue); no grid written")
        for name, reason in sorted(summary.failed.items()):
            typer.secho(f"  refused {name}: {reason}", fg=typer.colors.YELLOW, err=True)
        if summary.failed:
            raise typer.Exit(1)

    @app.command("export-features")
    def export_command(
        run: Annotated[Path, typer.Argument(help="The run folder whose features/<encoder>/ is exported.")],
        out: Annotated[Path, typer.Option("--out", help="Folder the CLAM or TRIDENT layout is written to.")],
        fmt: Annotated[ImportFormat, typer.Option("--format", help="The tool to write for.")],
        encoder: Annotated[Optional[str], typer.Option(
            "--encoder", help="Which encoder's features (default: the run's only one).")] = None,
        cohort: Annotated[Optional[Path], typer.Option(
            "--cohort", help="Cohort manifest CSV: the slides to export, and CLAM's case_id and label.")] = None,
        quiet: QuietOpt = False,
    ) -> None:
        """Write a run's feature grids for CLAM (h5_files/, pt_files/, slides.csv) or TRIDENT
        (features_<encoder>/)."""
        from ..cohort import load_cohort
        from ..features.exporters import export_features

        co = load_cohort(cohort, require_path=False, check_files=False) if cohort is not None else None
        summary = export_features(run, out, fmt.value, encoder=encoder, cohort=co, progress=not quiet)
        typer.echo(summary.line())
        for note in summary.notes:
            typer.echo(f"  note: {note}")
        for name, reason in sorted(summary.failed.items()):
            typer.secho(f"  failed {name}: {reason}", fg=typer.colors.YELLOW, err=True)
        if summary.failed:
            raise typer.Exit(1)

    @app.command("encoders")
    def encoders_command() -> None:
        """List the encoders: feature dimension, input size, GPU precision, where the weights come from."""
        from ..features import describe_encoders

        typer.echo(f"{'encoder':<20} {'dim':>5} {'input':>5} {'prec':>5}  weights — description")
        for row in describe_encoders():
            dim = row["feature_dim"] if row["feature_dim"] is not None else "-"
            px = row["input_px"] if row["input_px"] is not None else "-"
            typer.echo(f"{row['name']:<20} {dim:>5} {px:>5} {row['precision'] or '-':>5}  {row['weights']} — "
                       f"{row['description']}")
