"""A small causal transformer in the minGPT/nanoGPT mould: pre-LayerNorm blocks, fused attention."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from charlm.bounds import POSITIVE, UNIT_OPEN
from charlm.models.base import CharModel, KindConfig


@dataclass(frozen=True)
class GPTConfig(KindConfig):
    n_embd: int = field(default=128, metadata={"bound": POSITIVE})  # width of character embeddings and of the residual stream
    n_layer: int = field(default=4, metadata={"bound": POSITIVE})  # transformer blocks
    n_head: int = field(default=4, metadata={"bound": POSITIVE})  # attention heads; must divide n_embd (problems)
    dropout: float = field(default=0.0, metadata={"bound": UNIT_OPEN})  # 1M characters overfit slowly at this size; sweeps tune it
    bias: bool = False  # biases in linear/LayerNorm layers; off is slightly faster, no worse
    tie_weights: bool = True  # share input embedding and output projection (fewer params)

    def problems(self) -> list[tuple[str, str, object]]:
        return [] if self.n_embd % self.n_head == 0 else [("n_head", f"a divisor of model.n_embd ({self.n_embd})",
                                                            self.n_head)]


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (torch's cannot drop it)."""

    def __init__(self, dim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = LayerNorm(cfg.n_embd, cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = LayerNorm(cfg.n_embd, cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(CharModel):
    Config = GPTConfig

    def __init__(self, cfg: GPTConfig, vocab_size: int, context: int):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.context = context  # longest sequence the positional table covers
        self.max_len = context  # forward() refuses longer inputs
        self.tok_emb = nn.Embedding(vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(context, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = LayerNorm(cfg.n_embd, cfg.bias)
        self.head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        if cfg.tie_weights:
            self.head.weight = self.tok_emb.weight
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):  # GPT-2: scale residual projections by depth
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        B, T = idx.shape
        if T > self.context:
            raise ValueError(f"sequence of {T} exceeds the model's context of {self.context}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def eval_plan(self, stride: int) -> tuple[int, int]:
        """(window, stride) for a full pass: windows of the whole context, each scoring its last
        ``stride`` positions, so every scored character sees at least context - stride before it."""
        s = stride or max(1, self.context // 2)
        return self.context, min(s, self.context)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B accounting."""
        n = sum(p.numel() for p in self.parameters()) - self.pos_emb.weight.numel()
        attn = 12 * self.cfg.n_layer * self.cfg.n_embd * seq_len
        return 6 * n + attn
