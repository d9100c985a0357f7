"""Run the demo: build the mosaic cohort, then the classification and the survival pipelines on it.

>>> from wsi2dmamba.pipeline.demo import run_demo
>>> results = run_demo("runs/demo")               # [classification result, survival result]  # doctest: +SKIP
>>> [r.report for r in results]                     # runs/demo/{classification,survival}/report/index.html  # doctest: +SKIP

The two pipelines are shipped with the package (``demo_pipeline_path``; the same files as
``pipelines/demo.toml`` and ``pipelines/demo-survival.toml`` in the repository). They share one run
folder, so the slides are segmented, tiled and encoded once; each task trains, evaluates and reports
in its own sub-folder.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

from ..cohort.options import RunOptions

DEMO_TASKS = ("classification", "survival")
_FILES = {"classification": "demo.toml", "survival": "demo-survival.toml"}

# A smaller run for continuous integration: fewer slides and folds, the 2D model against the
# composition-only baselines, on the contact rule (6 × 6 cells), which a 2D model learns from 48 training
# slides; the long-range rule of the full demo needs the full cohort (docs/demo.md).
QUICK_OVERRIDES: dict[str, dict[str, Any]] = {
    "demo": {"slides": 64, "rule": "contact"},
    "train": {"folds": 4, "models": ["2dmambamil", "abmil", "meanpool"]},
    "evaluate": {"n_boot": 500},
    "predict": {"demo_slides": 128},
}


def demo_pipeline_path(task: str = "classification") -> Path:
    """The packaged demo pipeline file of ``task`` (``classification`` or ``survival``)."""
    if task not in _FILES:
        raise ValueError(f"task must be one of {DEMO_TASKS}, got {task!r}")
    return Path(str(resources.files("wsi2dmamba.demo") / "assets" / "pipelines" / _FILES[task]))


def demo_pipelines(out: str | os.PathLike[str] | None = None, *, quick: bool = False,
                   tasks: tuple[str, ...] = DEMO_TASKS, slides: int | None = None, epochs: int | None = None,
                   folds: int | None = None, workers: int | None = None):
    """The validated demo pipelines, with the given overrides applied (``None`` keeps the file's value)."""
    import tomllib

    from .config import pipeline_from_dict

    configs = []
    for task in tasks:
        path = demo_pipeline_path(task)
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        overrides: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (QUICK_OVERRIDES if quick else {}).items()}
        if task == "survival" and quick:
            # The survival run of the quick demo only checks that the survival path produces a report.
            overrides["train"].update(models=["meanpool"], epochs=10)
        for table, key, value in (("demo", "slides", slides), ("train", "epochs", epochs),
                                  ("train", "folds", folds), ("run", "workers", workers)):
            if value is not None:
                overrides.setdefault(table, {})[key] = value
        for table, values in overrides.items():
            if table in data or table != "predict":  # only a pipeline with [predict] validates elsewhere
                data.setdefault(table, {}).update(values)
        models = data["train"]["models"]
        data["train"]["model_options"] = {m: o for m, o in data["train"].get("model_options", {}).items()
                                          if m in models}
        configs.append(pipeline_from_dict(data, path, out=Path(out or "runs/demo")))
    return configs


def run_demo(out: str | os.PathLike[str] | None = None, *, quick: bool = False,
             tasks: tuple[str, ...] = DEMO_TASKS, slides: int | None = None, epochs: int | None = None,
             folds: int | None = None, workers: int | None = None, options: RunOptions | None = None,
             **settings: Any):
    """Build the demo cohort in ``out/cohort`` and run its pipelines; returns their results.

    ``workers`` sets the pipelines' ``[run] workers``; ``options`` (or its fields as keywords: ``force``,
    ``progress``, ``executor``, ``ray_address``) say how they run (see :func:`run_pipeline`)."""
    from .runner import run_pipeline

    options = RunOptions.of(options, **settings)
    configs = demo_pipelines(out, quick=quick, tasks=tasks, slides=slides, epochs=epochs, folds=folds,
                             workers=workers)
    return [run_pipeline(c, options) for c in configs]
