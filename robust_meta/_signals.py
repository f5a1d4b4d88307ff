"""SIGINT and SIGTERM as one exception, raised only where a long job can stop cleanly.

`SignalGuard` installs handlers (main thread only) that raise `Interrupted` at once, except
inside `SignalGuard.critical` sections (an optimizer step, a checkpoint or log write), where
the signal is remembered and raised when the section ends. A second signal inside a
critical section raises at once: the job then stops like after SIGKILL (the files on disk
are still whole: every write is atomic). The previous handlers are restored on exit.

Used by ``train`` and ``robust-meta eval``; reusable by any long job.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator, Sequence
from types import FrameType, TracebackType
from typing import Any

__all__ = ["Interrupted", "SignalGuard"]


class Interrupted(KeyboardInterrupt):
    """A long job stopped by SIGINT or SIGTERM (a `KeyboardInterrupt`, so ``except Exception`` lets it pass).

    Attributes:
        signum: the signal number (``signal.SIGINT`` or ``signal.SIGTERM``).
    """

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(f"interrupted by {signal.Signals(self.signum).name}")

    @property
    def exit_code(self) -> int:
        """The shell convention for a job killed by the signal: ``128 + signum`` (130, 143)."""
        return 128 + self.signum


def exit_code(err: BaseException) -> int:
    """``128 + signum`` for an `Interrupted`, 130 for any other ``KeyboardInterrupt``."""
    return err.exit_code if isinstance(err, Interrupted) else 130


class SignalGuard:
    """Context manager turning SIGINT/SIGTERM into `Interrupted`, deferred in critical sections.

    Args:
        signals: the signals to catch (default SIGINT and SIGTERM).

    Example:
        >>> with SignalGuard() as guard:
        ...     work()                 # a signal raises Interrupted here, at once
        ...     with guard.critical():
        ...         write_checkpoint() # ...but only after this block
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM)) -> None:
        self.signals = tuple(signals)
        self.pending: int | None = None
        self._depth = 0
        self._previous: dict[int, Any] = {}

    @property
    def active(self) -> bool:
        """Whether the handlers are installed (only possible in the main thread)."""
        return bool(self._previous)

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for s, prev in self._previous.items():
            signal.signal(s, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._depth > 0 and self.pending is None:
            self.pending = signum
            return
        raise Interrupted(signum)

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """A block that a first SIGINT/SIGTERM does not cut: it raises `Interrupted` after the block."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        self.check()

    def check(self) -> None:
        """Raise `Interrupted` now if a signal arrived during a critical section."""
        if self._depth == 0 and self.pending is not None:
            signum, self.pending = self.pending, None
            raise Interrupted(signum)
