"""User-facing errors: the CLI prints their message as one line and exits 2, no traceback."""

from __future__ import annotations


def first_line(e: BaseException, limit: int = 200) -> str:
    """An exception's first line (its type's name where it has no words), cut to ``limit``
    characters: what a one-line error quotes of a driver's, a server's or torch's own words."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]


class CharlmError(Exception):
    """Something the user can fix (a config, a path, a text); the message says what and how."""


class OutsideFault(CharlmError):
    """A fault from outside the config: a folder that cannot be written, a full disk, a server that
    does not answer, a store that is corrupt or another program's. The message names the place
    (passwords redacted) and the fix; ``kept`` says what survived and how to go on from it, added by
    the command that knows (charlm/api.py)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message
        self.kept: list[str] = []

    def keeping(self, note: str) -> OutsideFault:
        self.kept.append(note)
        return self

    def __str__(self) -> str:
        return self.message + "".join(f"; {k}" for k in self.kept)


class CorruptState(OutsideFault):
    """A saved training state (a resume point) that cannot be read: never discarded silently."""
