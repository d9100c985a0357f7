"""Feature extraction: the tiles of each slide → one feature vector per tile → a feature grid file.

One process owns the encoder (one copy of the model on one device). The slides of a cohort are done one
after another in that process; within a slide, ``workers`` reader processes decode tiles in whole
batches (see :mod:`.loader`) into pinned memory, and the batches are copied to the GPU without blocking,
preprocessed there, and encoded under autocast in channels-last layout. With enough readers the GPU
never waits for the CPU; the benchmark (``benchmarks/extract.py``) shows which side is the limit.

Outputs: ``RUN/features/<encoder>/<slide_id>.h5`` (the feature grid file of ``grid-h5.md``), the stage's
per-slide state and the run's ledger. A feature file records the parameter hash of the tiles file it
was made from; when the tiles file is remade with other parameters, the slide is extracted again.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from .. import run_layout as layout
from ..cohort import Cohort, SlideRecord, StageSummary, run_stage
from ..cohort.executors import TaskResources
from ..cohort.ledger import recorded_sha256
from ..cohort.options import RunOptions
from ..errors import ConfigError, SlideError, StageInputError
from ..devices import resolve_device
from ..fileio import params_hash
from ..grid import FeatureGrid, TileGrid, read_tile_grid, write_feature_grid
from ..grid.guard import guard_grid_file, guard_grid_files
from .encoders import EncoderSpec, Precision, get_encoder
from .loader import TileReadPlan, default_workers, make_loader
from .weights import weights_sha256

STAGE = "extract"


#: How tiles are decoded (see ``ExtractConfig.decode``).
Decode = Literal["openslide", "auto", "jpeg"]


class ExtractConfig(BaseModel):
    """Settings of the ``extract`` stage.

    Fields marked "not hashed" change how fast features are made, not what they are, so changing them
    does not make a finished slide be done again.

    Attributes:
        encoder: registry name (``wsi2dmamba encoders``) or ``timm:<model-name>``.
        weights: weight file; None looks in the packaged weights and the local HF / torch hub caches
            (not hashed: the file's sha256 is, in ``weights_sha256``).
        weights_sha256: sha256 of the weight file, filled in when the stage starts.
        pretrained: False runs the encoder with random weights (speed measurements only).
        precision: autocast precision on a GPU (``fp32``, ``fp16``, ``bf16``); None = the encoder's
            default on a GPU and fp32 on CPU.
        device: ``auto`` (a GPU when there is one), ``cpu``, ``cuda`` or ``cuda:N`` (not hashed).
        batch_size: tiles per batch (not hashed).
        workers: tile-reading processes; None = every core but one, at most 16 (none for slides of
            fewer than 256 tiles, where starting a process costs more than reading); 0 reads in the
            main process (not hashed).
        max_run_tiles: at most this many neighbouring tiles are read with one region read (not hashed).
        max_blank_fraction: a slide fails when more than this fraction of its tiles cannot be read.
        decode: how tiles are decoded (not hashed: both paths give the same tiles within JPEG decoder
            differences): ``auto`` (the default): ``jpeg`` on a GPU for the slides that allow it, else
            ``openslide``; ``openslide``: in the reader processes; ``jpeg``: the slide's stored JPEG tiles
            decoded in batches on the encoder's device (:mod:`.tile_decode`), an error for slides stored
            otherwise.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    encoder: str = "efficientnet-lite0"
    weights: str | None = Field(default=None, exclude=True)
    weights_sha256: str = ""
    pretrained: bool = True
    precision: Precision | None = None
    device: str = Field(default="auto", exclude=True)
    batch_size: int = Field(default=256, ge=1, exclude=True)
    workers: int | None = Field(default=None, ge=0, exclude=True)
    max_run_tiles: int = Field(default=8, ge=1, exclude=True)
    max_blank_fraction: float = Field(default=0.25, ge=0.0, le=1.0)
    decode: Decode = Field(default="auto", exclude=True)


@dataclass
class LoadedEncoder:
    """An encoder ready to run: the network on its device, with its precision and weight identity."""

    spec: EncoderSpec
    model: Any
    device: Any
    precision: str
    weights_sha256: str

    @property
    def name(self) -> str:
        return self.spec.name

    def autocast(self):
        """The autocast context for this encoder's precision (none for fp32)."""
        import torch

        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def encode(self, images):
        """uint8 (B, H, W, 3) tensor on ``device`` → float32 (B, feature_dim) features."""
        import torch

        with torch.inference_mode(), self.autocast():
            return self.model(self.spec.preprocess(images)).float()


def load_encoder(encoder: str | EncoderSpec, *, weights: str | os.PathLike[str] | None = None,
                 device: str = "auto", precision: str | None = None, pretrained: bool = True) -> LoadedEncoder:
    """Build an encoder, load its weights and move it to ``device``.

    Args:
        encoder: registry name, ``timm:<model-name>``, or a spec from :func:`get_encoder`.
        weights: weight file (default: packaged weights or the local caches).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``fp32``, ``fp16`` or ``bf16``; None = the encoder's default on a GPU, fp32 on CPU.
        pretrained: False keeps random weights (speed measurements only).

    Raises:
        ConfigError: unknown encoder or device. WeightsError: missing or mismatched weight file.
    """
    if isinstance(encoder, EncoderSpec):
        spec = encoder if weights is None else replace(encoder, weights=Path(weights).expanduser())
    else:
        spec = get_encoder(encoder, weights)
    dev = resolve_device(device)
    prec = precision or (spec.precision if dev.type == "cuda" else "fp32")
    if prec not in get_args(Precision):
        raise ConfigError(f"Unknown precision {prec!r}; use {', '.join(get_args(Precision))}.")
    sha = weights_sha256(spec.weights_path()) if pretrained else ""
    import torch

    # Channels-last suits convolutions on both GPU (tensor cores) and CPU (about 2× faster here).
    model = spec.build(pretrained=pretrained).to(dev).to(memory_format=torch.channels_last)
    return LoadedEncoder(spec, model, dev, prec, sha)


# ----------------------------------------------------------------------------------------------- one slide

def _slide_identity(slide) -> tuple[str, float]:
    """(path, µm per level-0 pixel) of an opened slide or of a slide path."""
    if isinstance(slide, (str, os.PathLike)):
        from ..slide import open_slide

        with open_slide(slide) as s:
            return str(s.path), float(s.mpp)
    return str(slide.path), float(slide.mpp)


def check_tiles_match_slide(tiles: TileGrid, slide, source: str = "") -> None:
    """Raise :class:`StageInputError` when the tiles were not made from this slide."""
    dims = tuple(int(v) for v in slide.dimensions)
    if tuple(tiles.level0_size) != dims:
        raise StageInputError(f"Tiles file {source or tiles.slide_id} was made from a slide of "
                              f"{tiles.level0_size[0]}×{tiles.level0_size[1]} pixels, but {slide.path} has "
                              f"{dims[0]}×{dims[1]}; the slide changed. Rerun `wsi2dmamba tile` for it.")
    if tiles.read_level >= slide.level_count:
        raise StageInputError(f"Tiles file {source or tiles.slide_id} reads level {tiles.read_level}, but "
                              f"{slide.path} has {slide.level_count} level(s). Rerun `wsi2dmamba tile` for it.")


def _tile_batches(plan: TileReadPlan, tiles: TileGrid, slide, encoder: LoadedEncoder, config: ExtractConfig):
    """The tile batches of a slide and how they are decoded.

    Returns:
        ``(batches, record)``: an iterable of ``(images, indices, blank)`` and the attributes that record
        the path taken: ``decode`` (``jpeg-tiles:<device type>`` or ``openslide``) and, when OpenSlide
        reads a slide under ``auto``, ``decode_reason``.
    """
    from ..slide import open_slide
    from .tile_decode import JpegTileBatches, UnsupportedTiles, choose_decode

    opened = slide if not isinstance(slide, (str, os.PathLike)) else None
    try:
        with contextlib.nullcontext(opened) if opened is not None else open_slide(plan.slide_path, plan.mpp_level0) as s:
            level, reason = choose_decode(config.decode, s, plan.level, encoder.device)
    except UnsupportedTiles as exc:
        raise SlideError(f"{plan.slide_path}: its tiles cannot be decoded from their stored JPEG bytes ({exc}); "
                         "extract it with --decode auto or --decode openslide.") from exc
    if level is not None:
        return (JpegTileBatches(plan, level, config.batch_size, encoder.device),
                {"decode": f"jpeg-tiles:{encoder.device.type}"})
    workers = default_workers(tiles.n_tiles) if config.workers is None else config.workers
    loader = make_loader(plan, batch_size=config.batch_size, workers=workers,
                         pin_memory=encoder.device.type == "cuda")
    record = {"decode": "openslide"}
    if config.decode == "auto":
        record["decode_reason"] = reason
    return loader, record


def feature_params_hash(tiles: TileGrid, encoder: LoadedEncoder) -> str:
    """Hash of everything that shaped a feature file: the tiles, the encoder, its weights and precision."""
    return params_hash({"tiles": tiles.params_hash, "encoder": encoder.name,
                        "weights_sha256": encoder.weights_sha256, "precision": encoder.precision,
                        "preprocess": asdict(encoder.spec.preprocess)})


def extract_features(tiles: TileGrid, slide, encoder: LoadedEncoder, config: ExtractConfig | None = None, *,
                     progress: bool = True) -> FeatureGrid:
    """Encode every tile of ``tiles`` read from ``slide``.

    Args:
        tiles: the slide's tiles (from ``RUN/tiles/<slide_id>.h5``).
        slide: the opened slide (:func:`wsi2dmamba.slide.open_slide`) or its path; reader processes open
            their own handles with the same resolution.
        encoder: from :func:`load_encoder`.
        config: batch size, workers, region reads and the tolerated fraction of unreadable tiles.
        progress: show a progress bar in tiles/s.

    Returns:
        The feature grid: (N, feature_dim) float32 features in the rows of ``tiles``; ``blank`` marks the
        tiles that could not be read and were encoded as white tiles.

    Raises:
        SlideError: more than ``max_blank_fraction`` of the tiles could not be read.
    """
    import torch
    from tqdm.auto import tqdm

    config = config or ExtractConfig(encoder=encoder.name)
    slide_path, mpp = _slide_identity(slide)
    plan = TileReadPlan.from_tiles(tiles, slide_path, mpp, config.max_run_tiles)
    batches, decode = _tile_batches(plan, tiles, slide, encoder, config)
    n = tiles.n_tiles
    feats = torch.empty((n, encoder.spec.feature_dim), dtype=torch.float32, device=encoder.device)
    blank = torch.zeros(n, dtype=torch.bool)
    t0 = time.perf_counter()
    bar = tqdm(total=n, desc=tiles.slide_id, unit="tile", unit_scale=False, leave=False,
               disable=not progress or n == 0, dynamic_ncols=True)
    on_gpu = encoder.device.type == "cuda"
    cudnn = torch.backends.cudnn.flags(enabled=True, benchmark=True, deterministic=False, allow_tf32=True) \
        if on_gpu else contextlib.nullcontext()
    with cudnn:
        for images, idx, bad in batches:
            images = images.to(encoder.device, non_blocking=True)
            feats[idx.to(encoder.device, non_blocking=True)] = encoder.encode(images)
            blank[idx] = bad
            bar.update(len(idx))
    out = feats.cpu().numpy()  # waits for the last batch
    bar.close()
    seconds = time.perf_counter() - t0
    blank_np = blank.numpy()
    n_blank = int(blank_np.sum())
    if n and n_blank / n > config.max_blank_fraction:
        raise SlideError(f"{slide_path}: {n_blank} of {n} tiles could not be read (more than "
                         f"{config.max_blank_fraction:.0%}); the slide file is damaged. Replace it, or raise "
                         "max_blank_fraction to keep white tiles in their place.")
    extra = {
        "tiles_params_hash": tiles.params_hash,
        "encoder_precision": encoder.precision,
        "encoder_input_px": encoder.spec.input_size,
        "random_weights": not bool(encoder.weights_sha256),
        "extract_seconds": round(seconds, 3),
        "extract_device": str(encoder.device),
        **decode,
    }
    return FeatureGrid.from_tiles(tiles, out, encoder=encoder.name, weights_sha256=encoder.weights_sha256,
                                  blank=blank_np, params_hash=feature_params_hash(tiles, encoder),
                                  extra_attrs=extra)


# ----------------------------------------------------------------------------------------------- a cohort

def encoder_dirname(encoder: str) -> str:
    """Folder name of an encoder's feature files (``timm:resnet18`` → ``timm-resnet18``)."""
    return encoder.replace(":", "-").replace("/", "-")


def tiles_path(run_dir: str | os.PathLike[str], slide_id: str) -> Path:
    return layout.tiles_files(run_dir, slide_id)["h5"]


def feature_path(run_dir: str | os.PathLike[str], encoder: str, slide_id: str) -> Path:
    return layout.grid_file(layout.features_dir(run_dir, encoder_dirname(encoder)), slide_id)


def _outputs(record: SlideRecord, run_dir: Path, *, encoder: str) -> list[Path]:
    return [feature_path(run_dir, encoder, record.slide_id)]


def extract_slide(record: SlideRecord, config: ExtractConfig, run_dir: Path, *, encoder: LoadedEncoder,
                  progress: bool = True) -> dict:
    """Work function of the stage: read the slide's tiles file, extract, write the feature grid file."""
    from ..slide import open_slide

    tp = tiles_path(run_dir, record.slide_id)
    if not tp.is_file():
        raise StageInputError(f"No tiles file for slide {record.slide_id!r} ({tp}); run `wsi2dmamba tile "
                              f"--cohort ... --out {run_dir}` first.")
    if record.path is None:
        raise StageInputError(f"Slide {record.slide_id!r} has no path in the manifest; extraction reads its "
                              "pixels, so give the slide file in the 'path' column.")
    # Checked before HDF5 reads it here: a damaged file can crash or hang the library.
    guard_grid_file(tp, "tiles", recorded_sha256(tp), writer="tile")
    tiles = read_tile_grid(tp)
    with open_slide(record.path, mpp_override=record.mpp) as slide:
        check_tiles_match_slide(tiles, slide, str(tp))
        grid = extract_features(tiles, slide, encoder, config, progress=progress)
    out = feature_path(run_dir, encoder.name, record.slide_id)
    write_feature_grid(out, grid)
    seconds = float(grid.extra_attrs.get("extract_seconds", 0.0)) or 1e-9
    return {"n_tiles": grid.n_tiles, "n_blank": int(grid.blank.sum()), "grid_shape": list(grid.shape),
            "feature_dim": grid.feature_dim, "tiles_per_s": round(grid.n_tiles / seconds, 1),
            "precision": encoder.precision, "device": str(encoder.device),
            "decode": grid.extra_attrs.get("decode", "openslide")}


def _root_attr(path: Path, key: str) -> str | None:
    """A root attribute of an HDF5 file already checked by :func:`_readable`, as text (None if unreadable)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return str(f.attrs.get(key, ""))
    except (OSError, RuntimeError, ValueError):
        return None


def _readable(paths: list[Path], kind: str, writer: str) -> set[Path]:
    """The files among ``paths`` that HDF5 may open in this process (see :mod:`wsi2dmamba.grid.guard`)."""
    recorded = {p: sha for p in paths if (sha := recorded_sha256(p))}
    return set(paths) - set(guard_grid_files(paths, kind, recorded, writer))


def drop_stale_features(cohort: Cohort, run_dir: str | os.PathLike[str], encoder: str) -> list[str]:
    """Delete feature files whose tiles file has since been made with other parameters (or removed, or
    damaged), and damaged feature files, so that the stage extracts those slides again. Returns the slide
    ids concerned."""
    made = {rec.slide_id: feature_path(run_dir, encoder, rec.slide_id) for rec in cohort}
    made = {sid: fp for sid, fp in made.items() if fp.is_file()}
    tiles = {sid: tiles_path(run_dir, sid) for sid in made}
    ok = _readable(list(made.values()), "features", "extract")
    ok |= _readable([tp for tp in tiles.values() if tp.is_file()], "tiles", "tile")
    stale = [sid for sid, fp in made.items() if _is_stale(fp, tiles[sid], ok)]
    for sid in stale:
        made[sid].unlink(missing_ok=True)
    return stale


def _is_stale(fp: Path, tp: Path, readable: set[Path]) -> bool:
    """True when feature file ``fp`` was not made from tiles file ``tp`` as it is now (or either is damaged)."""
    current = _root_attr(tp, "params_hash") if tp in readable else None
    return current is None or fp not in readable or _root_attr(fp, "tiles_params_hash") != current


def extract_cohort(cohort: Cohort, run_dir: str | os.PathLike[str], config: ExtractConfig,
                   options: RunOptions | None = None, *, encoder: LoadedEncoder | None = None,
                   gpus: Sequence[str] | None = None, **settings: Any) -> StageSummary:
    """Extract features for every slide of ``cohort`` whose tiles file exists, resuming where it stopped.

    Slides are done one after another in this process (one model on the device); tile reading runs in
    ``config.workers`` processes. Failures are recorded in the ledger and the batch goes on.

    Args:
        cohort: the slides (their ``path`` is needed to read pixels).
        run_dir: the run folder holding ``tiles/``.
        config: the stage settings.
        options: how the stage runs (:class:`RunOptions`; or its fields as keywords): ``progress`` bars
            (slides, and tiles/s within a slide); ``force`` extracts again slides already done; ``shard``;
            ``executor``: ``"local"`` (this process) or ``"ray"``: each slide a Ray task with one GPU
            (when the cluster has GPUs); each Ray worker loads the encoder once and keeps it for its next
            slides. ``workers`` is not used: tiles are read by ``config.workers`` processes.
        encoder: an already loaded encoder to use (default: load ``config.encoder``).
        gpus: the GPUs to use (``CUDA_VISIBLE_DEVICES`` entries, see :func:`resolve_gpus`). With several,
            one worker process per GPU, each with its own encoder and reader pool, takes the slides
            from one queue, largest first; this process alone shows the progress and writes states and
            the ledger. One GPU index runs here on that GPU.

    Returns:
        The stage summary; ``infos[slide_id]`` holds tile counts, blank tiles and tiles/s.
    """
    options = RunOptions.of(options, **settings)
    config, spread = _gpu_settings(config, gpus, options.executor)
    if encoder is None:
        encoder = _stage_encoder(config, spread)
    # What shapes the features goes into the hashed configuration.
    config = config.model_copy(update={"encoder": encoder.name, "precision": encoder.precision,
                                       "weights_sha256": encoder.weights_sha256,
                                       "pretrained": bool(encoder.weights_sha256)})
    drop_stale_features(cohort, run_dir, encoder.name)
    if options.executor == "ray" or spread:
        fn, resources, cohort, config = _worker_tasks(cohort, run_dir, config, encoder, gpus if spread else None)
    else:
        fn = functools.partial(extract_slide, encoder=encoder, progress=options.progress)
        resources = None
    outputs = functools.partial(_outputs, encoder=encoder.name)
    return run_stage(STAGE, cohort, run_dir, config, fn, outputs, RunOptions.of(options, workers=1),
                     stage_dir=layout.features_stage(encoder_dirname(encoder.name)), resources=resources)


def _gpu_settings(config: ExtractConfig, gpus: Sequence[str] | None, executor: str) -> tuple[ExtractConfig, bool]:
    """The settings for ``gpus`` and whether slides are spread over several GPUs' workers."""
    if gpus is not None and executor == "ray":
        raise ConfigError("--gpus is for the local executor; with --executor ray, Ray gives each slide one GPU "
                          "of its cluster.")
    if gpus is not None and len(gpus) == 1 and config.device in ("auto", "cuda"):
        config = config.model_copy(update={"device": f"cuda:{gpus[0]}"})
    return config, gpus is not None and len(gpus) > 1


def _stage_encoder(config: ExtractConfig, spread: bool) -> LoadedEncoder:
    """The stage's encoder; spread over GPUs, the model runs in the workers and is built here on the CPU only
    for its identity (weights and GPU precision)."""
    if not spread:
        return load_encoder(config.encoder, weights=config.weights, device=config.device,
                            precision=config.precision, pretrained=config.pretrained)
    precision = config.precision or (_gpu_precision(config) if config.device != "cpu" else None)
    return load_encoder(config.encoder, weights=config.weights, device="cpu", precision=precision,
                        pretrained=config.pretrained)


def _worker_tasks(cohort: Cohort, run_dir, config: ExtractConfig, encoder: LoadedEncoder,
                  gpus: Sequence[str] | None):
    """Work function, task resources, slide order and settings for slides done by worker processes (one
    per GPU of ``gpus``, or Ray's): ``(fn, resources, cohort, config)``."""
    # The model is not shipped: each worker loads it (same weights, same precision as recorded here).
    device = "cuda" if str(config.device).startswith("cuda") else config.device
    load = {"encoder": config.encoder, "weights": config.weights, "device": device,
            "precision": encoder.precision, "pretrained": config.pretrained}
    fn = functools.partial(_extract_slide_in_worker, load=tuple(sorted(load.items())))
    resources = TaskResources.for_device(device)
    if gpus:
        resources = TaskResources(cpus=1, gpus=1, devices=tuple(gpus))
        if config.workers is None:  # the host's cores shared between the GPUs' reader pools
            config = config.model_copy(update={"workers": max(1, (os.cpu_count() or 2) // len(gpus) - 1)})
    return fn, resources, largest_first(cohort, run_dir), config


def _gpu_precision(config: ExtractConfig) -> str:
    """The precision the encoder runs at on a GPU when none is asked for: its own."""
    return get_encoder(config.encoder, config.weights).precision


def resolve_gpus(spec: str | None) -> list[str] | None:
    """``--gpus``: ``all`` → every visible GPU; ``0,1,…`` → those (``CUDA_VISIBLE_DEVICES`` entries).

    Raises:
        ConfigError: an empty list, a repeated GPU, or ``all`` on a machine without GPUs.
    """
    if spec is None:
        return None
    from ..cohort.executors import visible_gpus

    gpus = visible_gpus() if spec.strip() == "all" else [g.strip() for g in spec.split(",") if g.strip()]
    if not gpus:
        raise ConfigError(f"--gpus {spec}: no GPU is visible to this process." if spec.strip() == "all" else
                          f"--gpus {spec!r}: give 'all' or GPU indices such as 0,1.")
    if len(set(gpus)) != len(gpus):
        raise ConfigError(f"--gpus {spec}: a GPU is named twice.")
    if len(gpus) == 1 and not gpus[0].isdigit():
        raise ConfigError(f"--gpus {spec}: give one GPU by its index (or several, by index or UUID).")
    return gpus


def _tile_count(path: Path) -> int:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return int(f["coords"].shape[0])
    except (OSError, KeyError):
        return 0


def largest_first(cohort: Cohort, run_dir: str | os.PathLike[str]) -> Cohort:
    """The cohort ordered by tiles per slide, most first (the queue's order: no long slide is left for last)."""
    counts = {r.slide_id: _tile_count(tiles_path(run_dir, r.slide_id)) for r in cohort}
    return replace(cohort, records=tuple(sorted(cohort, key=lambda r: -counts[r.slide_id])))


@functools.lru_cache(maxsize=2)
def _worker_encoder(load: tuple) -> LoadedEncoder:
    """The encoder of a Ray worker process, loaded on its first slide and kept for the next ones."""
    args = dict(load)
    return load_encoder(args.pop("encoder"), **args)


def _extract_slide_in_worker(record: SlideRecord, config: ExtractConfig, run_dir: Path, *, load: tuple) -> dict:
    """Work function of a worker (one per GPU, or a Ray task): :func:`extract_slide` with the worker's own
    copy of the encoder, loaded on its first slide. The info says which process and GPU did the slide."""
    info = extract_slide(record, config, run_dir, encoder=_worker_encoder(load), progress=False)
    return {**info, "worker_pid": os.getpid(), "worker_gpu": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
            "worker_encoder_loads": _worker_encoder.cache_info().misses}


def blank_tile_count(summary: StageSummary) -> int:
    """Tiles replaced by white tiles over the slides done in a stage run."""
    return int(sum(int(i.get("n_blank", 0)) for i in summary.infos.values()))


__all__ = [
    "ExtractConfig",
    "LoadedEncoder",
    "blank_tile_count",
    "check_tiles_match_slide",
    "drop_stale_features",
    "encoder_dirname",
    "extract_cohort",
    "extract_features",
    "extract_slide",
    "feature_path",
    "largest_first",
    "load_encoder",
    "resolve_device",
    "resolve_gpus",
    "tiles_path",
]
