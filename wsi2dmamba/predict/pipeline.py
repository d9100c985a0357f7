"""The ``[predict]`` table of a pipeline file: train on one cohort, validate on another, in one run.

::

    [predict]
    manifest = "../cohorts/external.csv"  # the other cohort (relative to the TOML file's folder)
    slides_dir = "/data/external"         # optional, as in [cohort]
    out = "external"                      # run folder of the predictions, below the training folder
    models = ["2dmambamil", "abmil"]      # default: every model of [train]
    heatmaps = false                      # attention heatmaps of every slide
    mpp_tolerance = 0.05                  # relative µm/px difference refused (with imported features)

With a ``[demo]`` table, ``demo_seed`` (and ``demo_slides``) build a second demo cohort instead of a
manifest. After the report of the training cohort, each model is exported to
``<train folder>/bundles/<model>`` and applied to the other cohort; its evaluation and report go to
``<train folder>/<out>/eval`` and ``/report``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .. import run_layout as layout
from ..errors import ConfigError


class PredictSection(BaseModel):
    """``[predict]``: the cohort the trained models are applied to, and how."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    manifest: Path | None = Field(None, description="Manifest of the other cohort (slide_id, path, labels "
                                                       "or survival when known).")
    slides_dir: Path | None = Field(None, description="Folder searched for slides whose 'path' is empty.")
    demo_seed: int | None = Field(None, description="With [demo]: seed of a second demo cohort (not [demo]'s).")
    demo_slides: int = Field(48, ge=4, description="With [demo]: slides of the second demo cohort.")
    out: str = Field("external", description="Folder of the predictions, below the training folder.")
    models: list[str] | None = Field(None, description="Models to apply (default: every model of [train]).")
    heatmaps: bool = Field(False, description="Write each slide's attention heatmap (PNG + GeoJSON).")
    mpp_tolerance: float = Field(0.05, gt=0, description="Relative µm/px difference that is refused.")


def _check_other_cohort(section: PredictSection, source: Path, demo: Any) -> None:
    if section.manifest is not None:
        return
    if demo is None or section.demo_seed is None:
        hint = " or, with [demo], demo_seed = N (a seed other than [demo]'s)" if demo is not None else ""
        raise ConfigError(f"{source}: [predict] needs manifest = \"other_cohort.csv\"{hint}")
    if section.demo_seed == demo.seed:
        raise ConfigError(f"{source}: [predict] demo_seed = {section.demo_seed} is [demo]'s seed: the same slides "
                          "again, not another cohort; choose another seed")


def check_predict_section(section: PredictSection, source: Path, *, models: tuple[str, ...],
                          demo: Any) -> PredictSection:
    """Cross-table rules of ``[predict]``; relative paths resolved against the file's folder."""
    _check_other_cohort(section, source, demo)
    unknown = [m for m in section.models or [] if m not in models]
    if unknown:
        raise ConfigError(f"{source}: [predict] models {unknown} are not in [train] models {list(models)}")
    if not section.out or any(c in section.out for c in "/\\\0") or section.out in (".", "..", "train"):
        raise ConfigError(f"{source}: [predict] out must be a plain folder name, got {section.out!r}")

    def resolve(p: Path | None) -> Path | None:
        return None if p is None else (source.parent / p.expanduser()).resolve()

    return section.model_copy(update={"manifest": resolve(section.manifest), "slides_dir": resolve(section.slides_dir)})


def run_predict_step(config: Any, train_dir: Path, *, force: bool, progress: bool,
                     say: Callable[[str], None]) -> dict[str, Any]:
    """Export every model of the pipeline's ``[predict]`` table, apply it to the other cohort, evaluate
    and report; returns the external metrics (``evaluate_external``)."""
    from ..cohort import load_cohort
    from ..models.registry import model_folder
    from .apply import predict_cohort
    from .export import export_bundle
    from ..evaluation.external import evaluate_external, write_external_report

    section: PredictSection = config.predict
    out = train_dir / section.out
    if section.manifest is not None:
        cohort = load_cohort(section.manifest, slides_dir=section.slides_dir)
    else:
        from dataclasses import replace

        from ..demo import build_demo_cohort

        spec = replace(config.demo.spec(), n_slides=section.demo_slides, seed=section.demo_seed)
        cohort = load_cohort(build_demo_cohort(layout.cohort_dir(out), spec, progress=progress))
    device = config.option("extract").device
    for entry in section.models or config.models:
        name = model_folder(entry)
        bundle = export_bundle(train_dir, name)
        res = predict_cohort(bundle, cohort, out, heatmaps=section.heatmaps, device=device,
                             workers=config.run.workers, mpp_tolerance=section.mpp_tolerance, force=force,
                             progress=progress)
        for note in res.notes:
            say(f"predict {name}: {note}")
        say(f"predict {name}: {len(res.stages['predict'].done)} slide(s) predicted, "
            f"{len(res.stages['predict'].skipped)} already done, {len(res.failed)} failed → {res.slides_csv}")
    ev = config.option("evaluate")
    metrics = evaluate_external(out, n_boot=ev.n_boot, seed=ev.seed)
    write_external_report(out, n_boot=ev.n_boot, seed=ev.seed, metrics=metrics)
    return metrics
