"""The physical resolution of a slide (µm per level-0 pixel).

Order of trust: a value the user gives (the manifest's ``mpp`` column), then the vendor metadata that
OpenSlide exposes (``openslide.mpp-x/y``), then the TIFF resolution tags. The objective power is never
turned into a resolution silently: it only appears in the error message as a hint.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import SlideError

# µm per resolution unit of the TIFF ResolutionUnit tag (2 = inch, 3 = centimetre).
_UM_PER_UNIT = {"inch": 25400.0, "centimeter": 10000.0, "centimetre": 10000.0, "2": 25400.0, "3": 10000.0}

# The µm per pixel a slide (or a tile, or a segmentation image) can plausibly have. Finer than 0.01 µm/px
# is beyond any light microscope (about 0.1 µm/px at 100×, diffraction-limited near 0.2 µm); coarser than
# 100 µm/px is not a microscope scan (72 or 96 dpi, the screen defaults, are 353 and 265 µm/px).
MIN_PLAUSIBLE_MPP = 0.01
MAX_PLAUSIBLE_MPP = 100.0


def mpp_problem(value: object) -> str | None:
    """Why ``value`` cannot be a resolution in µm per pixel, or None when it is plausible.

    Accepted: a finite number in [``MIN_PLAUSIBLE_MPP``, ``MAX_PLAUSIBLE_MPP``] (0.01–100 µm/px).

    >>> mpp_problem(0.5) is None
    True
    >>> mpp_problem("abc")
    "'abc' is not a number"
    """
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return f"{value!r} is not a number"
    if not math.isfinite(v):
        return f"{value!r} is not a finite number"
    if v <= 0:
        return f"{value!r} is not a positive number"
    if not MIN_PLAUSIBLE_MPP <= v <= MAX_PLAUSIBLE_MPP:
        return (f"{v:g} µm/px is outside the plausible range {MIN_PLAUSIBLE_MPP:g}–{MAX_PLAUSIBLE_MPP:g} µm/px "
                "(0.25 ≈ 40×, 0.5 ≈ 20×)")
    return None


@dataclass(frozen=True)
class Resolution:
    """µm per level-0 pixel and where that figure came from (``override``, ``metadata``, ``tiff-tags``)."""

    mpp: float
    source: str


def _positive(value: object) -> float | None:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def mpp_from_properties(props: Mapping[str, str]) -> Resolution | None:
    """µm/px from OpenSlide properties: ``openslide.mpp-x/y``, else ``tiff.X/YResolution`` + unit."""
    mx, my = _positive(props.get("openslide.mpp-x")), _positive(props.get("openslide.mpp-y"))
    if mx or my:
        return Resolution(_mean(mx, my), "metadata")
    return mpp_from_tiff_resolution(props.get("tiff.XResolution"), props.get("tiff.YResolution"),
                                    props.get("tiff.ResolutionUnit"))


def mpp_from_tiff_resolution(xres: object, yres: object, unit: object) -> Resolution | None:
    """µm/px from TIFF X/YResolution (pixels per unit) and ResolutionUnit; None when absent or implausible.

    A missing or "none" unit carries no physical meaning, so it gives None.
    """
    per_unit = _UM_PER_UNIT.get(str(unit).strip().lower()) if unit is not None else None
    rx, ry = _positive(xres), _positive(yres)
    if per_unit is None or not (rx or ry):
        return None
    mx = per_unit / rx if rx else None
    my = per_unit / ry if ry else None
    mpp = _mean(mx, my)
    return Resolution(mpp, "tiff-tags") if mpp <= MAX_PLAUSIBLE_MPP else None


def _mean(a: float | None, b: float | None) -> float:
    vals = [v for v in (a, b) if v]
    return sum(vals) / len(vals)


def resolve_mpp(override: float | None, found: Resolution | None, *, path: str,
                objective_power: str | None = None) -> Resolution:
    """The resolution to use, or a :class:`SlideError` that says how to supply one."""
    if override is not None:
        problem = mpp_problem(override)
        if problem:
            raise SlideError(f"{path}: the given mpp (µm per level-0 pixel): {problem}. Fix the manifest's 'mpp' "
                             "cell or --slide-mpp.")
        return Resolution(float(override), "override")
    if found is not None:
        problem = mpp_problem(found.mpp)
        if problem:
            raise SlideError(f"{path}: the resolution in the slide's {found.source} is implausible: {problem}. "
                             "Give the right one in the cohort manifest's 'mpp' column (µm per level-0 pixel).")
        return found
    hint = ""
    power = _positive(objective_power)
    if power:
        hint = (f" The file states an objective power of {power:g}×; scanners commonly give about "
                f"{10.0 / power:.3g} µm/px at that power, but check with the scanner's documentation.")
    raise SlideError(
        f"{path}: the slide's resolution (µm per pixel) is not in its metadata nor in its TIFF tags.{hint} "
        "Give it in the cohort manifest's 'mpp' column (µm per level-0 pixel), or with --slide-mpp for slide files given on the command line."
    )
