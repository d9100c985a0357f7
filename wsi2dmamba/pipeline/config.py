"""Pipeline files: one TOML file that describes a whole run, from the cohort manifest to the report.

A pipeline file has these tables (``[train]`` and one of ``[cohort]`` or ``[demo]`` are required)::

    [cohort]
    manifest = "../cohorts/bracs.csv"  # relative paths are resolved against the TOML file's folder
    slides_dir = "/data/BRACS"         # optional: where slides with an empty 'path' are looked up
    splits_dir = "../cohorts/bracs_splits"  # optional: fixed splits_<k>.csv instead of drawn folds

    [demo]                             # instead of [cohort]: build the demo cohort in RUN/cohort
    rule = "long-range"                # or "contact" (docs/demo.md)
    slides = 48
    seed = 0

    [run]
    out = "runs/bracs"                 # run folder (default: runs/<file name> in the current folder)
    workers = 2                        # worker processes of the per-slide stages
    train_dir = "classification"       # optional sub-folder for train/evaluate/report

    [segment]                          # options of `wsi2dmamba segment` (SegmentConfig)
    [tile]                             # options of `wsi2dmamba tile` (TileConfig; segmentation: [segment])
    [extract]                          # options of `wsi2dmamba extract` (ExtractConfig)
    [train]                            # options of `wsi2dmamba train` (TrainConfig), plus:
    models = ["2dmambamil", "abmil"]   #   the models to train, each over every fold
    [train.model_options.2dmambamil]   #   per-model configuration overrides (optional)
    d_model = 64
    [evaluate]                         # n_boot, seed of the bootstrap intervals
    [predict]                          # optional: apply the trained models to another cohort and
    manifest = "../cohorts/other.csv"  #   validate them there (see wsi2dmamba.predict.pipeline)

Each stage table is validated by that stage's own configuration class, so a pipeline file accepts
exactly the options of the single-stage commands. Any unknown table or key is an error that names the
file and the key.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import ConfigError
from ..fileio import user_path
from ..stages import STAGES as STAGE_TABLE
from ..stages import stage as stage_entry
from ..validation import validated

#: The stage tables of a pipeline file, in the order the stages run (one per entry of the stage table).
STAGES = tuple(s.name for s in STAGE_TABLE)


class CohortSection(BaseModel):
    """``[cohort]``: the slides and their labels."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    manifest: Path = Field(description="Cohort manifest CSV (slide_id, path, patient_id, label / time, event).")
    slides_dir: Optional[Path] = Field(None, description="Folder searched for slides whose 'path' is empty.")
    splits_dir: Optional[Path] = Field(None, description="Folder of fixed splits_<k>.csv files; "
                                                         "default: patient-level stratified folds.")


class DemoSection(BaseModel):
    """``[demo]``: build the built-in demo cohort (``docs/demo.md``) in ``RUN/cohort`` and use it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    slides: int = Field(96, ge=4, description="Number of slides (half of each class).")
    seed: int = Field(0, description="Seed of the layouts, survival times and augmentations.")
    rule: Literal["long-range", "contact"] = Field(
        "long-range", description="What sets labels and survival: 'long-range' (paired against "
        "segregated tumour and lymphoid sites, 4 or more cells apart) or 'contact' (lymphocytes touching the "
        "tumour, or walled off).")
    rows: Optional[int] = Field(None, ge=6, le=64, description="Cells per slide, vertically (one cell = 224 px "
                                "at 0.5 µm/px); default: 13 for 'long-range', 6 for 'contact'.")
    cols: Optional[int] = Field(None, ge=6, le=64, description="Cells per slide, horizontally; default as rows.")

    @model_validator(mode="after")
    def _grid_fits_the_rule(self) -> DemoSection:
        from ..demo.long_range import check_grid

        spec = self.spec()
        if self.rule == "long-range":
            check_grid(spec.long_range)
        return self

    def spec(self):
        """The :class:`~wsi2dmamba.demo.DemoCohortSpec` this table describes."""
        from ..demo import DemoCohortSpec, LayoutSpec, LongRangeSpec

        if self.rule == "long-range":
            d = LongRangeSpec()
            grid = LongRangeSpec(rows=self.rows or d.rows, cols=self.cols or d.cols)
            return DemoCohortSpec(n_slides=self.slides, seed=self.seed, rule=self.rule, long_range=grid)
        d = LayoutSpec()
        grid = LayoutSpec(rows=self.rows or d.rows, cols=self.cols or d.cols)
        return DemoCohortSpec(n_slides=self.slides, seed=self.seed, rule=self.rule, layout=grid)


class EvaluateConfig(BaseModel):
    """``[evaluate]``: the bootstrap of the confidence intervals."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_boot: int = Field(1000, ge=0, description="Bootstrap resamples of the 95% intervals (0 = none).")
    seed: int = Field(0, description="Seed of the bootstrap.")


