"""A neural model interpolated with a Kneser-Ney n-gram, each character with its own weight:

    p = w * p_neural + (1 - w) * p_ngram,   w = sigmoid(c0 + c1 * H_neural + c2 * H_ngram)

with H the entropy (nats) of each model's prediction at that character: the model that is unsure
there gets less weight. The two make different mistakes: the n-gram remembers every exact
8-character phrase of the training text (names, stock lines), the network generalises.
``model.mix_order: 8`` on any neural config builds this wrapper. It obeys the shared contract, so
training, evaluation, checkpoints and sampling treat it like any model:

- ``fit(train_ids)`` counts the n-gram (under a second) before training starts;
- training steps and intermediate evaluations see the network alone (``w`` starts at 1), so early
  stopping and pruning judge the network exactly as without the mixture;
- ``calibrate(val_ids)`` fits (c0, c1, c2) to minimise the full-pass val loss, once, after
  training: first the best single weight (a grid, then a finer grid), then the gate from there.
  The gate against one weight, each fitted on one half of val and scored on the other:
  ``python docs/mix_gate.py`` (docs/REPORT.md section 8).
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
        self.register_buffer("gate", torch.tensor([math.inf, 0.0, 0.0], dtype=torch.float64))  # w = 1

    def set_weight(self, w: float) -> None:
        """One weight for every character: 1 = the network alone, 0 = the n-gram alone."""
        self.gate.copy_(constant_gate(w))

    def fit(self, ids: torch.Tensor) -> None:
        self.ngram.fit(ids)

    def forward(self, idx, targets=None):
        if self.training or self.gate[0] == math.inf:  # the network alone; see the module docstring
            return self.neural(idx, targets)
        a = F.log_softmax(self.neural(idx)[0].float(), dim=-1)
        b = self.ngram(idx)[0]  # the n-gram's logits are its log-probabilities
        log_w, log_1w = _log_weights(self.gate.to(a.device), entropy(a), entropy(b))
        logits = torch.logaddexp(a + log_w.unsqueeze(-1), b + log_1w.unsqueeze(-1))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def calibrate(self, ids: torch.Tensor, **score_kw) -> float:
        """Fit the gate to minimise the full-pass loss on ``ids`` (held-out text); return the mean
        weight of the network over its characters."""
        from charlm.evaluate import per_char

        a, b, ha, hb = per_char(self, ids, _parts, **score_kw).unbind(-1)
        self.gate.copy_(fit_gate(a, b, ha, hb))
        return float(_log_weights(self.gate, ha, hb)[0].exp().mean())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        w = state_dict.pop(prefix + "weight", None)
        if w is not None:  # saved before the gate: one weight for every character
            self.set_weight(float(w))
            state_dict[prefix + "gate"] = self.gate.clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def eval_plan(self, stride: int) -> tuple[int, int]:
        return self.neural.eval_plan(stride)

    def flops_per_token(self, seq_len: int) -> float:
        return self.neural.flops_per_token(seq_len)


def constant_gate(w: float) -> torch.Tensor:
    """The gate that gives every character the weight ``w`` (1 and 0 exactly, as +-inf)."""
    c0 = math.inf if w >= 1 else -math.inf if w <= 0 else math.log(w / (1 - w))
    return torch.tensor([c0, 0.0, 0.0], dtype=torch.float64)


def entropy(logp: torch.Tensor) -> torch.Tensor:
    return -(logp.exp() * logp.clamp(min=-1e4)).sum(-1)


def _log_weights(gate, ha, hb) -> tuple[torch.Tensor, torch.Tensor]:
    """log w and log(1 - w) at each character (exact at w = 0 and 1)."""
    z = gate[0] + gate[1] * ha + gate[2] * hb if torch.isfinite(gate[0]) else gate[0].expand_as(ha)
    return F.logsigmoid(z), F.logsigmoid(-z)


def _parts(model: Mixture, x, y) -> torch.Tensor:
    """Per character: the network's and the n-gram's log-probability of it, and their entropies."""
    a = F.log_softmax(model.neural(x)[0].float(), dim=-1)
    b = model.ngram(x)[0]
    pick = y.unsqueeze(-1)
    return torch.stack([a.gather(-1, pick)[..., 0], b.gather(-1, pick)[..., 0], entropy(a), entropy(b)], -1)


def mixed_loss(gate, a, b, ha, hb) -> torch.Tensor:
    log_w, log_1w = _log_weights(gate, ha, hb)
    return -torch.logaddexp(a + log_w, b + log_1w).mean()


def best_weight(a: torch.Tensor, b: torch.Tensor) -> float:
    """The single ``w`` in (0, 1) that minimises the mean of -log(w e^a + (1 - w) e^b)."""
    def loss(w: float) -> float:
        return -float(torch.logaddexp(a + math.log(w), b + math.log1p(-w)).mean())

    best = min((i / 50 for i in range(1, 50)), key=loss)
    return min((best + i / 1000 for i in range(-20, 21) if 0 < best + i / 1000 < 1), key=loss)


def fit_gate(a, b, ha, hb) -> torch.Tensor:
    """(c0, c1, c2) minimising the mixed loss, from the best single weight (never worse than it)."""
    start = constant_gate(best_weight(a, b))
    gate = start.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([gate], max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = mixed_loss(gate, a, b, ha, hb)
        loss.backward()
        return loss

    opt.step(closure)
    gate = gate.detach()
    better = torch.isfinite(gate).all() and mixed_loss(gate, a, b, ha, hb) <= mixed_loss(start, a, b, ha, hb)
    return gate if better else start
