"""The optimiser and its learning-rate schedule."""

from __future__ import annotations

import math

import torch

from charlm.config import Config


def lr_at(step: int, cfg: Config, elapsed: float = 0.0) -> float:
    """Learning rate for the update with 0-based index ``step``, ``elapsed`` seconds into training.

    1. linear warmup from 0 over ``warmup_steps`` (avoids early blow-ups with Adam);
    2. then decay to ``lr * min_lr_ratio`` along whichever budget runs out first: with
       ``max_minutes`` set, a run cut by the clock still ends at the low learning rate;
    3. ``wsd`` holds the peak until the last ``decay_fraction`` of the budget, then decays
       linearly: how far the run goes does not change its learning rate before that, so a
       partial run decayed from a copy (``Loop.preview``) is a fair preview of a longer one.
    """
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    floor = t.lr * t.min_lr_ratio
    progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    if t.max_minutes > 0:
        progress = max(progress, elapsed / (t.max_minutes * 60))
    progress = min(1.0, progress)
    if t.schedule == "cosine":
        return floor + 0.5 * (t.lr - floor) * (1 + math.cos(math.pi * progress))
    if t.schedule == "linear":
        return t.lr - (t.lr - floor) * progress
    if t.schedule == "wsd":
        return t.lr - (t.lr - floor) * max(0.0, progress - (1 - t.decay_fraction)) / t.decay_fraction
    return t.lr


def decayed(lr: float, floor: float, i: int, n: int) -> float:
    """Step ``i`` of a linear decay from ``lr`` to ``floor`` over ``n`` steps (a wsd decay started
    early: a rung's preview, or a run out of patience at its peak)."""
    return lr + (floor - lr) * min(i, n) / n


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only, never on biases or norms; fused where available."""
    seen: set[int] = set()
    decay, no_decay = [], []
    for p in model.parameters():  # tied weights appear once
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2))
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, TypeError):  # fused kernels absent for this device/dtype
        return torch.optim.AdamW(groups, foreach=True, **kw)
