"""Apply trained models to new slides: model bundles, ``predict``, external validation.

>>> from wsi2dmamba.predict import export_bundle, load_bundle, predict_cohort
>>> path = export_bundle("runs/demo/classification", "2dmambamil")     # RUN/bundles/2dmambamil  # doctest: +SKIP
>>> bundle = load_bundle(path)                                         # validated; nothing unpickled  # doctest: +SKIP
>>> out = bundle.predict(grid)                                         # probabilities or risk + attention  # doctest: +SKIP
>>> predict_cohort(bundle, cohort, "runs/external")                    # raw slides → predictions/<model>.csv  # doctest: +SKIP

The bundle format is specified in ``docs/bundles.md``.
"""

from .apply import PredictResult, predict_cohort
from .bundle import (
    FORMAT_NAME,
    FORMAT_VERSION,
    Bundle,
    BundleManifest,
    SlidePrediction,
    load_bundle,
    read_manifest,
    validate,
)
from .export import export_bundle

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "Bundle",
    "BundleManifest",
    "PredictResult",
    "SlidePrediction",
    "export_bundle",
    "load_bundle",
    "predict_cohort",
    "read_manifest",
    "validate",
]
