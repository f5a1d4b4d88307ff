"""Errors shared by the command and the modules it runs."""

from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(Exception):
    """A user error of the ``robust-meta`` command: reported as one line, exit code 2."""
