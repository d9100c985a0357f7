"""A log file per command run on a run folder: what ran, with which versions, what it warned about, how it
ended. Written to ``RUN/logs/<UTC time>-<command>-<pid>.log``, beside the run's ``ledger.csv``.

The log keeps the command line, the versions of Python and of the libraries that shape results, Python
warnings, every line the command wrote to stderr (warnings, notes, failures; progress bars left out) and
the exit status. It is written once the command ends, however it ends.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path

#: Libraries whose versions are recorded (those present).
LIBRARIES = ("wsi2dmamba", "numpy", "torch", "h5py", "openslide-python", "openslide-bin", "tifffile", "pydantic",
             "typer", "scikit-learn", "scikit-survival", "timm", "shapely", "cupy-cuda12x", "cupy-cuda13x")

#: Commands whose ``--out`` is not a run folder (nothing is logged for them).
NOT_ON_A_RUN = ("export-features", "encoders", "models", "doctor")


def versions() -> dict[str, str]:
    """Python and the installed versions of :data:`LIBRARIES`."""
    from importlib import metadata

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in LIBRARIES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def run_folder(argv: list[str]) -> tuple[str, Path] | None:
    """(command, run folder) of a command line, or None when it works on no run folder.

    The run folder is ``--out`` (``demo`` and ``run`` included); ``verify`` and ``merge`` take it as
    their first argument.
    """
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is None or command in NOT_ON_A_RUN or {"-h", "--help"} & set(argv):
        return None
    out = _out_option(argv)
    if out is None and command in ("verify", "merge"):
        out = next((a for a in argv[argv.index(command) + 1:] if not a.startswith("-")), None)
    return (command, Path(out)) if out else None


def _out_option(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a == "--out" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--out="):
            return a.split("=", 1)[1]
    return None


class _Tee(io.TextIOBase):
    """A text stream writing to another one and keeping the complete lines that are not progress bars."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.lines: list[str] = []
        self._partial = ""

    def write(self, text: str) -> int:
        self.inner.write(text)
        self._partial += text
        *done, self._partial = self._partial.split("\n")
        self.lines += [ln for ln in done if ln.strip() and "\r" not in ln]
        return len(text)

    def flush(self) -> None:
        self.inner.flush()

    def isatty(self) -> bool:
        return bool(getattr(self.inner, "isatty", lambda: False)())

    @property
    def encoding(self):  # type: ignore[override]
        return getattr(self.inner, "encoding", "utf-8")


class _WarningsHandler(logging.Handler):
    """Python warnings (through :func:`logging.captureWarnings`): kept for the log and shown on stderr as
    Python would show them."""

    def __init__(self, kept: list[str]) -> None:
        super().__init__()
        self.kept = kept

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        self.kept.append(text.strip().splitlines()[0] if text.strip() else "")
        sys.stderr.write(text if text.endswith("\n") else text + "\n")


def log_text(argv: list[str], started: float, status: str, stderr_lines: list[str], warned: list[str]) -> str:
    """The log's text."""
    lines = [f"command: wsi2dmamba {' '.join(argv)}",
             f"started: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(started))}",
             f"seconds: {time.time() - started:.1f}",
             f"cwd: {os.getcwd()}",
             f"status: {status}",
             "versions:"]
    lines += [f"  {k}: {v}" for k, v in versions().items()]
    lines += ["warnings:"] + [f"  {w}" for w in warned] if warned else ["warnings: none"]
    lines += ["stderr:"] + [f"  {ln}" for ln in stderr_lines] if stderr_lines else ["stderr: (empty)"]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def run_log(argv: list[str]) -> Iterator[None]:
    """Record the command ``argv`` in its run folder's ``logs/`` once it ends (if the folder exists then)."""
    from .. import run_layout as layout
    from ..errors import WsiError
    from ..fileio import write_text_atomic

    target = run_folder(argv)
    if target is None:
        yield
        return
    command, run_dir = target
    started = time.time()
    tee = _Tee(sys.stderr)
    warned: list[str] = []
    handler = _WarningsHandler(warned)
    wlog = logging.getLogger("py.warnings")
    logging.captureWarnings(True)
    wlog.addHandler(handler)
    status = "ok"
    try:
        with contextlib.redirect_stderr(tee):
            yield
    except SystemExit as exc:
        status = "ok" if exc.code in (0, None) else f"exit {exc.code}"
        raise
    except BaseException as exc:
        status = f"error: {type(exc).__name__}: {exc}"
        raise
    finally:
        wlog.removeHandler(handler)
        logging.captureWarnings(False)
        if run_dir.is_dir():
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
            path = layout.log_file(run_dir, stamp, command, os.getpid())
            with contextlib.suppress(OSError, WsiError):  # a read-only or full run folder keeps no log
                write_text_atomic(path, log_text(argv, started, status, tee.lines, warned))
