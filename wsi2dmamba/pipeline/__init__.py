"""The whole chain from one pipeline file: ``wsi2dmamba run PIPELINE.toml``.

>>> from wsi2dmamba.pipeline import load_pipeline, run_pipeline
>>> result = run_pipeline(load_pipeline("pipelines/demo.toml"))  # doctest: +SKIP
>>> result.report                      # RUN/report/index.html  # doctest: +SKIP
"""

from .config import EvaluateConfig, PipelineConfig, load_pipeline, pipeline_from_dict
from .runner import PipelineResult, run_pipeline

__all__ = ["EvaluateConfig", "PipelineConfig", "PipelineResult", "load_pipeline", "pipeline_from_dict",
           "run_pipeline"]
