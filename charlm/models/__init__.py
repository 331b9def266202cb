"""Model registry: ``model.kind`` -> class, each a CharModel (models/base.py) built from
(ModelConfig, vocab_size, context), so nothing else branches on kind."""

from __future__ import annotations

import torch
import torch.nn as nn

from charlm.config import Config, ConfigError
from charlm.models.ff import FeedForward
from charlm.models.gpt import GPT
from charlm.models.mixture import Mixture
from charlm.models.ngram import NGram

REGISTRY: dict[str, type[nn.Module]] = {"gpt": GPT, "ff": FeedForward, "ngram": NGram}


def build_model(cfg: Config, vocab_size: int) -> nn.Module:
    model = REGISTRY[cfg.model.kind](cfg.model, vocab_size, cfg.data.context)
    if cfg.model.mix_order:  # the n-gram reads mix_order - 1 characters of history
        return Mixture(model, NGram(cfg.model, vocab_size, cfg.model.mix_order - 1))
    return model


def check_corpus_fit(cfg: Config, vocab_size: int) -> None:
    """Refuse, before any run starts, an n-gram whose ids overflow 64 bits over this alphabet."""
    orders = [("data.context", cfg.data.context + 1, 1)] if cfg.model.kind == "ngram" else []
    if cfg.model.mix_order:
        orders.append(("model.mix_order", cfg.model.mix_order, 0))
    for key, order, offset in orders:
        if vocab_size ** order >= 2**63:
            top = next(k for k in range(order, 0, -1) if vocab_size ** k < 2**63)
            raise ConfigError(f"Config key '{key}' gives an n-gram of order {order} over the corpus's "
                              f"{vocab_size} characters, whose ids overflow 64 bits; expected {key} <= {top - offset}")


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def generate(model: nn.Module, idx: torch.Tensor, n: int, temperature: float = 1.0,
             top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Append ``n`` sampled ids to ``idx`` (B, T), feeding at most the model's context back in."""
    was_training = model.training
    model.eval()
    for _ in range(n):
        logits, _ = model(idx[:, -model.context:])
        logits = logits[:, -1, :].float()
        if temperature <= 0:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
        idx = torch.cat([idx, nxt], dim=1)
    model.train(was_training)
    return idx
