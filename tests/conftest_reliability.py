"""Counts of the reliability suite (faults injected, inputs tried, files checked), printed after the run.

Loaded by the reliability test modules through ``pytest_plugins``; a test adds to the counters through
the ``counts`` fixture: ``counts("faults")``, ``counts("inputs", 50)``, ``counts("files", k)``.
"""

from __future__ import annotations

from collections import Counter

import pytest

COUNTS: Counter = Counter()


def count(kind: str, n: int = 1) -> None:
    """Add ``n`` to one of the counters: ``"faults"``, ``"inputs"`` or ``"files"``."""
    COUNTS[kind] += n


@pytest.fixture(scope="session")
def counts():
    """The :func:`count` function, to add to the suite's counters."""
    return count


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not COUNTS:
        return
    terminalreporter.write_sep("-", "reliability")
    terminalreporter.write_line(f"faults injected: {COUNTS['faults']}, inputs tried: {COUNTS['inputs']}, "
                                f"files checked: {COUNTS['files']}")
