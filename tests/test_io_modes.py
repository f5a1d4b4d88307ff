"""Permission modes of the files `robust_meta._io` writes atomically.

A temporary file from `tempfile.mkstemp` is 0600; renamed over the destination as it is, every
checkpoint, log and result would be unreadable by collaborators on a shared file system. The
writers give a new file `0o666 & ~umask` (what `open()` gives) and keep an existing file's
permission bits.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from robust_meta import _io
from robust_meta._io import (
    atomic_save,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission modes")

WRITERS: dict[str, Callable[[Path], Path]] = {
    "atomic_write": lambda p: atomic_write(p, lambda f: f.write(b"payload")),
    "atomic_save": lambda p: atomic_save({"w": torch.arange(3)}, p),
    "atomic_write_json": lambda p: atomic_write_json({"done": True}, p),
    "atomic_write_bytes": lambda p: atomic_write_bytes(b"payload", p),
    "atomic_write_text": lambda p: atomic_write_text("payload", p),
}


def octal(value: object) -> str:
    return f"{value:04o}" if isinstance(value, int) else str(value)


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def no_temps_left(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("writer", sorted(WRITERS))
@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664), (0o027, 0o640)], ids=octal)
def test_a_new_file_gets_the_mode_open_would_give(tmp_path, writer, mask, expected):
    with umask(mask):
        path = WRITERS[writer](tmp_path / "out" / "file")
        reference = tmp_path / "reference"
        with open(reference, "wb"):
            pass
    assert mode(path) == expected == mode(reference)
    assert no_temps_left(path.parent)


@pytest.mark.parametrize("writer", sorted(WRITERS))
@pytest.mark.parametrize(("mask", "existing"), [(0o022, 0o640), (0o077, 0o640), (0o022, 0o600), (0o077, 0o664)], ids=octal)
def test_an_existing_file_keeps_its_mode(tmp_path, writer, mask, existing):
    path = tmp_path / "file"
    path.write_bytes(b"old content")
    os.chmod(path, existing)
    inode = path.stat().st_ino
    with umask(mask):
        WRITERS[writer](path)
    assert mode(path) == existing
    assert path.read_bytes() != b"old content" and path.stat().st_ino != inode  # really replaced
    assert no_temps_left(tmp_path)


def test_the_content_is_still_written_and_read_back(tmp_path):
    with umask(0o022):
        path = atomic_save({"w": torch.arange(3)}, tmp_path / "last.pt")
        json_path = atomic_write_json({"a": 1}, tmp_path / "results.json")
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(3))
    assert json_path.read_text() == '{\n  "a": 1\n}\n'
    assert mode(path) == mode(json_path) == 0o644


def test_a_failed_write_keeps_the_old_file_and_its_mode(tmp_path):
    path = tmp_path / "file"
    path.write_bytes(b"old")
    os.chmod(path, 0o640)

    def fail(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with umask(0o077), pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_bytes() == b"old" and mode(path) == 0o640
    assert no_temps_left(tmp_path)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o027, 0o000], ids=octal)
def test_the_umask_is_read_without_changing_it(mask):
    with umask(mask):
        assert _io._current_umask() == mask
        assert os.umask(mask) == mask  # still in force


@pytest.mark.parametrize("mask", [0o022, 0o077], ids=octal)
def test_the_umask_fallback_without_proc(monkeypatch, tmp_path, mask):
    monkeypatch.setattr(_io, "_PROC_STATUS", str(tmp_path / "no-such-status"))
    with umask(mask):
        assert _io._current_umask() == mask
        assert os.umask(mask) == mask
        path = atomic_write_bytes(b"x", tmp_path / "f")
    assert mode(path) == 0o666 & ~mask


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="no /proc/self/status")
def test_the_umask_comes_from_proc_where_it_can(monkeypatch):
    calls = []
    real = os.umask
    monkeypatch.setattr(os, "umask", lambda m: calls.append(m) or real(m))
    _io._current_umask()
    if any(line.startswith("Umask:") for line in Path("/proc/self/status").read_text().splitlines()):
        assert calls == []  # no race with threads that create files meanwhile
