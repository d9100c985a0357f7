"""Where every file of a run folder lies: the one owner of the run's folder and file names.

A run folder (``--out`` of the stages) holds::

    RUN/
      ledger.csv                      the table of every per-slide state (ledger.shard-<i>of<N>.csv per shard)
      logs/<stamp>-<command>-<pid>.log
      cohort/                         a generated demo cohort: slides/, cohort.json, manifest.csv
      segment/<slide>.geojson, <slide>_mask.png, <slide>_overlay.png, config.json
      tiles/<slide>.h5, <slide>_grid.png
      features/<encoder>/<slide>.h5
      <stage folder>/.state/<slide>.json, .shards/<i>of<N>.json, .lock, .lock-<i>of<N>
      train/splits/splits_<k>.csv, splits_<k>_descriptor.csv, .lock
      train/pipeline.json, pipeline_result.json
      train/<model>/fold_<k>/         config.json, log.csv, {best,last}.{safetensors,json}, predictions.csv,
                                      done.json (written last), resume.safetensors, restarts.csv,
                                      restart_<r>/, .lock
      train/<model>/summary.csv
      eval/metrics.json
      report/index.html, metrics.json, summary.csv
      heatmaps/<model>/<slide>.{json,png,csv,geojson}
      bundles/<model>/bundle.json, fold_<k>.safetensors
      predict.json
      predictions/<model>.csv, <model>.patients.csv, <model>/<slide>.json, <model>/heatmaps/

Every module takes these paths from here. The functions do path arithmetic only: they neither read nor
write, and import nothing beyond the standard library.

>>> from pathlib import Path
>>> fold_dir(model_dir(Path("runs/x"), "abmil"), 2).as_posix()
'runs/x/train/abmil/fold_2'
>>> fold_index(Path("runs/x/train/abmil/fold_2"))
2
>>> state_file(Path("runs/x"), "features/uni", "s1").as_posix()
'runs/x/features/uni/.state/s1.json'
"""

from __future__ import annotations

import os
from pathlib import Path

PathLike = str | os.PathLike[str]

# --- the run folder -------------------------------------------------------------------------------------
#: Stage folders directly below the run folder.
SEGMENT_DIR = "segment"
TILES_DIR = "tiles"
FEATURES_DIR = "features"
TRAIN_DIR = "train"
EVAL_DIR = "eval"
REPORT_DIR = "report"
HEATMAPS_DIR = "heatmaps"
BUNDLES_DIR = "bundles"
PREDICTIONS_DIR = "predictions"
COHORT_DIR = "cohort"
LOGS_DIR = "logs"

LEDGER = "ledger.csv"
#: Record of the bundles ``wsi2dmamba predict`` applied (in the run folder of the predictions).
PREDICT_RECORD = "predict.json"
#: The parameters of a stage's last run, in its stage folder (read by later stages, not a per-slide output).
STAGE_CONFIG = "config.json"
#: Per-slide state files, shard records and locks, inside each stage folder.
STATE_DIR = ".state"
SHARDS_DIR = ".shards"
LOCK = ".lock"
#: Glob patterns (relative to the run folder) of the state and shard-record folders: stages lie one level
#: down (``tiles``) or two (``features/<encoder>``, ``predictions/<model>``).
STAGE_DIR_GLOBS = ("*", "*/*")
SHARD_LEDGER_GLOB = "ledger.shard-*of*.csv"


def ledger(run_dir: PathLike) -> Path:
    """``RUN/ledger.csv``."""
    return Path(run_dir) / LEDGER


def shard_ledger(run_dir: PathLike, label: str) -> Path:
    """``RUN/ledger.shard-<label>.csv``, the ledger of one shard (``label`` as ``"2of8"``)."""
    return Path(run_dir) / f"ledger.shard-{label}.csv"


def log_file(run_dir: PathLike, stamp: str, command: str, pid: int) -> Path:
    """``RUN/logs/<stamp>-<command>-<pid>.log``: the log of one command."""
    return Path(run_dir) / LOGS_DIR / f"{stamp}-{command}-{pid}.log"


def predict_record(run_dir: PathLike) -> Path:
    """``RUN/predict.json``."""
    return Path(run_dir) / PREDICT_RECORD


def cohort_dir(run_dir: PathLike) -> Path:
    """``RUN/cohort``: a demo cohort generated into the run."""
    return Path(run_dir) / COHORT_DIR


# --- stage folders and their housekeeping ---------------------------------------------------------------
def stage_dir(run_dir: PathLike, stage_folder: str) -> Path:
    """``RUN/<stage_folder>``; ``stage_folder`` is relative to the run (``tiles``, ``features/uni``)."""
    return Path(run_dir) / stage_folder


