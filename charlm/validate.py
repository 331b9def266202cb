"""The checks config files and sweep files share: typed values and unknown keys with a suggestion."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def hint(key: str, known: Iterable[str], listing: str = "") -> str:
    """``"; did you mean 'train.lr'?"`` for a near miss, else ``"; <listing>: a, b, c"`` (or nothing)."""
    known = list(known)
    near = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
    if near:
        return f"; did you mean '{near[0]}'?"
    return f"; {listing}: {', '.join(known)}" if listing else ""
