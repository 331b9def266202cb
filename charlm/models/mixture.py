"""A neural model mixed with a Kneser-Ney n-gram: each character weighs three experts, the
network, the n-gram, and their normalised product (a log-linear blend of the two):

    p = w_net p_net + w_prod p_prod + w_ngram p_ngram,     p_prod ~ p_net^s1 * p_ngram^s2 (normalised)
    (w_net, w_prod, w_ngram) = softmax(z_net, z_prod, 0),  z = c0 + c1 H_net + c2 H_ngram

with H the entropy (nats) of each model's prediction at that character: the model that is unsure
there gets less weight. The two make different mistakes: the n-gram remembers every exact
8-character phrase of the training text (names, stock lines), the network generalises; where
both are half sure and agree only on the right character, their product is sure of it.
``model.mix_order: 8`` on any neural config builds this wrapper. It obeys the shared contract, so
training, evaluation, checkpoints and sampling treat it like any model:

- ``fit(train_ids)`` counts the n-gram (under a second) before training starts;
- training steps and intermediate evaluations see the network alone (``w_net`` starts at 1), so
  early stopping and pruning judge the network exactly as without the mixture;
- ``calibrate(val_ids)`` fits the gate (s1, s2 and the two experts' c0, c1, c2) to minimise the
  full-pass val loss, once, after training: first the best single weight of network against
  n-gram (a grid, then a finer grid), then the whole gate from there, kept only if not worse.
  Each design fitted on one half of val and scored on the other: ``python docs/mix_gate.py``
  (docs/REPORT.md section 8).

The gate is one buffer of 8 numbers: ``[s1, s2, c0, c1, c2 (network), c0, c1, c2 (product)]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from charlm.models.base import CharModel
from charlm.models.ngram import NGram

EXPONENTS, NET, PRODUCT = slice(0, 2), slice(2, 5), slice(5, 8)  # the gate's parts: s1 s2, then c0 c1 c2 twice


class Mixture(CharModel):
    def __init__(self, neural: nn.Module, ngram: NGram):
        super().__init__()
        self.neural = neural
        self.ngram = ngram
        self.context = neural.context
        self.max_len = neural.max_len
        self.register_buffer("gate", constant_gate(1.0))  # the network alone

    def set_weight(self, w: float) -> None:
        """One weight for every character: 1 = the network alone, 0 = the n-gram alone."""
        self.gate.copy_(constant_gate(w))

    def fit(self, ids: torch.Tensor) -> None:
        self.ngram.fit(ids)

    def forward(self, idx, targets=None):
        if self.training or self.gate[NET][0] == math.inf:  # the network alone; see the module docstring
            return self.neural(idx, targets)
        a = F.log_softmax(self.neural(idx)[0].float(), dim=-1)
        b = self.ngram(idx)[0]  # the n-gram's logits are its log-probabilities
        logits = mixed_logprobs(self.gate.to(a.device), a, b)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def calibrate(self, ids: torch.Tensor, **score_kw) -> float:
        """Fit the gate to minimise the full-pass loss on ``ids`` (held-out text); return the mean
        weight of the network over its characters."""
        from charlm.evaluate import per_char

        a, b, y = split_parts(per_char(self, ids, _parts, **score_kw))  # on the CPU
        gate = fit_gate(a, b, y)
        self.gate.copy_(gate)  # the buffer lives on the model's device (a GPU's, in a CUDA run)
        return float(_log_weights(gate, entropy(a), entropy(b))[..., 0].exp().mean())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        w = state_dict.pop(prefix + "weight", None)
        if w is not None:  # saved before the gate: one weight for every character
            state_dict[prefix + "gate"] = constant_gate(float(w))
        old = state_dict.get(prefix + "gate")
        if old is not None and old.shape == (3,):  # saved before the product: network against n-gram
            gate = constant_gate(1.0 if old[0] == math.inf else 0.5)
            gate[NET] = old
            state_dict[prefix + "gate"] = gate
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def eval_plan(self, stride: int) -> tuple[int, int]:
        return self.neural.eval_plan(stride)

    def flops_per_token(self, seq_len: int) -> float:
        return self.neural.flops_per_token(seq_len)


def constant_gate(w: float) -> torch.Tensor:
    """The gate that gives every character the weight ``w`` on the network and ``1 - w`` on the
    n-gram, none on their product (1 and 0 exactly, as +-inf)."""
    c0 = math.inf if w >= 1 else -math.inf if w <= 0 else math.log(w / (1 - w))
    return torch.tensor([0.0, 0.0, c0, 0.0, 0.0, -math.inf, 0.0, 0.0], dtype=torch.float64)


def entropy(logp: torch.Tensor) -> torch.Tensor:
    return -(logp.exp() * logp.clamp(min=-1e4)).sum(-1)


def _log_weights(gate, ha, hb) -> torch.Tensor:
    """log (w_net, w_prod, w_ngram) at each character, in the last dimension (exact at 0 and 1)."""
    def logit(c):  # an infinite c0 is a constant weight: no entropy term (inf * 0 would be NaN)
        return c[0] + c[1] * ha + c[2] * hb if torch.isfinite(c[0].detach()) else torch.full_like(ha, float(c[0].detach()))

    z = torch.stack([logit(gate[NET]), logit(gate[PRODUCT]), torch.zeros_like(ha)], -1)
    if z[..., 0].isposinf().any():
        return torch.where(z.isposinf(), 0.0, -math.inf)
    return F.log_softmax(z, -1)


def mixed_logprobs(gate, a, b, entropies: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The mixture's log-probabilities from the network's (``a``) and the n-gram's (``b``);
    ``entropies``: theirs, when already computed (a fit evaluates many gates on the same ``a``, ``b``)."""
    log_w = _log_weights(gate, *(entropies or (entropy(a), entropy(b))))
    s1, s2 = gate[EXPONENTS]
    product = F.log_softmax(s1 * a + s2 * b, -1)
    experts = torch.stack([a, product, b], -2)  # (..., 3, V)
    return torch.logsumexp(experts + log_w.unsqueeze(-1), -2)


