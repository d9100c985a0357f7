"""Check an HDF5 file before this process lets the HDF5 library read it.

A damaged HDF5 file can crash the library (a segmentation fault kills the whole process, with no message)
or send it into an endless loop. So before a stage reads a grid file in its own process:

* a file the run wrote itself is compared with the sha256 recorded when it was written (its state file);
  a file whose bytes changed since is refused before HDF5 opens it;
* any other file (no recorded hash: imported, copied in, or made by another run) is first read whole in
  a child process with a time limit. A child that dies by a signal or runs past the limit marks the file
  as damaged; the stage reports it like any other bad file, and the batch goes on.

The child reads with the same reader the stage then uses (:func:`~.files.read_tile_grid`,
:func:`~.files.read_feature_grid`, or the reader of ``import-features``), so a file that passes was read
once without harm.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..errors import GridFileError
from ..fileio import file_sha256

#: Time limit of the child's read of one file: this many seconds, plus one second per
#: ``_LIMIT_BYTES_PER_S`` bytes of file (a slow network disk reads at least that fast).
DEFAULT_TIME_LIMIT_S = 20.0
_LIMIT_BYTES_PER_S = 20e6
#: Environment variable that sets the base time limit in seconds (e.g. for a very slow file system).
TIME_LIMIT_ENV = "WSI2DMAMBA_HDF5_TIME_LIMIT_S"

#: Set in the child's environment: a reader that guards its own input (the importers) does not start a
#: child of its own there.
_IN_CHILD_ENV = "WSI2DMAMBA_HDF5_CHECKING"

#: What a file is, and the reader (``module:function``) the child reads it with: the project's tiles and
#: feature grid files, and CLAM/TRIDENT feature and patch files (read as ``import-features`` reads them).
#: Named, not imported, so this low layer does not depend on the importers above it.
READERS = {
    "tiles": "wsi2dmamba.grid.files:read_tile_grid",
    "features": "wsi2dmamba.grid.files:read_feature_grid",
    "clam-features": "wsi2dmamba.features.importers:_read_feature_file",
    "clam-patches": "wsi2dmamba.features.importers:_read_coords_attrs",
}
KINDS = tuple(READERS)


def time_limit_s(path: Path, base: float | None = None) -> float:
    """Seconds the child may take to read ``path``: the base (``$WSI2DMAMBA_HDF5_TIME_LIMIT_S`` or
    :data:`DEFAULT_TIME_LIMIT_S`) plus one second per 20 MB of file."""
    if base is None:
        raw = os.environ.get(TIME_LIMIT_ENV, "")
        try:
            base = float(raw) if raw else DEFAULT_TIME_LIMIT_S
        except ValueError:
            base = DEFAULT_TIME_LIMIT_S
        base = base if 0 < base < 1e6 else DEFAULT_TIME_LIMIT_S
    try:
        size = path.stat().st_size
    except OSError:
        size = 0
    return base + size / _LIMIT_BYTES_PER_S


def check_recorded_hash(path: Path, recorded: str, writer: str) -> None:
    """Raise :class:`GridFileError` unless ``path``'s sha256 is ``recorded``.

    Args:
        path: the file.
        recorded: the hex sha256 recorded when the run wrote it.
        writer: the stage that wrote it, named in the message (e.g. ``"tile"``).
    """
    try:
        actual = file_sha256(path)
    except OSError as exc:
        raise GridFileError(f"Cannot read {path} ({exc}); check the file's permissions and the disk.") from exc
    if actual != recorded:
        raise GridFileError(f"{path} changed since the {writer} stage wrote it (sha256 {actual[:12]}… ≠ recorded "
                            f"{recorded[:12]}…): it was damaged on disk or edited. It was not read. Rerun "
                            f"`wsi2dmamba {writer}` for this run: it notices the change and makes the file again.")


def probe_in_child(paths: Iterable[Path], kind: str, *, base_limit_s: float | None = None) -> dict[Path, str]:
    """Read each file whole in a child process; return the files whose read crashed or hung, with why.

    Files are read one after another by one child; after a crash or a hang the child is replaced and
    the next file is read by the new one. A file the reader refuses with a clear error (or reads
    without fault) is not returned: the caller's own read then gives the same result.

    Args:
        paths: the files.
        kind: one of :data:`KINDS`.
        base_limit_s: base of each file's time limit (see :func:`time_limit_s`).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    todo = [Path(p) for p in paths]
    bad: dict[Path, str] = {}
    while todo:
        done, failure = _run_child(todo, kind, base_limit_s)
        if failure is None:
            break
        bad[todo[done]] = failure
        todo = todo[done + 1:]
    return bad


def _child_env() -> dict[str, str]:
    """The parent's environment, with this package importable whatever the child's working folder."""
    root = str(Path(__file__).resolve().parents[2])
    current = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + current if current else ""), _IN_CHILD_ENV: "1"}


