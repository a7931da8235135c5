"""Finding the files to ingest and reading them without surprises.

Folders are walked without following links. Every entry that is not a regular file (a FIFO, a
socket, a device, a broken or looping link), that cannot be read, or that vanishes mid-run
becomes a one-line per-file reason: never a hang, never a traceback, and a FIFO or device is
never opened (opening a FIFO waits for a writer; opening some devices has side effects).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ingest.errors import IngestError, LoadError

_BLOCK = 1 << 20  # bytes read per call while hashing
# O_NONBLOCK: should a FIFO replace a file between the check and the open, the open returns at
# once instead of waiting for a writer. O_NOFOLLOW: a link swapped in is refused, not followed.
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_KINDS = (
    (stat.S_ISDIR, "folder"),
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
)


@dataclass(frozen=True)
class Found:
    """One entry to ingest: a regular file under its real path (`problem` None), or an entry that
    cannot be ingested, under the path it was found at, and why."""

    path: Path
    problem: str | None = None


@dataclass(frozen=True)
class FileState:
    """A regular file as read just now: `sha256` is None when it is larger than the limit."""

    size: int
    mtime: float
    sha256: str | None


def walk(paths: Iterable[Path]) -> list[Found]:
    """Files named, and entries under folders named (recursively, sorted, hidden ones skipped).

    A path that does not exist at all raises IngestError; anything odd found is returned with
    its problem. Links to regular files are followed (the file is ingested under its real path);
    links to folders are not followed, so a folder linked into itself cannot loop.
    """
    out: dict[Path, Found] = {}
    for p in paths:
        p = Path(p).expanduser()
        if not os.path.lexists(p):
            raise IngestError(f"No such file or folder: {p}")
        if not os.path.isdir(p):  # a folder named through a link is followed: the user asked for it
            _add(out, examine(p))
            continue
        problems: list[Found] = []
        for root, dirs, files in os.walk(p, onerror=lambda exc: problems.append(_unlistable(exc)), followlinks=False):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if not name.startswith("."):
                    _add(out, examine(Path(root, name)))
        for found in problems:
            _add(out, found)
    return list(out.values())


def examine(path: Path) -> Found:
    """What `path` is now, without opening it: a regular file, or the reason it cannot be ingested."""
    try:
        st = os.stat(path)  # follows links: a link to a regular file is fine
    except OSError as exc:
        return Found(Path(os.path.abspath(path)), _stat_problem(path, exc))
    if not stat.S_ISREG(st.st_mode):
        return Found(Path(os.path.abspath(path)), f"not a regular file ({_kind(st.st_mode)})")
    return Found(Path(os.path.realpath(path)))  # realpath never raises on a loop, unlike Path.resolve


def read_state(path: Path, *, max_bytes: int) -> FileState:
    """Size, mtime and SHA-256 of the regular file at `path` (no digest past `max_bytes`).

    Raises LoadError with the per-file reason when it is no longer a readable regular file.
    """
    fd = _open_regular(path)
    with os.fdopen(fd, "rb", closefd=True) as fh:
        st = os.fstat(fd)
        if st.st_size > max_bytes:
            return FileState(st.st_size, st.st_mtime, None)
        h, size = hashlib.sha256(), 0
        try:
            # Read at most max_bytes + 1: a file that grows while we read cannot keep us here.
            while block := fh.read(min(_BLOCK, max_bytes + 1 - size)):
                h.update(block)
                size += len(block)
                if size > max_bytes:
                    return FileState(size, st.st_mtime, None)
        except OSError as exc:
            raise LoadError(f"cannot read file: {exc.strerror or exc}") from exc
    return FileState(size, st.st_mtime, h.hexdigest())


def too_large(size: int, max_bytes: int) -> str:
    return f"too large ({size / 2**20:.1f} MB > limit {max_bytes / 2**20:.0f} MB; raise MOERAG_MAX_FILE_MB)"


def _open_regular(path: Path) -> int:
    """A descriptor on `path`, only if it is still a regular file; LoadError with the reason otherwise.

    The walk checked the entry, but it may have been replaced since: lstat before opening keeps
    FIFOs and devices unopened, and fstat after opening checks what was actually opened.
    """
    try:
        before = os.lstat(path)
    except OSError as exc:
        raise LoadError(_stat_problem(path, exc)) from exc
    if not stat.S_ISREG(before.st_mode):
        raise LoadError(_changed(before.st_mode))
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a link swapped in since the lstat
            raise LoadError("file changed during ingest (it is now a symbolic link)") from exc
        raise LoadError(_stat_problem(path, exc)) from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino):
        os.close(fd)
        raise LoadError(_changed(st.st_mode) if not stat.S_ISREG(st.st_mode) else "file changed during ingest")
    return fd


def _add(out: dict[Path, Found], found: Found) -> None:
    found = _storable(found)
    out.setdefault(found.path, found)  # a file named twice (or linked twice) is ingested once


def _storable(found: Found) -> Found:
    """A name that is not valid UTF-8 (Python keeps its bytes as lone surrogates) cannot be stored
    or printed: the file fails under a readable version of its name instead of ending the run."""
    name = str(found.path)
    try:
        name.encode("utf-8")
        return found
    except UnicodeEncodeError:
        shown = name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        return Found(Path(shown), "file name is not valid UTF-8 (rename the file)")


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "unknown file type")


def _changed(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "file changed during ingest (it is now a symbolic link)"
    return f"not a regular file ({_kind(mode)})"


def _stat_problem(path: Path, exc: OSError) -> str:
    """The reason for an entry that could not be looked at (or opened)."""
    if exc.errno == errno.ELOOP:
        return "symbolic link loop"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        if os.path.islink(path):
            try:
                return f"broken symbolic link -> {os.readlink(path)}"
            except OSError:
                pass
        return "file disappeared during ingest"
    return f"cannot read file: {exc.strerror or exc}"


def _unlistable(exc: OSError) -> Found:
    """A folder os.walk could not list (permissions, or it vanished) is reported, not skipped silently."""
    path = Path(os.path.abspath(exc.filename)) if exc.filename else Path("?")
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return Found(path, "folder disappeared during ingest")
    return Found(path, f"cannot read folder: {exc.strerror or exc}")
