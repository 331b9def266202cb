"""User-facing errors: the CLI prints their message as one line and exits 2, no traceback."""

from __future__ import annotations


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