def _run_child(paths: list[Path], kind: str, base_limit_s: float | None) -> tuple[int, str | None]:
    """Read ``paths`` in one child; return (files finished, None) or (index of the file at fault, why)."""
    proc = subprocess.Popen([sys.executable, "-m", __name__, kind], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=_child_env(), text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    def feed() -> None:  # in a thread: a hung child stops reading its input
        assert proc.stdin is not None
        try:
            for p in paths:
                proc.stdin.write(json.dumps(str(p)) + "\n")
            proc.stdin.close()
        except OSError:  # the child died; _watch reports why
            pass

    threads = [threading.Thread(target=pump, daemon=True), threading.Thread(target=feed, daemon=True)]
    for t in threads:
        t.start()
    try:
        return _watch(proc, lines, paths, base_limit_s)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for t in threads:
            t.join(timeout=5)


def _watch(proc: subprocess.Popen, lines: queue.Queue, paths: list[Path],
           base_limit_s: float | None) -> tuple[int, str | None]:
    """Follow the child's announcements (the index of the file it starts) until it ends or a file's time
    limit passes; return as :func:`_run_child`."""
    started = -1  # index of the file the child is reading
    while True:
        limit = time_limit_s(paths[started], base_limit_s) if started >= 0 else 60.0
        try:
            line = lines.get(timeout=limit)
        except queue.Empty:
            if started < 0:
                raise GridFileError("The process that checks HDF5 files did not start within "
                                    f"{limit:.0f} s; the machine is overloaded.") from None
            return started, f"reading it did not finish within {limit:.0f} s (the HDF5 library hung on it)"
        if line is None:
            rc = proc.wait()
            if rc == 0 and started == len(paths) - 1:
                return len(paths), None
            if started < 0:
                raise GridFileError(f"The process that checks HDF5 files failed to start (exit status {rc}).")
            return started, _death(rc)
        started = int(line.split()[0])


def _death(rc: int) -> str:
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        if -rc == signal.SIGKILL:  # not a fault of the library: the kernel's out-of-memory killer, or a person
            return "the process reading it was killed (SIGKILL: out of memory, or killed from outside)"
        return f"the HDF5 library crashed while reading it ({name})"
    return f"the process reading it exited with status {rc} (out of memory, or the HDF5 library aborted)"


def guard_grid_files(paths: Iterable[Path], kind: str, recorded: Mapping[Path, str], writer: str, *,
                     base_limit_s: float | None = None) -> dict[Path, str]:
    """Check files before reading them in this process; return each refused file with the reason.

    A file with a recorded sha256 is hashed and compared; the others are read once in a child process
    (:func:`probe_in_child`). The reasons name the file and what to do.

    Args:
        paths: the files.
        kind: one of :data:`KINDS`.
        recorded: sha256 recorded for the files the run wrote itself (the others are absent).
        writer: the stage that writes such files (``"tile"`` or ``"extract"``), named in the messages.
        base_limit_s: base of each child read's time limit (see :func:`time_limit_s`).
    """
    bad: dict[Path, str] = {}
    if os.environ.get(_IN_CHILD_ENV):  # this is the checking child: it reads what it is asked to read
        return bad
    untrusted = []
    for p in map(Path, paths):
        if p in recorded:
            try:
                check_recorded_hash(p, recorded[p], writer)
            except GridFileError as exc:
                bad[p] = str(exc)
        else:
            untrusted.append(p)
    for p, why in probe_in_child(untrusted, kind, base_limit_s=base_limit_s).items():
        bad[p] = (f"{p} is damaged: {why}. It was not read in this process. Delete it and rerun "
                  f"`wsi2dmamba {writer}` for this slide (or replace it with a good copy).")
    return bad


def guard_grid_file(path: Path, kind: str, recorded: str | None, writer: str) -> None:
    """:func:`guard_grid_files` for one file; raise :class:`GridFileError` if it is refused."""
    bad = guard_grid_files([path], kind, {Path(path): recorded} if recorded else {}, writer)
    if bad:
        raise GridFileError(bad[Path(path)])


def _reader(kind: str):
    import importlib

    module, _, name = READERS[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def _child_main(kind: str) -> None:
    """Child side: read each file named on stdin (one JSON string a line), announcing each on stdout."""
    from ..errors import WsiError

    read = _reader(kind)
    for i, line in enumerate(sys.stdin):
        print(i, flush=True)
        try:
            read(Path(json.loads(line)))
        except (WsiError, Exception):  # noqa: BLE001, S110 - a refusal or an error is neither a crash nor a hang
            pass  # the parent's own read gives the same error again


if __name__ == "__main__":
    _child_main(sys.argv[1])
