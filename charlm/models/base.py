"""The contract every model obeys, with the hooks the trainer calls on each of them.

``forward(idx, targets=None) -> (logits, loss)``: ``idx`` (B, T) ids, logits (B, T, vocab) where
position t depends on ``idx[:, :t+1]`` only, loss the mean cross-entropy when targets are given.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class CharModel(nn.Module):
    context: int  # characters of history a prediction may read
    max_len: int | None  # longest input sequence; None = any

    def eval_plan(self, stride: int) -> tuple[int, int]: ...  # (window, step) of the full pass (evaluate.py)
    def flops_per_token(self, seq_len: int) -> float: ...  # for bench/speed.py's FLOP/s

    def fit(self, ids: torch.Tensor) -> None:
        """Learn from the training ids in one pass before any step (count models); networks: nothing."""

    def calibrate(self, ids: torch.Tensor, **score_kw) -> float | None:
        """After training, fit on held-out ids what is fitted there (a mixture's weight); None: nothing."""
        return None
