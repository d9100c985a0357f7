"""The stage table and the run options: a stage is one entry, and how it runs is one value."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from wsi2dmamba.cohort import Cohort, RunOptions, run_stage
from wsi2dmamba.errors import ConfigError
from wsi2dmamba.pipeline.config import STAGES, stage_config_class
from wsi2dmamba.stages import SLIDE_STAGES, STAGES as TABLE, stage


def test_the_pipeline_file_has_one_table_per_stage_entry():
    assert STAGES == tuple(s.name for s in TABLE)
    for s in TABLE:
        assert stage_config_class(s.name) is s.config_class()
        assert s.config_class().model_config.get("frozen"), s.name  # a configuration is a frozen value
    with pytest.raises(KeyError, match="no stage 'bogus'"):
        stage("bogus")
    with pytest.raises(ValueError, match="slide by slide"):
        stage("train").runner()


@pytest.mark.parametrize("entry", SLIDE_STAGES, ids=lambda s: s.name)
def test_every_slide_stage_runs_from_its_entry_alone(entry):
    params = list(inspect.signature(entry.runner()).parameters.values())
    assert [p.name for p in params[:4]] == ["cohort", "run_dir", "config", "options"]


def _batch_functions():
    from wsi2dmamba.features import extract_cohort
    from wsi2dmamba.pipeline import run_pipeline
    from wsi2dmamba.pipeline.demo import run_demo
    from wsi2dmamba.tiling import tile_cohort
    from wsi2dmamba.tissue.stage import segment_cohort
    from wsi2dmamba.training.loop import train_cohort

    return [run_stage, segment_cohort, tile_cohort, extract_cohort, train_cohort, run_pipeline, run_demo]


def test_how_a_batch_runs_is_one_value_not_a_parameter_list():
    for fn in _batch_functions():
        params = inspect.signature(fn).parameters
        assert "options" in params, fn.__name__
        assert not {"executor", "ray_address", "shard", "force", "progress"} & set(params), fn.__name__


def test_run_options_are_checked_once_when_made():
    assert RunOptions.of(RunOptions(workers=3), force=True) == RunOptions(workers=3, force=True)
    with pytest.raises(ConfigError, match="Unknown executor 'dask'"):
        RunOptions(executor="dask")
    with pytest.raises(ConfigError, match="shard 2/2"):
        RunOptions(shard=(2, 2))
    with pytest.raises(TypeError, match="workerz"):
        RunOptions.of(None, workerz=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        RunOptions().force = True  # type: ignore[misc]


def test_options_as_one_value_or_as_keywords_run_the_same(tmp_path, cmu_slide):
    from wsi2dmamba.tissue.stage import segment_cohort

    cohort = Cohort.from_paths([cmu_slide])
    first = segment_cohort(cohort, tmp_path, None, RunOptions(progress=False))
    assert first.done == cohort.slide_ids and first.failed == {}
    again = segment_cohort(cohort, tmp_path, None, RunOptions(progress=False))
    assert again.done == [] and len(again.skipped) == 1
    forced = segment_cohort(cohort, tmp_path, progress=False, force=True)  # the keyword form
    assert len(forced.done) == 1 and forced.skipped == []
