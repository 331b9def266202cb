"""Ctrl-C and SIGTERM end a command as KeyboardInterrupt / SystemExit(128 + signal), which unwind
through every ``with`` (runs end KILLED, trials FAIL and are queued again), except inside a
guarded section, where a signal waits until the section ends:

- while this process holds the journal storage's lock file: raised in between, it would leave
  the lock file behind, and every later access (this process's own clean-up included) would wait
  out Optuna's 30-second grace period;
- inside a call to the MLflow client (``deferring``): raised inside a database transaction, it
  lost the write under way (a metric, a tag) or left SQLite locked, so the run could not be
  marked KILLED and the command died with "database is locked" instead of 143.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import threading
from typing import Any

_depth = 0  # guarded sections the main thread is inside
_pending: int | None = None


def install() -> None:
    signal.signal(signal.SIGTERM, handle)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # SIG_IGN (a background job) stays
        signal.signal(signal.SIGINT, handle)


def _raise(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def handle(signum: int, frame=None) -> None:
    """The signal handler: raise now, or once the guarded section ends. A second signal while one
    waits raises at once (a hung call must not make Ctrl-C wait for ever)."""
    global _pending
    if _depth and _pending is None:
        _pending = signum
        return
    _pending = None
    _raise(signum)


def _main() -> bool:
    # Python runs signal handlers in the main thread only; other threads need no guard
    return threading.current_thread() is threading.main_thread()


def enter() -> None:
    global _depth
    if _main():
        _depth += 1


def leave() -> None:
    """The end of a guarded section; one without a matching ``enter`` is harmless."""
    global _depth, _pending
    if not _main():
        return
    _depth = max(0, _depth - 1)
    if _depth == 0 and _pending is not None:
        signum, _pending = _pending, None
        _raise(signum)


@contextlib.contextmanager
def deferred():
    """A guarded section as a ``with`` block."""
    enter()
    try:
        yield
    finally:
        leave()


class deferring:  # noqa: N801 -- used like a function: ``deferring(client)``
    """``target`` seen through a guarded section: each method call runs whole, and a signal that
    arrives during it is raised once it has returned."""

    def __init__(self, target: Any):
        self._target = target

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args, **kwargs):
            with deferred():
                return attr(*args, **kwargs)

        return call
