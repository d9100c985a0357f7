"""The segment parameters a later stage reads: recorded only by the run holding the stage's lock, and
taken from the finished slides when the recorded ones made none of them."""

from __future__ import annotations

import json

import pytest
from filelock import FileLock

from wsi2dmamba.cohort import Cohort
from wsi2dmamba.errors import WsiError
from wsi2dmamba.tiling import tile_cohort
from wsi2dmamba.tissue import SegmentConfig, read_segment_config, segment_cohort


@pytest.fixture
def segmented(tmp_path, cmu_slide):
    """A run folder whose one slide was segmented with ``close_um=48``."""
    cohort = Cohort.from_paths([cmu_slide])
    assert segment_cohort(cohort, tmp_path, SegmentConfig(close_um=48), progress=False).ok
    return cohort, tmp_path


def test_a_run_refused_by_the_lock_leaves_the_recorded_parameters(segmented):
    cohort, run = segmented
    config_file = run / "segment" / "config.json"
    before = config_file.read_bytes()
    other = FileLock(str(run / "segment" / ".lock"))  # another run of the stage, still going
    other.acquire(timeout=0)
    try:
        with pytest.raises(WsiError, match="Another process is running"):
            segment_cohort(cohort, run, SegmentConfig(close_um=64), progress=False)
    finally:
        other.release()
    assert config_file.read_bytes() == before
    assert read_segment_config(run) == SegmentConfig(close_um=48)
    assert tile_cohort(cohort, run, progress=False).done == ["CMU-1-Small-Region"]


def test_parameters_that_made_no_finished_slide_give_way_to_those_that_did(segmented):
    cohort, run = segmented
    config_file = run / "segment" / "config.json"
    # As left by a run with other parameters that was stopped before it finished a slide.
    config_file.write_text(json.dumps(SegmentConfig(close_um=64).model_dump(mode="json")))
    assert read_segment_config(run) == SegmentConfig(close_um=48)
    config_file.unlink()
    assert read_segment_config(run) == SegmentConfig(close_um=48)
    assert tile_cohort(cohort, run, progress=False).done == ["CMU-1-Small-Region"]


def test_recorded_parameters_are_kept_when_a_finished_slide_was_made_with_them(segmented):
    cohort, run = segmented
    assert segment_cohort(cohort, run, SegmentConfig(close_um=64), progress=False).done == ["CMU-1-Small-Region"]
    assert json.loads((run / "segment" / "config.json").read_text())["close_um"] == 64
    assert read_segment_config(run) == SegmentConfig(close_um=64)


def test_no_segmentation_no_parameters(tmp_path):
    assert read_segment_config(tmp_path) is None
