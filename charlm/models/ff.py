"""The original pipeline's feed-forward idea, done right.

The last ``context`` characters are embedded, concatenated and passed through ``layers`` hidden
layers with a GELU (the original used a Heaviside step, whose gradient is zero almost everywhere),
and the output is the distribution of the *next* character only. The original "fixed" model read
all 10 input characters and predicted every one of them, so each target was among its own inputs.

Here the window for position t is ``idx[t-context+1 .. t]`` (left-padded with a learned pad vector
at the start of a text), computed for every position at once: the first layer over a concatenated
window is exactly a 1-D convolution of kernel ``context`` over the embedded sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from charlm.bounds import POSITIVE, UNIT_OPEN
from charlm.models.base import CharModel, KindConfig

EVAL_CHUNK = 2048  # positions scored per full-pass window; any size gives the same numbers


@dataclass(frozen=True)
class FFConfig(KindConfig):
    n_embd: int = field(default=128, metadata={"bound": POSITIVE})  # width of each character's embedding (context of them per window)
    hidden: int = field(default=512, metadata={"bound": POSITIVE})  # width of each hidden layer
    layers: int = field(default=2, metadata={"bound": POSITIVE})  # hidden layers
    dropout: float = field(default=0.0, metadata={"bound": UNIT_OPEN})  # sweeps tune it
    bias: bool = False  # biases in the window and hidden layers; off is slightly faster, no worse


class FeedForward(CharModel):
    Config = FFConfig

    def __init__(self, cfg: FFConfig, vocab_size: int, context: int):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.context = context  # characters each prediction reads
        self.max_len = None  # any sequence length works: each position has its own window
        self.tok_emb = nn.Embedding(vocab_size + 1, cfg.n_embd)  # last row = padding before text start
        self.window = nn.Conv1d(cfg.n_embd, cfg.hidden, kernel_size=context, bias=cfg.bias)
        self.hidden = nn.ModuleList(
            nn.Linear(cfg.hidden, cfg.hidden, bias=cfg.bias) for _ in range(cfg.layers - 1)
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.ln_f = nn.LayerNorm(cfg.hidden, bias=cfg.bias)
        self.head = nn.Linear(cfg.hidden, vocab_size, bias=True)
        nn.init.normal_(self.tok_emb.weight, std=0.02 * (cfg.n_embd ** 0.5))
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, idx, targets=None):
        B, T = idx.shape
        pad = torch.full((B, self.context - 1), self.vocab_size, dtype=idx.dtype, device=idx.device)
        x = self.tok_emb(torch.cat([pad, idx], dim=1))  # (B, T+c-1, E)
        h = self.window(x.transpose(1, 2)).transpose(1, 2)  # (B, T, H): one window per position
        h = self.drop(F.gelu(h))
        for layer in self.hidden:
            h = self.drop(F.gelu(layer(h)))
        logits = self.head(self.ln_f(h))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def eval_plan(self, stride: int) -> tuple[int, int]:
        """Every scored position gets its full window: windows overlap by context - 1."""
        return self.context - 1 + EVAL_CHUNK, EVAL_CHUNK

    def flops_per_token(self, seq_len: int) -> float:
        n = sum(p.numel() for p in self.parameters()) - self.tok_emb.weight.numel()
        return 6 * n