def stage_config(run_dir: PathLike, stage_folder: str) -> Path:
    """``RUN/<stage_folder>/config.json``."""
    return stage_dir(run_dir, stage_folder) / STAGE_CONFIG


def state_dir(run_dir: PathLike, stage_folder: str) -> Path:
    """``RUN/<stage_folder>/.state``."""
    return stage_dir(run_dir, stage_folder) / STATE_DIR


def state_file(run_dir: PathLike, stage_folder: str, slide_id: str) -> Path:
    """``RUN/<stage_folder>/.state/<slide_id>.json``: the state of one slide in one stage."""
    return state_dir(run_dir, stage_folder) / f"{slide_id}.json"


def state_of_output(output: PathLike) -> Path:
    """The state file that records ``output`` (``<folder>/.state/<stem>.json``)."""
    output = Path(output)
    return output.parent / STATE_DIR / f"{output.stem}.json"


def state_globs() -> tuple[str, ...]:
    """Glob patterns, relative to the run folder, of every state file."""
    return tuple(f"{d}/{STATE_DIR}/*.json" for d in STAGE_DIR_GLOBS)


def shard_record(run_dir: PathLike, stage_folder: str, label: str) -> Path:
    """``RUN/<stage_folder>/.shards/<label>.json``: what one shard of a stage set out to do."""
    return stage_dir(run_dir, stage_folder) / SHARDS_DIR / f"{label}.json"


def shard_record_globs() -> tuple[str, ...]:
    """Glob patterns, relative to the run folder, of every shard record."""
    return tuple(f"{d}/{SHARDS_DIR}/*.json" for d in STAGE_DIR_GLOBS)


def lock_file(folder: PathLike, label: str | None = None) -> Path:
    """The lock of a folder (a stage folder, a fold, the splits): ``.lock``, or ``.lock-<label>`` for a
    shard."""
    return Path(folder) / (LOCK if label is None else f"{LOCK}-{label}")


def shard_locks_glob() -> str:
    """Glob pattern of the shards' locks inside a stage folder."""
    return f"{LOCK}-*of*"


def shard_of_lock(lock: PathLike) -> str:
    """The shard label (``"2of8"``) of a shard's lock file."""
    return Path(lock).name[len(LOCK) + 1:]


# --- per-slide files ------------------------------------------------------------------------------------
def grid_file(folder: PathLike, slide_id: str) -> Path:
    """``<folder>/<slide_id>.h5``: a slide's grid file in a tiles or feature folder."""
    return Path(folder) / f"{slide_id}.h5"


def segment_files(run_dir: PathLike, slide_id: str) -> dict[str, Path]:
    """A slide's segmentation outputs: ``geojson`` (tissue contours), ``mask`` and ``overlay`` pictures."""
    d = stage_dir(run_dir, SEGMENT_DIR)
    return {"geojson": d / f"{slide_id}.geojson", "mask": d / f"{slide_id}_mask.png",
            "overlay": d / f"{slide_id}_overlay.png"}


def tiles_dir(run_dir: PathLike) -> Path:
    """``RUN/tiles``."""
    return stage_dir(run_dir, TILES_DIR)


def tiles_files(run_dir: PathLike, slide_id: str) -> dict[str, Path]:
    """A slide's tiling outputs: ``h5`` (the tile grid) and ``picture`` (the grid over the thumbnail)."""
    d = tiles_dir(run_dir)
    return {"h5": grid_file(d, slide_id), "picture": d / f"{slide_id}_grid.png"}


def features_root(run_dir: PathLike) -> Path:
    """``RUN/features``: one folder per encoder below it."""
    return stage_dir(run_dir, FEATURES_DIR)


def features_dir(run_dir: PathLike, encoder_folder: str) -> Path:
    """``RUN/features/<encoder_folder>`` (``encoder_folder`` from ``features.encoder_dirname``)."""
    return features_root(run_dir) / encoder_folder


def features_stage(encoder_folder: str) -> str:
    """The stage folder of one encoder's features, relative to the run: ``features/<encoder_folder>``."""
    return f"{FEATURES_DIR}/{encoder_folder}"


def slide_files(folder: PathLike, slide_id: str, suffixes: tuple[str, ...]) -> list[Path]:
    """``<folder>/<slide_id><suffix>`` for each suffix (``".json"``, ``".png"``, …)."""
    return [Path(folder) / f"{slide_id}{s}" for s in suffixes]


