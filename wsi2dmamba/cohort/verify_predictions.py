"""What ``wsi2dmamba verify`` checks in a folder of predictions (beyond the per-slide states it checks
for every stage): each model's tables agree with its per-slide prediction files and with the bundle
recorded in ``predict.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .. import run_layout as layout


def _slide_problems(run: Path, p: Path, rel: str, value: str, in_table: float,
                    bundle_sha: str | None) -> list[tuple[str, str]]:
    """A slide's row of the table against its prediction file."""
    sid = p.stem
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        recorded = float(data["risk"] if value == "risk" else data["probs"][0])
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return [(rel, f"slide {sid} has no readable prediction file {p.name}; rerun `wsi2dmamba predict`")]
    problems = []
    if data.get("bundle_sha256") != bundle_sha:
        problems.append((layout.relative(run, p),
                         "made with another bundle than predict.json records; rerun `wsi2dmamba predict --force`"))
    if not np.isclose(in_table, recorded, rtol=1e-6, atol=1e-9):
        problems.append((rel, (f"slide {sid}: {value} {in_table} in the table, {recorded} in its prediction file; "
                         "the table was edited. Rerun `wsi2dmamba predict` to rebuild it")))
    return problems


def _table_problems(run: Path, name: str, entry: dict[str, Any]) -> list[tuple[str, str]]:
    import pandas as pd

    slides_csv, patients_csv = layout.prediction_tables(run, name)
    rel = layout.relative(run, slides_csv)
    if not slides_csv.is_file() or not patients_csv.is_file():
        return [(rel, "the prediction tables are missing; rerun `wsi2dmamba predict` (it rebuilds them)")]
    try:
        slides = pd.read_csv(slides_csv, dtype={"slide_id": str, "patient_id": str})
        patients = pd.read_csv(patients_csv, dtype={"patient_id": str})
    except (OSError, ValueError) as exc:
        return [(rel, f"cannot be read ({exc}); rerun `wsi2dmamba predict`")]
    value = "risk" if "risk" in slides.columns else "prob_0"
    problems = []
    for sid, v in zip(slides["slide_id"], slides[value]):
        problems += _slide_problems(run, layout.prediction_file(run, name, sid), rel, value, float(v),
                                    entry.get("bundle_sha256"))
    means = slides.groupby("patient_id", sort=True)[value].mean()
    merged = patients.set_index("patient_id")[value].reindex(means.index)
    if len(patients) != len(means) or not np.allclose(merged.to_numpy(), means.to_numpy(), rtol=1e-6, atol=1e-9):
        problems.append((layout.relative(run, patients_csv), ("does not agree with the slide table (a patient's value "
                         "is the mean of its slides'); rerun `wsi2dmamba predict` to rebuild it")))
    return problems


def check_predictions(run: Path, add) -> int:
    """Check every model of ``RUN/predict.json``; ``add(level, path, message)`` records a finding.

    Returns the number of models checked (0 when ``run`` is not a folder of predictions).
    """
    path = layout.predict_record(run)
    if not path.is_file():
        return 0
    try:
        models = json.loads(path.read_text(encoding="utf-8"))["models"]
        items = sorted(models.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        add("error", layout.PREDICT_RECORD, f"cannot be read ({exc}); rerun `wsi2dmamba predict`")
        return 0
    for name, entry in items:
        for rel, message in _table_problems(run, name, entry if isinstance(entry, dict) else {}):
            add("error", rel, message)
    return len(items)
