"""Cohorts (manifests), per-slide state, the ledger, and running a stage over a whole cohort."""

from .batch import StageSummary, config_hash, run_stage
from .ledger import SlideState, collect_states, read_state, write_ledger
from .manifest import Cohort, SlideRecord, load_cohort
from .options import RunOptions

__all__ = [
    "Cohort",
    "RunOptions",
    "SlideRecord",
    "SlideState",
    "StageSummary",
    "collect_states",
    "config_hash",
    "load_cohort",
    "read_state",
    "run_stage",
    "write_ledger",
]
