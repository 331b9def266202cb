"""The patience rule, written once and used twice.

An evaluation *improves* when ``loss < reference * (1 - min_relative_improvement)``. After
``patience`` consecutive evaluations that do not improve, stop.

* The trainer's early stop passes no reference: the reference is the last loss that counted as
  an improvement (as Keras' ``min_delta`` does), so a slow descent is credited once its gains
  since that point add up to the margin, and noise around a plateau is not.
* The sweep's pruner passes a reference taken from other trials at the same step (e.g. their
  median), so a trial gets ``patience`` chances to come within the margin of its peers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Patience:
    patience: int  # consecutive non-improving evaluations tolerated; 0 = never stop
    min_relative_improvement: float = 0.0
    anchor: float = math.inf  # the last loss that counted as an improvement (own reference)
    best: float = math.inf  # the lowest loss seen; the trainer keeps these weights
    best_step: int | None = None
    misses: int = 0  # consecutive evaluations that did not improve
    stopped_at: int | None = None  # the step at which patience ran out
    history: list[tuple[int, float]] = field(default_factory=list)

    def improves(self, loss: float, reference: float | None = None) -> bool:
        ref = self.anchor if reference is None else reference
        return math.isfinite(loss) and loss < ref * (1.0 - self.min_relative_improvement)

    def update(self, step: int, loss: float, reference: float | None = None) -> bool:
        """Record one evaluation; return True when patience has run out at this step."""
        self.history.append((step, loss))
        if self.improves(loss, reference):
            self.misses = 0
            if reference is None:
                self.anchor = loss
        else:
            self.misses += 1
        if math.isfinite(loss) and loss < self.best:
            self.best, self.best_step = loss, step
        if self.patience > 0 and self.misses >= self.patience and self.stopped_at is None:
            self.stopped_at = step
        return self.stopped_at is not None

    @property
    def should_stop(self) -> bool:
        return self.stopped_at is not None
