"""Model registry: ``model.kind`` -> its class, a CharModel (models/base.py) built from (its own
Config, vocab_size, context), so nothing else branches on kind. A kind is a built-in name or a
plugin's import path, ``module:Class`` (a user's own file or package, importable from here)."""

from __future__ import annotations

import dataclasses
import functools
import importlib

import torch
import torch.nn as nn

from charlm.config import Config, ConfigError
from charlm.models.base import CharModel
from charlm.models.mixture import Mixture
from charlm.models.ngram import NGram

BUILTIN = {"gpt": "charlm.models.gpt:GPT", "ff": "charlm.models.ff:FeedForward", "ngram": "charlm.models.ngram:NGram",
           "rnn": "charlm.models.rnn:RNN"}


@functools.cache
def kind_class(kind: str) -> type[CharModel]:
    """``model.kind`` -> its class; one line naming the module or the class where it cannot be used."""
    path = BUILTIN.get(kind, kind)
    module, sep, name = path.partition(":")
    if not (sep and module and name):
        raise ConfigError(f"Model kind {kind!r} is neither a built-in kind ({' | '.join(BUILTIN)}) nor a plugin's "
                          "import path module:Class")
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 -- a user's module may raise anything on import
        raise ConfigError(f"Model kind {kind!r}: module '{module}' does not import ({type(e).__name__}: {e}); "
                          "run from the folder that holds it, or install it") from None
    cls = getattr(mod, name, None)
    if cls is None:
        raise ConfigError(f"Model kind {kind!r}: module '{module}' has no '{name}'")
    if not (isinstance(cls, type) and issubclass(cls, CharModel)):
        raise ConfigError(f"Model kind {kind!r} is not a CharModel: subclass charlm.models.base.CharModel")
    if not (dataclasses.is_dataclass(cls.Config) and cls.Config.__dataclass_params__.frozen):
        raise ConfigError(f"Model kind {kind!r}: its Config must be a frozen dataclass of its hyperparameters")
    for f in dataclasses.fields(cls.Config):  # what YAML, --set, a sweep space and MLflow params can hold
        if f.type not in ("int", "float", "str", "bool", int, float, str, bool):
            raise ConfigError(f"Model kind {kind!r}: its Config field '{f.name}' must be an int, float, str or bool, "
                              f"not {f.type}")
    return cls


def build_model(cfg: Config, vocab_size: int) -> nn.Module:
    model = kind_class(cfg.model.kind)(cfg.model.params, vocab_size, cfg.data.context)
    if cfg.model.mix_order:  # the n-gram reads mix_order - 1 characters of history
        return Mixture(model, NGram(NGram.Config(), vocab_size, cfg.model.mix_order - 1))
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
