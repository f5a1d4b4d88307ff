"""Crash-safe file writes shared by every long job (``train``, ``eval``, ``reproduce``).

Every writer here follows the same recipe: write a temporary file in the destination's
folder, ``fsync`` it, ``os.replace`` it over the destination, then ``fsync`` the folder.
Whatever stops the process (an exception, SIGINT, SIGTERM, SIGKILL, a power cut after the
call returned), the destination holds either its old content or the complete new one, never
a mix. A SIGKILL during a write can leave a temporary file ``.<name>.<random>.tmp`` behind;
`remove_stale_temps` deletes those before a job resumes.

Permission modes are those of a plain ``open(path, "w")``: a new file gets
``0o666 & ~umask`` (0644 under the usual umask 022, so collaborators on a shared file system
can read checkpoints and results), and a file that already exists keeps its permission bits
(the ``0o777`` part of its mode; its owner and group are those of a newly created file). The temporary file itself is
created 0600 by `tempfile.mkstemp` and gets its final mode before the rename.

Example:
    >>> from robust_meta._io import atomic_write_json
    >>> path = atomic_write_json({"done": True}, "out/results.json")
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_save",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "fsync_dir",
    "remove_stale_temps",
]


# Linux reports the umask here (since 4.7) without changing it; elsewhere the umask must be
# set to read it, which another thread creating a file at that moment would see.
_PROC_STATUS = "/proc/self/status"
_UMASK_LOCK = threading.Lock()
# fchmod errors meaning "this file system has no POSIX modes" (some CIFS, FUSE mounts)
_NO_MODES = {errno.EPERM, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}


def _current_umask() -> int:
    """The process's umask, read from ``/proc/self/status`` where possible.

    Elsewhere it falls back to setting the umask and restoring it at once; for that instant
    the whole process runs under umask 077 (so a file another thread creates meanwhile is
    private rather than world-writable). A lock serialises the fallback between robust-meta
    writers only.
    """
    try:
        with open(_PROC_STATUS, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        old = os.umask(0o077)  # the safer of the two transient values
        os.umask(old)
    return old


def _final_mode(path: Path) -> int:
    """The permission bits ``path`` should have once written (see the module docstring)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode) & 0o777
    except (FileNotFoundError, NotADirectoryError):  # a new file (or a dangling symlink)
        return 0o666 & ~_current_umask()


def _set_mode(fd: int, tmp: str, mode: int) -> None:
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, mode)
        else:  # Windows before Python 3.13
            os.chmod(tmp, mode)
    except OSError as err:
        if err.errno not in _NO_MODES:
            raise


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make renames in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(f)`` on a temporary binary file, then move it over ``path`` atomically.

    The file ends up with the mode ``open()`` would give it: ``0o666 & ~umask`` when ``path``
    is new, and the permission bits ``path`` had when it already existed (``os.fchmod`` on
    the temporary file before the rename; skipped on file systems without POSIX modes).

    Args:
        path: destination (its folder is created).
        write: fills the open file object.

    Returns:
        The path written.

    Raises:
        Whatever ``write`` or the file system raises; ``path`` then keeps its old content
        and the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _final_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            _set_mode(f.fileno(), tmp, mode)
            os.fsync(f.fileno())  # the data and the mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically: a temp file in the same folder, fsync, rename.

    If anything fails (disk full, interrupted, an exception in ``torch.save``), ``path``
    keeps its old content and the temp file is removed. The mode is as for `atomic_write`.

    Returns:
        The path written.
    """
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    """Write ``data`` to ``path`` atomically (see `atomic_write`); returns the path."""
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(text: str, path: str | os.PathLike, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (no newline translation); returns the path."""
    return atomic_write_bytes(text.encode(encoding), path)


def atomic_write_json(obj: Any, path: str | os.PathLike, *, indent: int | None = 2, **kwargs: Any) -> Path:
    """``json.dumps(obj)`` (plus a final newline) to ``path`` atomically; returns the path.

    The mode is as for `atomic_write` (a new file ``0o666 & ~umask``, an old one keeps its own).

    Args:
        obj: JSON-serialisable data.
        path: destination.
        indent: as for `json.dumps`.
        **kwargs: more `json.dumps` options (``default=``, ``sort_keys=``, ...).
    """
    return atomic_write_text(json.dumps(obj, indent=indent, **kwargs) + "\n", path)


def remove_stale_temps(folder: str | os.PathLike, names: Iterable[str] | None = None) -> list[Path]:
    """Delete temporary files left by an atomic write that was killed (SIGKILL, power cut).

    Args:
        folder: the folder to clean.
        names: destination names whose temporaries to delete (default: all ``.*.tmp``).

    Returns:
        The files removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    wanted = None if names is None else {str(n) for n in names}
    removed = []
    for p in folder.glob(".*.tmp"):
        base = p.name[1:].rsplit(".", 2)[0]  # ".<name>.<random>.tmp" -> "<name>"
        if wanted is not None and base not in wanted:
            continue
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p)
    return removed
