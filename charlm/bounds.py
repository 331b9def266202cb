"""The range of every numeric config key, declared once as data.

``charlm.config.validate`` checks each key against its :class:`Bound`, and
``tests/test_bounds.py`` derives boundary values from the same table (the bound, just inside,
just outside) and checks that the code consuming each key (model, optimizer, a training step, an
evaluation) accepts every value the table admits. A bound is what that code accepts, not a taste:
AdamW refuses ``beta == 1``, an evaluation needs two characters, the n-gram of a mixture reads
``mix_order - 1`` characters and must not read more than the network does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Bound:
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: ``low`` itself is outside
    high_open: bool = False
    also: tuple = ()  # values admitted outside the range (``0`` = off / all)
    high_key: str = ""  # the value must also be at most this key's value + high_offset
    high_offset: int = 0
    text: str = ""  # how a message words the range; derived from the numbers when empty

    def limits(self, flat: dict[str, Any]) -> tuple[float | None, float | None]:
        """``(low, high)`` for this config: ``high`` is the tighter of the number and ``high_key``."""
        high = self.high
        if self.high_key:
            other = flat[self.high_key] + self.high_offset
            high = other if high is None else min(high, other)
        return self.low, high

    def admits(self, value: Any, flat: dict[str, Any]) -> bool:
        if value in self.also:
            return True
        if isinstance(value, float) and not math.isfinite(value):
            return False
        low, high = self.limits(flat)
        if low is not None and (value < low or (self.low_open and value == low)):
            return False
        return high is None or not (value > high or (self.high_open and value == high))

    @staticmethod
    def _shown(x: float | None) -> str | None:
        """A whole limit in full (4294967295, not 4.29497e+09), any other short (1e-08)."""
        return None if x is None else str(int(x)) if float(x).is_integer() else f"{x:g}"

    def describe(self, integer: bool, flat: dict[str, Any]) -> str:
        if self.text:
            return self.text
        noun = "an integer" if integer else "a number"
        low, high = (self._shown(x) for x in (self.low, self.high))  # a high_key is worded after the range
        if low is not None and high is not None:
            text = f"{noun} in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        elif low is not None:
            text = f"{noun} {'>' if self.low_open else '>='} {low}"
        elif high is not None:
            text = f"{noun} {'<' if self.high_open else '<='} {high}"
        else:
            text = noun
        if self.high_key:
            offset = f" + {self.high_offset}" if self.high_offset else ""
            text += f" and at most {self.high_key}{offset} ({flat[self.high_key] + self.high_offset})"
        return text


POSITIVE = Bound(low=1)
_COUNT = Bound(low=0)
UNIT_OPEN = Bound(low=0, high=1, high_open=True)  # a rate that must stay below 1 (nn.Dropout(1) zeroes everything)
_FRACTION = Bound(low=0, high=0.5, low_open=True, high_open=True, text="a fraction in (0, 0.5)")

BOUNDS: dict[str, Bound] = {
    "data.context": POSITIVE,
    "data.val_fraction": _FRACTION,
    "data.test_fraction": _FRACTION,
    # a model kind's own keys are bounded in its Config's field metadata (charlm/models/*.py)
    # the n-gram reads mix_order - 1 characters: no more than the network's context; 10 keeps
    # V ** order inside 64-bit ids for the usual alphabets (checked against the corpus too)
    "model.mix_order": Bound(low=0, high=10, high_key="data.context", high_offset=1),
    "train.threads": _COUNT,
    "train.seed": Bound(low=0, high=2**32 - 1),  # numpy and torch generators both take it
    "train.batch_size": POSITIVE,
    "train.lr": Bound(low=0, low_open=True),
    "train.min_lr_ratio": Bound(low=0, high=1),
    "train.decay_fraction": Bound(low=0, high=1, low_open=True),
    "train.warmup_steps": _COUNT,
    "train.weight_decay": Bound(low=0),
    "train.beta1": UNIT_OPEN,  # AdamW refuses 1.0
    "train.beta2": UNIT_OPEN,
    "train.grad_clip": Bound(low=0),
    "train.max_steps": POSITIVE,
    "train.max_minutes": Bound(low=0),
    "train.validation_interval": POSITIVE,
    "train.patience": _COUNT,
    "train.min_relative_improvement": UNIT_OPEN,
    # an evaluation scores at least 2 characters; 0 means all of val
    "train.eval_chars": Bound(low=2, also=(0,), text="0 (all of val) or an integer >= 2"),
    "train.eval_stride": Bound(low=0, high_key="data.context"),
    "train.eval_batch_size": POSITIVE,
    "train.sample_chars": _COUNT,
}

# Keys that are text: what each must be (data.path is checked when the corpus is read).
TEXTS: dict[str, str] = {
    "data.path": "a path to a UTF-8 text file ('' = tiny shakespeare)",
    "experiment": "a non-empty MLflow experiment name",
    "name": "a run name ('' = the file's name)",
}
