"""Ctrl-C and SIGTERM end a command as KeyboardInterrupt / SystemExit(128 + signal), which unwind
through every ``with`` (runs end KILLED, trials FAIL and are queued again), except inside a
guarded section: while this process holds the journal storage's lock file a signal waits until
the lock is released. Raised in between, it would leave the lock file behind, and every later
access (this process's own clean-up included) would wait out Optuna's 30-second grace period.
"""

from __future__ import annotations

import signal
import threading

_depth = 0  # guarded sections the main thread is inside
_pending: int | None = None


def install() -> None:
    signal.signal(signal.SIGTERM, _handler)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # SIG_IGN (a background job) stays
        signal.signal(signal.SIGINT, _handler)


def _raise(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def _handler(signum, frame) -> None:
    global _pending
    if _depth:
        _pending = signum
        return
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
