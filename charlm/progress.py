"""Progress on long work: a live tqdm bar in a terminal, one plain line per event otherwise.

A bar needs a terminal on stderr and no ``CI`` variable; in CI, in a log file or behind a pipe
each event is one line on stderr (``train step 300/1500 loss 1.812 val 1.843 ...``), so logs stay
readable and greppable. Training inside a sweep trial stays silent (``train(..., progress=False)``):
the sweep reports per trial.
"""

from __future__ import annotations

import os
import sys


def interactive() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI")


class Progress:
    """``advance(n)`` moves the bar; ``event(line, **fields)`` shows fields on the bar, or prints
    ``<desc> <line>`` as one line when there is no bar."""

    def __init__(self, desc: str, total: int | None, unit: str, enabled: bool = True, initial: int = 0):
        self.desc = desc
        self.enabled = enabled
        self.bar = None
        if enabled and interactive():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True, leave=False)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def event(self, line: str, **fields) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(fields, refresh=True)
        else:
            print(f"{self.desc} {line}", file=sys.stderr, flush=True)

    def close(self, line: str | None = None) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if line and self.enabled:
            print(f"{self.desc} {line}", file=sys.stderr, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
