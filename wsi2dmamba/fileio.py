"""Atomic, hashed file output.

Every file the tool writes goes through :func:`atomic_path`: it is written under a temporary name in the
same folder and renamed over the final name only when complete, so a file that exists is whole, even if
the process is killed or the disk fills up half-way.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError, WsiError

_TMP_PREFIX = ".tmp-"


def _file_mode() -> int:
    """Permissions of a new file under the process's umask (mkstemp's own 0600 would hide outputs
    from other users of a shared run folder)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


# Write failures caused by the environment, with what to tell the user.
_ENV_ERRORS = {
    errno.ENOSPC: "No space left on the device",
    errno.EDQUOT: "Disk quota exceeded",
    errno.EFBIG: "File too large for the file system (or for the limit set with ulimit -f)",
    errno.EROFS: "The file system is read-only",
    errno.EACCES: "Permission denied",
    errno.EPERM: "Operation not permitted",
}


_SPACE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _environment_error(exc: OSError, final: Path, space_only: bool = False) -> WsiError | None:
    """A clear error for a write that failed because of the disk or permissions, else None.

    With ``space_only`` only a full disk, a quota or a size limit qualifies (inside the caller's block a
    permission error may come from reading an input, which is not this file's fault).
    """
    what = _ENV_ERRORS.get(exc.errno)
    if what is None or (space_only and exc.errno not in _SPACE_ERRORS):
        return None
    fix = ("free space (or raise the quota) and rerun" if exc.errno in _SPACE_ERRORS
           else f"make {final.parent} writable or choose another output folder")
    return WsiError(f"{what} while writing {final}; {fix}. Nothing partial was left behind, and files "
                    "already finished are kept (a rerun resumes).")


def _library_errno(exc: BaseException) -> int | None:
    """The errno inside a library's own error type (safetensors says "… (os error 28)"), else None."""
    import re

    if isinstance(exc, OSError) or not isinstance(exc, Exception):
        return None
    found = re.search(r"\(os error (\d+)\)", str(exc))
    return int(found.group(1)) if found else None


def os_error_message(exc: OSError) -> str | None:
    """A clear one-paragraph message for an error of the environment (read-only or full disk, permission,
    a name too long, a missing folder), naming the file and what to do; None for other errors."""
    name = exc.filename if exc.filename is not None else "a file"
    fixes = {
        errno.EROFS: f"the file system of {name} is mounted read-only; choose an output folder (--out) on a "
                     "writable disk",
        errno.EACCES: f"permission denied for {name}; make it (or its folder) writable for this user, or "
                      "choose another folder",
        errno.EPERM: f"operation not permitted on {name}; check its owner and permissions, or choose another "
                     "folder",
        errno.ENOSPC: f"no space left on the device holding {name}; free space and rerun (finished work is "
                      "kept and skipped)",
        errno.EDQUOT: f"disk quota exceeded while writing {name}; free space or raise the quota and rerun",
        errno.EFBIG: f"{name} is larger than the file system or `ulimit -f` allows",
        errno.ENAMETOOLONG: f"the name {name} is longer than the file system allows; use shorter slide ids or "
                            "a shorter output path",
        errno.ENOTDIR: f"a part of {name} is a file, not a folder; choose another path",
        errno.EISDIR: f"{name} is a folder where a file was expected; choose another path",
    }
    fix = fixes.get(exc.errno) if exc.errno is not None else None
    return f"{fix[0].upper()}{fix[1:]} ({exc.strerror})." if fix else None


def user_path(text: str | os.PathLike[str], what: str) -> Path:
    """A path a user typed (``~`` and ``~user`` expanded), checked to be a possible file name.

    Args:
        text: the path as given.
        what: where it was given, for the message (e.g. ``"--cohort"`` or ``"pipeline.toml: [cohort] manifest"``).

    Raises:
        ConfigError: the path holds a NUL character, or names the home folder of an unknown user.
    """
    raw = os.fspath(text)
    if "\0" in raw:
        raise ConfigError(f"{what}: the path {raw!r} contains a NUL character, which no file name can hold; "
                          "fix the path.")
    try:
        return Path(raw).expanduser()
    except RuntimeError:  # "~nosuchuser/...": no home folder known for that user
        user = raw[1:].split("/", 1)[0].split(os.sep, 1)[0]
        raise ConfigError(f"{what}: the path {raw!r} starts with ~{user}, but no user {user!r} is known here; "
                          "write the folder out in full.") from None


