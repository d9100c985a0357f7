"""Attention heatmaps of trained models on slides: PNG overlays, figures, tile montages and QuPath GeoJSON.

>>> from wsi2dmamba.heatmaps import heatmap, heatmap_cohort
>>> heatmap("runs/x", "abmil", "slide_42")      # runs/x/heatmaps/abmil/slide_42.png and .geojson  # doctest: +SKIP
>>> heatmap_cohort("runs/x", "abmil")           # every test slide, each by the fold that did not train on it  # doctest: +SKIP

:mod:`.attention` reads a model's attention on one slide's grid, :mod:`.figures` draws per-tile scores,
:mod:`.batch` runs many slides and resumes.
"""

from .attention import HeatmapResult, heatmap
from .batch import heatmap_cohort
from .figures import HeatmapStyle

__all__ = ["HeatmapResult", "HeatmapStyle", "heatmap", "heatmap_cohort"]
