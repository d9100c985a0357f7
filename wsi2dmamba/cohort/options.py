"""How a stage is run, as one value: processes, executor, shard, redo, progress bars.

None of these settings changes what a stage makes, so none of them enters a parameter hash; a stage's
configuration class holds what the result *is*. Every batch function of the library (``segment_cohort``,
``tile_cohort``, ``extract_cohort``, ``train_cohort``, ``run_pipeline`` …) takes a :class:`RunOptions`
as ``options``, or the same settings as keywords:

>>> from wsi2dmamba.cohort import RunOptions
>>> options = RunOptions(workers=4, progress=False)
>>> RunOptions.of(options, force=True)
RunOptions(workers=4, executor='local', ray_address=None, shard=None, force=True, progress=False)
>>> RunOptions(executor="slurm")
Traceback (most recent call last):
...
wsi2dmamba.errors.ConfigError: Unknown executor 'slurm'; use one of: local, ray.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .executors import EXECUTORS, ExecutorName


@dataclass(frozen=True)
class RunOptions:
    """How a stage runs.

    Attributes:
        workers: worker processes of the local executor for the per-slide stages (1: this process).
        executor: ``"local"`` (this process, worker processes, one process per GPU) or ``"ray"`` (one Ray
            task per slide or fold; see :mod:`wsi2dmamba.cohort.executors`).
        ray_address: the Ray cluster for ``executor="ray"`` (None: start a local one).
        shard: ``(i, N)``: only the slides of shard i of N (see :func:`~wsi2dmamba.cohort.run_stage`).
        force: redo slides and folds that are already done.
        progress: show progress bars.
    """

    workers: int = 1
    executor: ExecutorName = "local"
    ray_address: str | None = None
    shard: tuple[int, int] | None = None
    force: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise ConfigError(f"Unknown executor {self.executor!r}; use one of: {', '.join(EXECUTORS)}.")
        if self.shard is not None:
            i, n = self.shard
            if n < 1 or not 0 <= i < n:
                raise ConfigError(f"shard {i}/{n}: need 0 ≤ i < N and N ≥ 1")

    @classmethod
    def of(cls, options: RunOptions | None = None, /, **settings: Any) -> RunOptions:
        """``options`` (default: the defaults) with the settings given as keywords replaced.

        Raises:
            TypeError: a keyword that is not a field of :class:`RunOptions`.
        """
        unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unexpected keyword argument(s): {', '.join(unknown)} (run options are "
                            f"{', '.join(f.name for f in dataclasses.fields(cls))})")
        return dataclasses.replace(options or cls(), **settings)
