"""Parameters of classical tissue segmentation (all areas and lengths in physical units)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..slide.mpp import MAX_PLAUSIBLE_MPP, MIN_PLAUSIBLE_MPP

PenColor = Literal["red", "green", "blue"]


class SegmentConfig(BaseModel):
    """How tissue is told apart from glass on a low-resolution image of the slide.

    The slide is read at ``seg_mpp`` µm/px (from the nearest finer pyramid level, shrunk by area
    averaging). A pixel is tissue when its median-blurred HSV saturation is above the threshold and it
    is not near-black. Small holes are filled, small pieces dropped, and the rest closed morphologically.
    Every size is physical, so the same parameters behave alike on 20× and 40× scans.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    seg_mpp: float = Field(8.0, ge=MIN_PLAUSIBLE_MPP, le=MAX_PLAUSIBLE_MPP,
                           description="µm per pixel of the image segmented (8 ≈ 32× at 0.25 µm/px).")
    threshold: Literal["fixed", "otsu"] = Field(
        "fixed", description="'fixed': saturation > saturation_threshold. 'otsu': Otsu's threshold of the "
        "slide's saturation histogram, never below saturation_threshold (for slides with tinted glass).")
    saturation_threshold: int = Field(20, ge=0, le=255, description="HSV saturation (0–255) above which a "
                                      "pixel is tissue.")
    min_value: int = Field(20, ge=0, le=255, description="Pixels darker than this HSV value (0–255) are not "
                           "tissue: black scanner borders and the dark background of fluorescence scans.")
    median_um: float = Field(40.0, ge=0, description="Median blur window (µm) applied before thresholding.")
    close_um: float = Field(32.0, ge=0, description="Morphological closing window (µm): bridges small gaps.")
    min_tissue_area_um2: float = Field(20_000.0, ge=0, description="Pieces of tissue smaller than this (µm², "
                                       "holes not counted) are dropped. 20,000 µm² ≈ a 141 µm square.")
    min_hole_area_um2: float = Field(10_000.0, ge=0, description="Holes smaller than this (µm²) are filled; "
                                     "larger ones (fat, lumens, tears) are kept as holes.")
    remove_pen: bool = Field(False, description="Remove pen marks of the colours in pen_colors.")
    pen_colors: tuple[PenColor, ...] = Field(("red", "green", "blue"), description="Ink colours to remove.")
    pen_margin_um: float = Field(48.0, ge=0, description="Pen marks are grown by this margin (µm) to cover "
                                 "their faint edges.")
