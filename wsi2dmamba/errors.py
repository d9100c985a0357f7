"""User-facing errors.

Every error a user can cause (a bad manifest, an unreadable slide, a missing weight file) is raised as a
:class:`WsiError` whose message names the file, the row or key, and what to do. The CLI prints the
message alone, without a traceback; batch stages record it in the ledger and go on with the next slide.
"""

from __future__ import annotations


class WsiError(Exception):
    """Base class of every error caused by input, configuration or environment (not by a bug)."""


class ConfigError(WsiError):
    """An option, a configuration key or a pipeline file is invalid."""


class ManifestError(WsiError):
    """A cohort manifest (CSV) is malformed: missing column, duplicate id, bad value, missing file."""


class SlideError(WsiError):
    """A slide cannot be opened or read, or lacks what a stage needs (e.g. its resolution)."""


class GridFileError(WsiError):
    """An HDF5 tiles or feature grid file is missing, incomplete or inconsistent."""


class EmptyFeatureFile(GridFileError):
    """A feature file without tiles (TRIDENT writes ``features`` of shape (0,) for a slide without tissue)."""


class StageInputError(WsiError):
    """A stage's input from an earlier stage is missing or was made with other parameters."""


class WeightsError(WsiError):
    """An encoder's weight file is missing or does not match the encoder."""


class TrainingError(WsiError):
    """Training cannot go on (e.g. the loss became NaN or inf)."""
