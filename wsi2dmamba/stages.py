"""The stages of a run, in order, one entry each: the name, the configuration class and the batch function.

The pipeline file has one table per stage, validated by the stage's configuration class, and the pipeline
runner runs the per-slide stages from this table; a new per-slide stage is one entry here (its module
provides the configuration class and a batch function ``run(cohort, run_dir, config, options)`` returning
a :class:`~wsi2dmamba.cohort.StageSummary`). Classes and functions are named as ``"module:attribute"`` and
imported on first use, so reading the table imports neither torch nor OpenSlide.

>>> [s.name for s in STAGES]
['segment', 'tile', 'extract', 'train', 'evaluate']
>>> [s.name for s in SLIDE_STAGES]
['segment', 'tile', 'extract']
>>> stage("tile").config_class().__name__
'TileConfig'
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def _load(ref: str) -> Any:
    module, attribute = ref.split(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class Stage:
    """One stage of a run.

    Attributes:
        name: the stage's command and the pipeline file's table.
        config: ``"module:Class"`` of its configuration (what its results are, hashed; runtime fields
            marked ``Field(exclude=True)``).
        run: ``"module:function"`` running it over a cohort, ``run(cohort, run_dir, config, options)`` with
            :class:`~wsi2dmamba.cohort.RunOptions`; None for the stages the pipeline runs per model
            (train) or on the whole run (evaluate).
        description: what it does, in a few words.
    """

    name: str
    config: str
    run: str | None
    description: str

    def config_class(self) -> type:
        """The configuration class (imported on first use)."""
        return _load(self.config)

    def runner(self) -> Callable[..., Any]:
        """The batch function of a per-slide stage (imported on first use)."""
        if self.run is None:
            raise ValueError(f"stage {self.name!r} does not run slide by slide")
        return _load(self.run)


STAGES: tuple[Stage, ...] = (
    Stage("segment", "wsi2dmamba.tissue.config:SegmentConfig", "wsi2dmamba.tissue.stage:segment_cohort",
          "tissue contours of every slide"),
    Stage("tile", "wsi2dmamba.tiling:TileConfig", "wsi2dmamba.tiling:tile_cohort",
          "tiles on one lattice at an exact µm/px"),
    Stage("extract", "wsi2dmamba.features:ExtractConfig", "wsi2dmamba.features:extract_cohort",
          "tile features into feature grids"),
    Stage("train", "wsi2dmamba.training.config:TrainConfig", None,
          "k-fold cross-validated models"),
    Stage("evaluate", "wsi2dmamba.pipeline.config:EvaluateConfig", None,
          "metrics with bootstrap intervals, and the report"),
)

#: The stages that run slide by slide, in order.
SLIDE_STAGES: tuple[Stage, ...] = tuple(s for s in STAGES if s.run is not None)


def stage(name: str) -> Stage:
    """The stage called ``name``.

    Raises:
        KeyError: no such stage.
    """
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(f"no stage {name!r}; the stages are {', '.join(s.name for s in STAGES)}")
