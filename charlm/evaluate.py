"""The evaluation protocol, the same for every model.

Loss is the mean negative log-likelihood in nats per character over every character of a text
after the first, each scored exactly once with as much preceding context as the model's window
allows (``model.eval_plan``). The window layout is fixed by the text length and the plan alone,
so the same weights always give the same number.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class EvalResult:
    loss: float  # nats per character
    chars: int  # characters scored

    @property
    def bpc(self) -> float:
        return self.loss / math.log(2)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf

    def as_dict(self) -> dict:
        return {"loss": self.loss, "bpc": self.bpc, "perplexity": self.perplexity, "chars": self.chars}


def windows(n: int, window: int, stride: int) -> list[tuple[int, int]]:
    """``(start, n_scored)`` for each window over a text of ``n`` ids.

    Every window has the same length ``L = min(window, n - 1)`` (so windows batch together) and
    scores its last ``n_scored`` targets; the first scores all of its targets, the last is shifted
    to end at the text's end. Targets ``1 .. n-1`` are each scored exactly once.
    """
    L = min(window, n - 1)
    out = [(0, L)]
    covered = L  # highest target index scored so far
    while covered < n - 1:
        end = min(covered + stride, n - 1)
        out.append((end - L, end - covered))
        covered = end
    return out


def _target_logprobs(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits, _ = model(x)
    return F.log_softmax(logits.float(), dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


def char_logprobs(model, data: torch.Tensor, stride: int = 0, batch_size: int = 32,
                  device: str = "cpu", autocast: torch.autocast | None = None) -> torch.Tensor:
    """log p(data[i] | what precedes it) for i = 1 .. n-1 under the protocol above (float64).
    Summed it is the full pass; kept per character it lets two models be interpolated."""
    return per_char(model, data, _target_logprobs, stride, batch_size, device, autocast)


@torch.no_grad()
def per_char(model, data: torch.Tensor, score, stride: int = 0, batch_size: int = 32,
             device: str = "cpu", autocast: torch.autocast | None = None) -> torch.Tensor:
    """``score(model, x, y) -> (B, T, ...)`` for every character i = 1 .. n-1 of ``data``, each
    taken from the one window position that scores it under the protocol above (float64)."""
    n = len(data)
    if n < 2:
        raise ValueError("need at least 2 characters to score one")
    window, step = model.eval_plan(stride)
    plan = windows(n, window, step)
    L = min(window, n - 1)
    data = data.long()
    offsets = torch.arange(L + 1)
    out = None
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(plan), batch_size):
            chunk = plan[i:i + batch_size]
            starts = torch.tensor([s for s, _ in chunk])
            seq = data[starts[:, None] + offsets].to(device)
            x, y = seq[:, :-1], seq[:, 1:]
            with autocast or contextlib.nullcontext():
                values = score(model, x, y).double().cpu()
            if out is None:
                out = torch.empty((n - 1, *values.shape[2:]), dtype=torch.float64)
            for row, (s, k) in enumerate(chunk):
                # window row covers targets s+1 .. s+L; its last k are scored (target j -> out[j-1])
                out[s + L - k:s + L] = values[row, L - k:]
    finally:
        model.train(was_training)
    return out


def full_pass(model, data: torch.Tensor, stride: int = 0, batch_size: int = 32,
              device: str = "cpu", autocast: torch.autocast | None = None) -> EvalResult:
    """Score ``data`` (1-D ids) under the protocol above. fp32 unless ``autocast`` is given."""
    lp = char_logprobs(model, data, stride, batch_size, device, autocast)
    return EvalResult(loss=-float(lp.sum()) / len(lp), chars=len(lp))
