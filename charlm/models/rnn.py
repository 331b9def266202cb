"""A recurrent character model: char-rnn's LSTM (Karpathy, 2015, on this very corpus), or a GRU.

Written against the public model contract only (``charlm/models/base.py``, ``charlm/bounds.py``),
as a user's own kind in their own file would be: its hyperparameters are its own frozen ``Config``,
their ranges field metadata. Trained with truncated backprop through time over ``data.context``:
every training window starts from a zero state, so gradients reach back at most ``context``
characters and position t reads ids up to t only. The full pass scores windows of ``context``
characters like the GPT's, each from a zero state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn
import torch.nn.functional as F

from charlm.bounds import Bound
from charlm.models.base import CharModel, KindConfig


@dataclass(frozen=True)
class RNNConfig(KindConfig):
    cell: str = field(default="lstm", metadata={"choices": ("lstm", "gru")})  # lstm (char-rnn's) | gru: 3/4 of its weights
    n_embd: int = field(default=64, metadata={"bound": Bound(low=1)})  # width of the character embedding fed to the cell
    hidden: int = field(default=512, metadata={"bound": Bound(low=1)})  # width of each recurrent layer's state
    layers: int = field(default=2, metadata={"bound": Bound(low=1)})  # stacked recurrent layers (char-rnn: 2 or 3)
    dropout: float = field(default=0.0, metadata={"bound": Bound(low=0, high=1, high_open=True)})  # between layers and before the head


class RNN(CharModel):
    Config = RNNConfig

    def __init__(self, cfg: RNNConfig, vocab_size: int, context: int):
        super().__init__()
        self.cfg = cfg
        self.context = context  # the truncation: the longest history a prediction reads
        self.max_len = None  # any length runs; training and the full pass use windows of context
        self.tok_emb = nn.Embedding(vocab_size, cfg.n_embd)
        cell = nn.LSTM if cfg.cell == "lstm" else nn.GRU
        self.rnn = cell(cfg.n_embd, cfg.hidden, num_layers=cfg.layers, batch_first=True,
                        dropout=cfg.dropout if cfg.layers > 1 else 0.0)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.hidden, vocab_size)

    def forward(self, idx, targets=None):
        h, _ = self.rnn(self.tok_emb(idx))  # (B, T, hidden), from a zero state
        logits = self.head(self.drop(h))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss
