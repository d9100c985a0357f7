"""Pen-mark (ink) detection on H&E images by hue.

H&E stains live in a narrow band of hues: haematoxylin is blue-purple (about 250–290°) and eosin pink
to magenta (about 300–348°). Marker inks that pathologists use sit outside that band: red ink near 0°,
green and teal ink at 80–190°, blue ink at 190–245°. A pixel is ink when its hue is in an ink band and
it is clearly coloured (saturation ≥ 0.3) and not dark.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

# Hue bands in degrees (start, end), end exclusive; red wraps around 0°.
PEN_HUE_BANDS: dict[str, tuple[tuple[float, float], ...]] = {
    "red": ((350.0, 360.0), (0.0, 20.0)),
    "green": ((80.0, 190.0),),
    "blue": ((190.0, 245.0),),
}
MIN_SATURATION = 0.3   # (max - min) / max of the RGB channels
MIN_VALUE = 0.25       # max of the RGB channels, in [0, 1]


def pen_mask(rgb: np.ndarray, colors: Iterable[str] = ("red", "green", "blue")) -> np.ndarray:
    """Pixels that look like marker ink.

    Args:
        rgb: (H, W, 3) uint8 RGB.
        colors: ink colours to find, among ``red``, ``green``, ``blue``.

    Returns:
        (H, W) bool.
    """
    import cv2

    colors = tuple(colors)
    unknown = [c for c in colors if c not in PEN_HUE_BANDS]
    if unknown:
        raise ValueError(f"unknown pen colour(s) {unknown}; choose from {sorted(PEN_HUE_BANDS)}")
    out = np.zeros(rgb.shape[:2], dtype=bool)
    if not colors or rgb.size == 0:
        return out
    hsv = cv2.cvtColor(rgb.astype(np.float32) * (1.0 / 255.0), cv2.COLOR_RGB2HSV)  # H in degrees
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    coloured = (sat >= MIN_SATURATION) & (val >= MIN_VALUE)
    for c in colors:
        for lo, hi in PEN_HUE_BANDS[c]:
            out |= coloured & (hue >= lo) & (hue < hi)
    return out
