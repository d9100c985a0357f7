"""``wsi2dmamba extract``, ``import-features`` and ``encoders``: tile features into feature grid files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import (CohortOpt, ExecutorOpt, ForceOpt, OutOpt, QuietOpt, RayAddressOpt, ShardOpt, cohort_from_args,
                     parse_shard, report_summary)


def register(app: typer.Typer) -> None:
    @app.command("extract")
    def extract_command(
        out: OutOpt,
        cohort: CohortOpt = None,
        slides: Annotated[Optional[list[Path]], typer.Argument(help="Slide files (instead of --cohort).")] = None,
        encoder: Annotated[str, typer.Option("--encoder", help="Encoder name (see `wsi2dmamba encoders`) or "
                                             "timm:<model-name>.")] = "efficientnet-lite0",
        weights: Annotated[Optional[Path], typer.Option("--weights", help="Encoder weight file (default: the "
                                                        "packaged weights or the local HF / torch hub cache).")] = None,
        device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
        batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Tiles per batch.")] = 256,
        workers: Annotated[Optional[int], typer.Option(
            "--workers", min=0, help="Tile-reading processes (default: every core but one, at most 16).")] = None,
        precision: Annotated[Optional[str], typer.Option(
            "--precision", help="fp32, fp16 or bf16 (default: the encoder's own on a GPU, fp32 on CPU).")] = None,
        decode: Annotated[str, typer.Option(
            "--decode", help="How tiles are decoded: openslide (reader processes), auto (the slide's stored "
            "JPEG tiles decoded on the GPU where the slide allows it, else OpenSlide) or jpeg (stored JPEG "
            "tiles on the encoder's device; an error for other slides). Does not change the features' "
            "identity.")] = "openslide",
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
        from ..errors import ConfigError
        from ..features import ExtractConfig, extract_cohort, get_encoder
        from ..features.extract import blank_tile_count, encoder_dirname, resolve_gpus

        if precision is not None and precision not in ("fp32", "fp16", "bf16"):
            raise ConfigError(f"--precision must be fp32, fp16 or bf16, not {precision!r}.")
        if decode not in ("auto", "jpeg", "openslide"):
            raise ConfigError(f"--decode must be auto, jpeg or openslide, not {decode!r}.")
        get_encoder(encoder, weights)  # an unknown encoder or weight path fails before any work
        gpu_list = resolve_gpus(gpus)
        co = cohort_from_args(cohort, slides)
        config = ExtractConfig(encoder=encoder, weights=str(weights) if weights else None, device=device,
                               batch_size=batch_size, workers=workers, precision=precision,
                               pretrained=not random_weights, decode=decode)
        summary = extract_cohort(co, out, config, progress=not quiet, force=force, shard=parse_shard(shard),
                                 executor=executor, ray_address=ray_address, gpus=gpu_list)
        n_tiles = sum(int(i.get("n_tiles", 0)) for i in summary.infos.values())
        if summary.done:
            typer.echo(f"{n_tiles} tiles encoded into {out / 'features' / encoder_dirname(encoder)}; "
                       f"{blank_tile_count(summary)} unreadable tile(s) replaced by white tiles (flagged).")
        report_summary(summary)

    @app.command("import-features")
    def import_command(
        src: Annotated[Path, typer.Argument(help="A CLAM or TRIDENT feature file, or a folder of them.")],
        out: OutOpt,
        fmt: Annotated[str, typer.Option("--format", help="clam or trident.")],
        mpp: Annotated[Optional[float], typer.Option(
            "--mpp", help="µm per level-0 pixel of the slides (required for CLAM files).")] = None,
        coords_dir: Annotated[Optional[Path], typer.Option(
            "--coords-dir", help="Folder of the matching patch files (their coords attributes give the "
            "patch size and level).")] = None,
        encoder: Annotated[Optional[str], typer.Option(
            "--encoder", help="Encoder name to record (default: the file's, else <format>-import).")] = None,
        on_collision: Annotated[str, typer.Option(
            "--on-collision", help="refuse, or keep-first when two tiles fall in one grid cell.")] = "refuse",
    ) -> None:
        """Turn CLAM or TRIDENT feature files (features + coords) into feature grid files."""
        from ..errors import ConfigError
        from ..features.importers import import_features

        if fmt not in ("clam", "trident"):
            raise ConfigError(f"--format must be clam or trident, not {fmt!r}.")
        summary = import_features(src, out, fmt, mpp=mpp, coords_dir=coords_dir, encoder=encoder,
                                  on_collision=on_collision)
        typer.echo(summary.line())
        for name, reason in sorted(summary.failed.items()):
            typer.secho(f"  refused {name}: {reason}", fg=typer.colors.YELLOW, err=True)
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
