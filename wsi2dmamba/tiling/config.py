"""Parameters of tiling."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..slide.mpp import MAX_PLAUSIBLE_MPP, MIN_PLAUSIBLE_MPP
from ..tissue.config import SegmentConfig


class TileConfig(BaseModel):
    """Square tiles at an exact physical resolution, on one lattice per slide.

    A tile is ``tile_px`` pixels at ``mpp`` µm/px. It is read from the coarsest pyramid level at least
    that fine and shrunk; when a level is within ``mpp_tolerance`` of ``mpp`` it is read there as is
    (the effective mpp, stored in the file, is then that level's). ``segment`` holds the segmentation
    parameters the tissue contours must have been made with; they are part of the parameter hash, so
    that new contours invalidate old tiles. ``segment_missing`` is a runtime field (see
    :mod:`wsi2dmamba.identity`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    tile_px: int = Field(256, ge=8, le=8192, description="Tile side in pixels at the target resolution.")
    mpp: float = Field(0.5, ge=MIN_PLAUSIBLE_MPP, le=MAX_PLAUSIBLE_MPP,
                      description="Target resolution, µm per pixel (0.5 ≈ 20×, 0.25 ≈ 40×).")
    overlap: int = Field(0, ge=0, description="Overlap of neighbouring tiles in target pixels (stride = "
                         "tile_px - overlap).")
    min_tissue: float = Field(0.25, ge=0.0, le=1.0, description="Keep tiles whose tissue fraction is at "
                              "least this (tiles without any tissue are never kept).")
    mpp_tolerance: float = Field(0.02, ge=0.0, le=0.2, description="Relative mpp difference within which a "
                                 "pyramid level is read without resizing.")
    segment: SegmentConfig = Field(default_factory=SegmentConfig, description="Segmentation parameters.")
    segment_missing: bool = Field(False, exclude=True, description="Segment slides that have no contours in "
                                  "the run folder instead of failing them (runtime: not hashed, so rescuing "
                                  "a few slides leaves the others' tiles alone).")

    @model_validator(mode="after")
    def _overlap_below_tile(self) -> TileConfig:
        if self.overlap >= self.tile_px:
            raise ValueError(f"overlap ({self.overlap}) must be smaller than tile_px ({self.tile_px})")
        return self

    @property
    def stride_px(self) -> int:
        return self.tile_px - self.overlap