# --- training -------------------------------------------------------------------------------------------
FOLD_PREFIX = "fold_"
RESTART_PREFIX = "restart_"
FOLD_CONFIG = "config.json"
FOLD_LOG = "log.csv"
FOLD_PREDICTIONS = "predictions.csv"
#: Written last: the fold is finished once it exists; it records the sha256 of :data:`FOLD_OUTPUTS`.
FOLD_DONE = "done.json"
#: The resume state of a fold stopped between epochs.
FOLD_RESUME = "resume.safetensors"
#: The restarts of a fold trained with several seeds, and which one was kept.
FOLD_RESTARTS = "restarts.csv"
CHECKPOINTS = ("best", "last")
CHECKPOINT_SUFFIX = ".safetensors"
SIDECAR_SUFFIX = ".json"
#: The files of a finished fold, whose sha256 ``done.json`` records.
FOLD_OUTPUTS = (FOLD_CONFIG, FOLD_LOG, "best.safetensors", "best.json", "last.safetensors", "last.json",
                FOLD_PREDICTIONS)
SPLITS_DIR = "splits"
SPLIT_GLOB = "splits_*.csv"
PIPELINE_RECORD = "pipeline.json"
PIPELINE_RESULT = "pipeline_result.json"
MODEL_SUMMARY = "summary.csv"


def train_dir(run_dir: PathLike) -> Path:
    """``RUN/train``: one folder per trained model, and the splits."""
    return Path(run_dir) / TRAIN_DIR


def splits_dir(run_dir: PathLike) -> Path:
    """``RUN/train/splits``."""
    return train_dir(run_dir) / SPLITS_DIR


def split_file(folder: PathLike, fold: int) -> Path:
    """``<folder>/splits_<fold>.csv`` (CLAM's name and columns ``train``, ``val``, ``test``)."""
    return Path(folder) / f"splits_{fold}.csv"


def split_descriptor(folder: PathLike, fold: int) -> Path:
    """``<folder>/splits_<fold>_descriptor.csv``: class counts per partition."""
    return Path(folder) / f"splits_{fold}_descriptor.csv"


def model_dir(run_dir: PathLike, name: str) -> Path:
    """``RUN/train/<name>``: the folds of one trained model."""
    return train_dir(run_dir) / name


def done_glob() -> str:
    """Glob pattern, relative to the run folder, of every finished fold's ``done.json``."""
    return f"{TRAIN_DIR}/*/{FOLD_PREFIX}*/{FOLD_DONE}"


def fold_dir(model_folder: PathLike, fold: int) -> Path:
    """``<model_folder>/fold_<fold>``."""
    return Path(model_folder) / f"{FOLD_PREFIX}{fold}"


def fold_glob() -> str:
    """Glob pattern of the fold folders inside a model folder."""
    return f"{FOLD_PREFIX}*"


def fold_index(folder: PathLike) -> int | None:
    """The fold number of a folder named ``fold_<k>``, or None for any other name."""
    name = Path(folder).name
    rest = name[len(FOLD_PREFIX):]
    return int(rest) if name.startswith(FOLD_PREFIX) and rest.isdigit() else None


def fold_file(fold_folder: PathLike, name: str) -> Path:
    """``<fold_folder>/<name>``, one of the fold's files (``FOLD_DONE``, ``FOLD_CONFIG``, …)."""
    return Path(fold_folder) / name


def checkpoint_file(fold_folder: PathLike, name: str) -> Path:
    """``<fold_folder>/<name>.safetensors`` for ``name`` in :data:`CHECKPOINTS`."""
    return Path(fold_folder) / f"{name}{CHECKPOINT_SUFFIX}"


def checkpoint_sidecar(checkpoint: PathLike) -> Path:
    """The JSON written beside a checkpoint (``best.safetensors`` → ``best.json``)."""
    return Path(checkpoint).with_suffix(SIDECAR_SUFFIX)


def restart_dir(fold_folder: PathLike, restart: int) -> Path:
    """``<fold_folder>/restart_<restart>``: one seed of a fold trained with restarts."""
    return Path(fold_folder) / f"{RESTART_PREFIX}{restart}"


def restart_glob() -> str:
    """Glob pattern of the restart folders inside a fold folder."""
    return f"{RESTART_PREFIX}*"


# --- evaluation, report, heatmaps, bundles, predictions -------------------------------------------------
METRICS = "metrics.json"
REPORT_PAGE = "index.html"
REPORT_SUMMARY = "summary.csv"
BUNDLE_MANIFEST = "bundle.json"
PREDICTION_HEATMAPS_DIR = "heatmaps"


def eval_dir(run_dir: PathLike) -> Path:
    """``RUN/eval``."""
    return Path(run_dir) / EVAL_DIR


def eval_metrics(run_dir: PathLike) -> Path:
    """``RUN/eval/metrics.json``: every model's metrics."""
    return eval_dir(run_dir) / METRICS


def model_summary(model_folder: PathLike) -> Path:
    """``RUN/train/<model>/summary.csv``: one model's per-fold metrics, CLAM's table."""
    return Path(model_folder) / MODEL_SUMMARY


