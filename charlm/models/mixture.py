"""A neural model interpolated with a Kneser-Ney n-gram: p = w * p_neural + (1 - w) * p_ngram.

The two make different mistakes: the n-gram remembers every exact 8-character phrase of the
training text (names, stock lines), the network generalises. ``model.mix_order: 8`` on any neural
config builds this wrapper. It obeys the shared contract, so training, evaluation, checkpoints and
sampling treat it like any model:

- ``fit(train_ids)`` counts the n-gram (under a second) before training starts;
- training steps and intermediate evaluations see the network alone (``weight`` starts at 1), so
  early stopping and pruning judge the network exactly as without the mixture;
- ``calibrate(val_ids)`` sets ``weight`` to minimise the full-pass val loss (the loss is convex in
  ``w``; a grid then a finer grid finds it to 0.001), once, after training.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from charlm.models.base import CharModel
from charlm.models.ngram import NGram


class Mixture(CharModel):
    def __init__(self, neural: nn.Module, ngram: NGram):
        super().__init__()
        self.neural = neural
        self.ngram = ngram
        self.context = neural.context
        self.max_len = neural.max_len
        self.register_buffer("weight", torch.tensor(1.0, dtype=torch.float64))  # 1 = network only

    def fit(self, ids: torch.Tensor) -> None:
        self.ngram.fit(ids)

    def forward(self, idx, targets=None):
        w = float(self.weight)
        if self.training or w >= 1.0:  # the network learns on its own; see the module docstring
            return self.neural(idx, targets)
        a = F.log_softmax(self.neural(idx)[0].float(), dim=-1)
        b = F.log_softmax(self.ngram(idx)[0].float(), dim=-1)
        logits = torch.logaddexp(a + math.log(w), b + math.log1p(-w)) if w > 0 else b
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def calibrate(self, ids: torch.Tensor, **score_kw) -> float:
        """Set and return the weight that minimises the full-pass loss on ``ids`` (held-out text)."""
        from charlm.evaluate import char_logprobs

        self.weight.fill_(1.0)
        a = char_logprobs(self, ids, **score_kw)
        self.weight.fill_(0.0)
        b = char_logprobs(self, ids, **score_kw)

        def loss(w: float) -> float:
            return -float(torch.logaddexp(a + math.log(w), b + math.log1p(-w)).mean())

        best = min((i / 50 for i in range(1, 50)), key=loss)
        best = min((best + i / 1000 for i in range(-20, 21) if 0 < best + i / 1000 < 1), key=loss)
        self.weight.fill_(best)
        return best

    def eval_plan(self, stride: int) -> tuple[int, int]:
        return self.neural.eval_plan(stride)

    def flops_per_token(self, seq_len: int) -> float:
        return self.neural.flops_per_token(seq_len)