class RunSection(BaseModel):
    """``[run]``: where the run goes and how much of the machine it uses."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    out: Optional[Path] = Field(None, description="Run folder (relative to the file's folder); default: "
                                                 "runs/<pipeline name> in the current folder.")
    workers: int = Field(1, ge=1, description="Worker processes of the per-slide stages (segment, tile).")
    name: Optional[str] = Field(None, description="Name of the run; default: the file's name.")
    train_dir: Optional[str] = Field(None, description="Sub-folder of the run folder for training, "
                                                       "evaluation and the report (default: the run folder).")


class TrainSection(BaseModel):
    """``[train]`` beyond the training options: which models, and their configuration overrides."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: list[str] = Field(min_length=1, description="Models to train: registry names, or "
                                                         "'name:preset' for a named preset (e.g. '2dmambamil:paper').")
    model_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per-model configuration overrides, as [train.model_options.<model>] "
                                          "tables (see below).")


class PipelineConfig(BaseModel):
    """A validated pipeline file. ``stage_options`` holds each stage's validated configuration object."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    source: Path
    name: str
    cohort: Optional[CohortSection]
    demo: Optional[DemoSection]
    run: RunSection
    models: tuple[str, ...]
    model_options: dict[str, dict[str, Any]]
    stage_options: dict[str, Any]
    predict: Optional[Any] = None  # the [predict] table (wsi2dmamba.predict.pipeline.PredictSection)

    @property
    def out(self) -> Path:
        return self.run.out if self.run.out is not None else (Path("runs") / self.name).resolve()

    @property
    def task(self) -> str:
        return self.stage_options["train"].task

    def option(self, stage: str) -> Any:
        """The validated configuration object of ``stage`` (``SegmentConfig``, ``TileConfig``, …)."""
        return self.stage_options[stage]


def load_pipeline(path: str | os.PathLike[str], *, out: str | os.PathLike[str] | None = None,
                  overrides: dict[str, dict[str, Any]] | None = None) -> PipelineConfig:
    """Read and validate a pipeline file.

    Args:
        path: the TOML file.
        out: run folder that replaces ``[run] out`` (e.g. from ``--out``).
        overrides: ``{table: {key: value}}`` merged over the file's tables before validation.

    Raises:
        ConfigError: the file is missing or not TOML, or a table or key is unknown or invalid; the message
            names the file and the key.
    """
    path = user_path(path, "pipeline file")
    if not path.is_file():
        raise ConfigError(f"Pipeline file not found: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a valid TOML file ({exc})") from None
    for table, values in (overrides or {}).items():
        if not isinstance(data.setdefault(table, {}), dict):
            raise ConfigError(f"{path}: [{table}] must be a table (e.g. '[{table}]' followed by 'key = value' "
                              f"lines), not {type(data[table]).__name__} {data[table]!r}")
        data[table].update(values)
    return pipeline_from_dict(data, path.resolve(), out=out)


def pipeline_from_dict(data: dict[str, Any], source: Path, *, out: str | os.PathLike[str] | None = None) -> PipelineConfig:
    """Validate a parsed pipeline file (see :func:`load_pipeline`)."""
    _check_tables(data, source)
    base = source.parent
    cohort, demo = _cohort_or_demo(data, source, base)
    run = _run_section(data.get("run", {}), source, base, out)
    train_table = dict(data["train"])
    section = _validate(TrainSection, {k: train_table.pop(k) for k in ("models", "model_options")
                                       if k in train_table}, source, "train")
    _check_models(section, source)
    stage_options = _stage_options(data, train_table, source)
    name = run.name or source.stem
    predict = None
    if "predict" in data:
        from ..predict.pipeline import PredictSection, check_predict_section

        predict = check_predict_section(_validate(PredictSection, data["predict"], source, "predict"), source,
                                        models=tuple(section.models), demo=demo)
    return PipelineConfig(source=source, name=name, cohort=cohort, demo=demo, run=run,
                          models=tuple(section.models), model_options=dict(section.model_options),
                          stage_options=stage_options, predict=predict)


def _check_tables(data: dict[str, Any], source: Path) -> None:
    """Only known tables; each a table; one of [cohort] and [demo]; a [train] table."""
    allowed = ("cohort", "demo", "run", *STAGES, "predict")
    unknown = [k for k in data if k not in allowed]
    if unknown:
        raise ConfigError(f"{source}: unknown table(s) {', '.join(repr(k) for k in unknown)}; "
                          f"a pipeline file has the tables {', '.join(allowed)}")
    for k in allowed:
        if k in data and not isinstance(data[k], dict):
            raise ConfigError(f"{source}: '{k}' must be a table ([{k}]), got {type(data[k]).__name__}")
    if ("cohort" in data) == ("demo" in data):
        raise ConfigError(f"{source}: give either a [cohort] table (manifest = \"path/to/cohort.csv\") or a "
                          "[demo] table (the built-in demo cohort), " + ("not both" if "cohort" in data else "none found"))
    if "train" not in data:
        raise ConfigError(f"{source}: no [train] table; add one with models = [\"2dmambamil\", …]")


def _cohort_or_demo(data: dict[str, Any], source: Path,
                    base: Path) -> tuple[CohortSection | None, DemoSection | None]:
    if "cohort" not in data:
        return None, _validate(DemoSection, data["demo"], source, "demo")
    cohort = _validate(CohortSection, data["cohort"], source, "cohort")
    return cohort.model_copy(update={k: _resolve(getattr(cohort, k), base, f"{source}: [cohort] {k}")
                                     for k in ("manifest", "slides_dir", "splits_dir")}), None


def _run_section(table: dict[str, Any], source: Path, base: Path, out: str | os.PathLike[str] | None) -> RunSection:
    run = _validate(RunSection, table, source, "run")
    if out is not None:
        run = run.model_copy(update={"out": _resolve(Path(out), Path.cwd(), "--out")})
    elif run.out is not None:
        run = run.model_copy(update={"out": _resolve(run.out, base, f"{source}: [run] out")})
    if run.train_dir is not None and (not run.train_dir or any(c in run.train_dir for c in "/\\\0")
                                      or run.train_dir in (".", "..")):
        raise ConfigError(f"{source}: [run] train_dir must be a plain folder name, got {run.train_dir!r}")
    return run


def _stage_options(data: dict[str, Any], train_table: dict[str, Any], source: Path) -> dict[str, Any]:
    """Each stage's validated configuration object; [tile] takes [segment]'s as its segmentation."""
    stage_options: dict[str, Any] = {}
    for stage in STAGES:
        table = dict(train_table if stage == "train" else data.get(stage, {}))
        if stage == "tile":
            if "segment" in table:
                raise ConfigError(f"{source}: [tile] unknown key 'segment'; segmentation options go in [segment]")
            table["segment"] = stage_options["segment"]
        extra = ("models", "model_options") if stage == "train" else ()
        stage_options[stage] = _validate(stage_config_class(stage), table, source, stage, extra)
    return stage_options


def stage_config_class(stage: str) -> type[BaseModel]:
    """The configuration class of a stage (imported on first use)."""
    return stage_entry(stage).config_class()


# Model options the run sets itself, from the features, the task and [train] input_axes.
_RUN_SET_MODEL_OPTIONS = ("in_dim", "n_classes", "task", "n_bins", "input_axes")


def split_model_entry(entry: str) -> tuple[str, str | None]:
    """``"2dmambamil:paper"`` → ``("2dmambamil", "paper")``; ``"abmil"`` → ``("abmil", None)``."""
    from ..models.registry import split_model_key

    return split_model_key(entry)


def model_folder(entry: str) -> str:
    """Folder name of a model entry in ``RUN/train`` (``2dmambamil:paper`` → ``2dmambamil-paper``)."""
    from ..models.registry import model_folder as folder

    return folder(entry)


def _check_models(section: TrainSection, source: Path) -> None:
    from ..models import list_models, model_info
    from ..models.registry import build_config, check_model_key

    known = list_models()
    bad = [m for m in section.models if split_model_entry(m)[0] not in known]
    if bad:
        raise ConfigError(f"{source}: [train] models: unknown model(s) {', '.join(repr(m) for m in bad)}; "
                          f"available: {', '.join(known)}")
    for m in section.models:
        try:
            check_model_key(m)
        except ConfigError as exc:
            raise ConfigError(f"{source}: [train] models: {exc}") from None
    dupes = sorted({m for m in section.models if section.models.count(m) > 1})
    if dupes:
        raise ConfigError(f"{source}: [train] models lists {', '.join(dupes)} more than once")
    for model, opts in section.model_options.items():
        if model not in section.models:
            raise ConfigError(f"{source}: [train.model_options.{model}]: {model!r} is not in [train] models")
        fixed = [k for k in opts if k in _RUN_SET_MODEL_OPTIONS]
        if fixed:
            raise ConfigError(f"{source}: [train.model_options.{model}] key(s) {', '.join(fixed)} are set by the "
                              "run (from the features and [train] task); remove them")
        name, preset = split_model_entry(model)
        preset_values = model_info(name)["presets"][preset or "default"]["overrides"]
        try:
            build_config(name, {"in_dim": 8, "n_classes": 2, **preset_values, **opts})
        except ConfigError as exc:
            raise ConfigError(f"{source}: [train.model_options.{model}]: {exc}") from None


def _validate(cls: type[BaseModel], table: dict[str, Any], source: Path, where: str,
              extra_keys: tuple[str, ...] = ()) -> Any:
    return validated(cls, table, f"{source}: invalid pipeline file", table=where,
                     allowed=sorted([*cls.model_fields, *extra_keys]))


def _resolve(p: Path | None, base: Path, what: str) -> Path | None:
    """``p`` (``~`` and ``$VARS`` expanded) made absolute against ``base``; ConfigError naming ``what``."""
    if p is None:
        return None
    p = user_path(os.path.expandvars(str(p)), what)
    try:
        return (p if p.is_absolute() else base / p).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop, a name too long
        raise ConfigError(f"{what}: the path {str(p)!r} cannot be resolved ({exc}); fix it.") from None
