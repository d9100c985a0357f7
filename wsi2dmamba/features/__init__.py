"""Tile features: the encoder registry, extraction into feature grid files, and import of CLAM/TRIDENT files.

    from wsi2dmamba.features import ExtractConfig, extract_cohort, get_encoder, list_encoders
"""

from .encoders import EncoderSpec, describe_encoders, get_encoder, list_encoders
from .extract import (
    ExtractConfig,
    LoadedEncoder,
    extract_cohort,
    extract_features,
    feature_path,
    load_encoder,
)
from .preprocess import Preprocess

__all__ = [
    "EncoderSpec",
    "ExtractConfig",
    "LoadedEncoder",
    "Preprocess",
    "describe_encoders",
    "extract_cohort",
    "extract_features",
    "feature_path",
    "get_encoder",
    "list_encoders",
    "load_encoder",
]