def _parts(model: Mixture, x, y) -> torch.Tensor:
    """Per character: the network's and the n-gram's log-probabilities of every character, then
    the character's id (read back by :func:`split_parts`)."""
    a = F.log_softmax(model.neural(x)[0].float(), dim=-1)
    return torch.cat([a, model.ngram(x)[0], y.unsqueeze(-1).to(a.dtype)], -1)


def split_parts(parts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    V = parts.shape[-1] // 2
    return parts[..., :V], parts[..., V:2 * V], parts[..., -1].long()


def picked(logp: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The log-probability each row gives its character ``y``."""
    return logp.gather(-1, y.unsqueeze(-1))[..., 0]


def mixed_loss(gate, a, b, y, entropies=None) -> torch.Tensor:
    return -picked(mixed_logprobs(gate, a, b, entropies), y).mean()


def best_weight(a: torch.Tensor, b: torch.Tensor) -> float:
    """The single ``w`` in (0, 1) that minimises the mean of -log(w e^a + (1 - w) e^b), given each
    model's log-probability of the right character."""
    def loss(w: float) -> float:
        return -float(torch.logaddexp(a + math.log(w), b + math.log1p(-w)).mean())

    best = min((i / 50 for i in range(1, 50)), key=loss)
    return min((best + i / 1000 for i in range(-20, 21) if 0 < best + i / 1000 < 1), key=loss)


def one_weight(a, b, y) -> torch.Tensor:
    """The constant gate of the best single weight, from each model's log-probabilities and ``y``."""
    return constant_gate(best_weight(picked(a, y), picked(b, y)))


def fit_gate(a, b, y, product: bool = True) -> torch.Tensor:
    """The gate minimising the mixed loss, from the best single weight (never worse than it).
    ``product=False``: network against n-gram only (the product keeps no weight)."""
    start, entropies = one_weight(a, b, y), (entropy(a), entropy(b))
    init, free = start.clone(), list(range(8)) if product else list(range(8))[NET]
    if product:  # the product starts level with the n-gram, each model's probability square-rooted
        init[EXPONENTS], init[PRODUCT.start] = 0.5, 0.0
    theta = init[free].clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], max_iter=100, line_search_fn="strong_wolfe")

    def gate_of(values):
        g = init.clone()
        g[free] = values
        return g

    def closure():
        opt.zero_grad()
        loss = mixed_loss(gate_of(theta), a, b, y, entropies)
        loss.backward()
        return loss

    opt.step(closure)
    gate = gate_of(theta.detach())
    better = torch.isfinite(gate[free]).all() and mixed_loss(gate, a, b, y, entropies) <= mixed_loss(start, a, b, y, entropies)
    return gate if better else start
