"""The contract every model obeys, built-in or a user's own (``model.kind: mypackage.mymodule:MyModel``).

A kind is a :class:`CharModel` subclass with:

- ``Config``: a frozen dataclass of its own hyperparameters. Its fields are the config keys
  ``model.<field>`` (in YAML, ``--set``, a sweep's space, MLflow params), checked like charlm's own:
  an unknown key gets a suggestion, a value of the wrong type or out of its range one line. A
  field's range is ``field(metadata={"bound": Bound(...)})`` (``charlm/bounds.py``) or its choices
  ``field(metadata={"choices": (...)})``; a check across fields is :meth:`KindConfig.problems`.
- ``__init__(self, cfg: Config, vocab_size: int, context: int)``.
- ``forward(idx, targets=None) -> (logits, loss)``: ``idx`` (B, T) ids, logits (B, T, vocab) where
  position t depends on ``idx[:, :t+1]`` only (``tests/test_models.py`` checks it for every kind),
  loss the mean cross-entropy when targets are given.
- ``context`` and ``max_len``, and the hooks below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn


@dataclass(frozen=True)
class KindConfig:
    """A base for a kind's ``Config`` (optional): ``problems`` checks values across its fields."""

    def problems(self) -> list[tuple[str, str, object]]:
        """``(field, what it must be, its value)`` for each value that breaks a rule across fields."""
        return []


class CharModel(nn.Module):
    Config: ClassVar[type] = KindConfig  # the kind's own hyperparameters: model.<field>
    context: int  # characters of history a prediction may read
    max_len: int | None  # longest input sequence; None = any

    def eval_plan(self, stride: int) -> tuple[int, int]:
        """(window, step) of the full pass (evaluate.py): windows of the whole context, each scoring
        its last ``step`` positions (default half the context), so each sees at least the rest."""
        return self.context, min(stride or max(1, self.context // 2), self.context)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (the plan's speed model, bench/speed.py): 6 x parameters by default."""
        return 6.0 * sum(p.numel() for p in self.parameters())

    def fit(self, ids: torch.Tensor) -> None:
        """Learn from the training ids in one pass before any step (count models); networks: nothing."""

    def calibrate(self, ids: torch.Tensor, **score_kw) -> float | None:
        """After training, fit on held-out ids what is fitted there (a mixture's weight); None: nothing."""
        return None