def report_dir(run_dir: PathLike) -> Path:
    """``RUN/report``."""
    return Path(run_dir) / REPORT_DIR


def report_files(report_folder: PathLike) -> dict[str, Path]:
    """The report's files: ``page`` (``index.html``), ``metrics`` and ``summary``."""
    d = Path(report_folder)
    return {"page": d / REPORT_PAGE, "metrics": d / METRICS, "summary": d / REPORT_SUMMARY}


def heatmaps_dir(run_dir: PathLike, model: str) -> Path:
    """``RUN/heatmaps/<model>``."""
    return Path(run_dir) / HEATMAPS_DIR / model


def bundle_dir(run_dir: PathLike, model: str) -> Path:
    """``RUN/bundles/<model>``: the exported bundle of one model."""
    return Path(run_dir) / BUNDLES_DIR / model


def bundle_manifest(bundle_folder: PathLike) -> Path:
    """``<bundle>/bundle.json``."""
    return Path(bundle_folder) / BUNDLE_MANIFEST


def bundle_fold_file(fold: int) -> str:
    """The name of one fold's weights inside a bundle: ``fold_<fold>.safetensors``."""
    return f"{FOLD_PREFIX}{fold}{CHECKPOINT_SUFFIX}"


def predictions_dir(run_dir: PathLike) -> Path:
    """``RUN/predictions``."""
    return Path(run_dir) / PREDICTIONS_DIR


def predictions_stage(model: str) -> str:
    """The stage folder of one model's predictions, relative to the run: ``predictions/<model>``."""
    return f"{PREDICTIONS_DIR}/{model}"


def prediction_tables(run_dir: PathLike, model: str) -> tuple[Path, Path]:
    """``RUN/predictions/<model>.csv`` (one row per slide) and ``<model>.patients.csv`` (per patient)."""
    base = predictions_dir(run_dir)
    return base / f"{model}.csv", base / f"{model}.patients.csv"


def prediction_file(run_dir: PathLike, model: str, slide_id: str) -> Path:
    """``RUN/predictions/<model>/<slide_id>.json``: one slide's prediction."""
    return predictions_dir(run_dir) / model / f"{slide_id}.json"


def prediction_heatmaps_dir(run_dir: PathLike, model: str) -> Path:
    """``RUN/predictions/<model>/heatmaps``."""
    return predictions_dir(run_dir) / model / PREDICTION_HEATMAPS_DIR


def relative(run_dir: PathLike, path: PathLike) -> str:
    """``path`` relative to the run folder, as recorded in states and shown in messages."""
    return os.path.relpath(path, run_dir)


# --- a generated cohort folder (``RUN/cohort`` or any folder given to the demo) -------------------------
COHORT_SLIDES_DIR = "slides"
COHORT_RECORD = "cohort.json"
COHORT_MANIFEST = "manifest.csv"


def cohort_slides_dir(cohort_folder: PathLike) -> Path:
    """``<cohort_folder>/slides``: the generated slide files."""
    return Path(cohort_folder) / COHORT_SLIDES_DIR


def cohort_record(cohort_folder: PathLike) -> Path:
    """``<cohort_folder>/cohort.json``: the specification the slides were drawn from."""
    return Path(cohort_folder) / COHORT_RECORD


def cohort_manifest(cohort_folder: PathLike) -> Path:
    """``<cohort_folder>/manifest.csv``: the generated cohort's manifest."""
    return Path(cohort_folder) / COHORT_MANIFEST


def heatmap_files(folder: PathLike, slide_id: str) -> dict[str, Path]:
    """A slide's heatmap files in ``folder`` (``RUN/heatmaps/<model>`` or one given): ``record`` (what was
    drawn, with which parameters), ``geojson`` (per-tile scores for QuPath), ``png`` (the overlay), and
    ``stem``, the path the pictures' names are made from (``<stem>.png``, ``<stem>_figure.png``, …)."""
    d = Path(folder)
    return {"record": d / f"{slide_id}.json", "geojson": d / f"{slide_id}.geojson", "png": d / f"{slide_id}.png",
            "stem": d / slide_id}


def pipeline_records(train_folder: PathLike) -> dict[str, Path]:
    """The records of ``wsi2dmamba pipeline`` in its training run folder: ``provenance`` (the configuration
    it ran) and ``result`` (report, timings, excluded slides)."""
    d = Path(train_folder)
    return {"provenance": d / PIPELINE_RECORD, "result": d / PIPELINE_RESULT}


def cohort_slide_file(cohort_folder: PathLike, slide_id: str) -> Path:
    """``<cohort_folder>/slides/<slide_id>.tiff``: one generated slide (pyramidal TIFF)."""
    return cohort_slides_dir(cohort_folder) / f"{slide_id}.tiff"
