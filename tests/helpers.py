"""Small helpers shared by several test files: process groups, cohort manifests, the headless browser."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest


def sigkill_group(proc: subprocess.Popen) -> bool:
    """SIGKILL ``proc``'s process group and reap it; whether it was still running."""
    alive = proc.poll() is None
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    return alive


def write_cohort(folder: Path, rows: list[tuple[str, Path]]) -> Path:
    """A manifest ``folder/cohort.csv`` with the columns ``slide_id, path``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cohort.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "path"])
        w.writerows([(sid, str(p)) for sid, p in rows])
    return path


def chromium() -> str:
    """Path of a headless-capable Chromium; fails in CI (which installs it), skips elsewhere."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("Chromium is not installed; the CI set-up (.ci/run) installs Debian's chromium")
    pytest.skip("Chromium not installed (apt-get install chromium)")