def ensure_writable(folder: str | os.PathLike[str]) -> Path:
    """Create ``folder`` if needed and check that a file can be written in it, before any work starts.

    Raises:
        WsiError: the folder cannot be created or written (read-only file system, permissions, a file in
            the way, a full disk), naming the folder and what to do.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=_TMP_PREFIX + "probe-", dir=folder)
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):  # removed meanwhile as a stale temporary of this folder
            os.unlink(probe)
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(folder)
        message = os_error_message(exc) or f"{folder} cannot be written ({exc})."
        raise WsiError(f"Output folder {folder} is not usable: {message} Nothing was run.") from exc
    return folder


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it to ``final`` when the block ends without error.

    The temporary file is removed if the block raises. The folder of ``final`` is created if needed.
    The suffix is kept so that libraries that look at it (PIL, h5py) behave as for the final name.

    Raises:
        WsiError: the disk is full, a quota or size limit was hit, or the folder is not writable (the
            message names the file; nothing is left behind).
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=_TMP_PREFIX + final.stem + "-", suffix=final.suffix,
                                        dir=final.parent)
        os.close(fd)
    except OSError as exc:
        err = _environment_error(exc, final)
        if err is not None:
            raise err from exc
        raise
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, _file_mode())
        _fsync_file(tmp)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        err = _environment_error(exc, final, space_only=True)
        if err is not None:
            raise err from exc
        raise
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        code = _library_errno(exc)
        err = _environment_error(OSError(code, os.strerror(code)), final, space_only=True) if code else None
        if err is not None:
            raise err from exc
        raise


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def check_json(path: str | os.PathLike[str]) -> str | None:
    """What is wrong with a JSON (or GeoJSON) file that :func:`write_json_atomic` wrote, or None."""
    try:
        json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        return f"content is not valid {Path(path).suffix.lstrip('.').lower()} ({exc})"
    return None


def check_csv(path: str | os.PathLike[str]) -> str | None:
    """What is wrong with a CSV table the tool wrote, or None: every table it writes is rectangular, so a
    row of another width is a file cut off or edited."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8") as fh:
            width = None
            reader = csv.reader(fh)
            for row in reader:
                if row and width is None:
                    width = len(row)
                elif row and len(row) != width:
                    return (f"content is not valid csv (line {reader.line_num} has {len(row)} field(s), the "
                            f"header {width})")
    except (OSError, ValueError, csv.Error) as exc:
        return f"content is not valid csv ({exc})"
    return None


def temporary_sibling(path: str | os.PathLike[str], role: str) -> Path:
    """A temporary name beside ``path`` (a file or folder assembled before it is moved into place), one per
    process; :func:`remove_stale_temporaries` deletes such names left by a killed process."""
    path = Path(path)
    return path.parent / f"{_TMP_PREFIX}{role}-{path.name}-{os.getpid()}"


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> int:
    """Delete temporary files left in ``folder`` by a killed process; return how many were removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for p in folder.glob(_TMP_PREFIX + "*"):
        with contextlib.suppress(OSError):
            p.unlink()
            removed += 1
    return removed


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def recorded_sha256_problem(path: str | os.PathLike[str], recorded: Any, writer: str, hint: str) -> str | None:
    """Why an existing file no longer matches the sha256 its writer recorded, or None when it does.

    ``writer`` names what wrote the file ("training", "stage 'tile'"); ``hint`` says what to do when the
    content changed.
    """
    try:
        actual = file_sha256(path)
    except OSError as exc:
        return f"cannot be read ({exc})"
    if actual != recorded:
        return (f"content changed since {writer} wrote it (sha256 {actual[:12]}… ≠ recorded "
                f"{str(recorded)[:12]}…); {hint}")
    return None


def params_hash(params: Mapping[str, Any]) -> str:
    """Short stable hash of a JSON-serialisable mapping (key order does not matter).

    Used to decide whether an existing output was made with the same parameters and may be reused.
    """
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
