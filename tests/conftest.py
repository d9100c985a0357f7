"""Shared fixtures: the real slides the tests run on."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "tests" / "data"
CMU_SLIDE = TEST_DATA / "CMU-1-Small-Region.svs"
# The shared data set lives beside the checkout in CI; a fresh clone does not have it.
SHARED_DATA = Path(__file__).parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def cmu_slide() -> Path:
    """CMU-1-Small-Region.svs (CC0): Aperio SVS, 2220×2967 px at 0.499 µm/px, H&E skin."""
    if not CMU_SLIDE.is_file():
        pytest.fail(f"{CMU_SLIDE} is missing; it is part of the repository (see tests/data/README.md)")
    return CMU_SLIDE


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-data folder (slides, pen-mark images, tiles); skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (only present in CI and the team's checkout)")
    return SHARED_DATA
