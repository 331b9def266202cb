"""A model of your own, outside charlm: a stack of dilated causal convolutions (WaveNet-style).

charlm runs it like its built-in kinds: name it from YAML or the command line as
``model.kind: examples.my_model:MyModel`` (importable from the folder you run in, or installed),
and its own keys (``model.channels``, ``model.kernel``, ``model.depth``) work in ``--set``, in a
sweep's space, in MLflow's params, and are checked like charlm's own: a misspelt key gets a
suggestion, a value out of range one line.

    python -m charlm train experiments/gpt.yaml --set model.kind=examples.my_model:MyModel model.depth=3
    python -m charlm sweep examples/my_model.yaml

The contract (charlm/models/base.py): a CharModel subclass with a frozen dataclass ``Config``,
built as ``MyModel(cfg, vocab_size, context)``, whose ``forward(idx, targets)`` returns
``(logits, loss)`` with position t reading ids up to t only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn
import torch.nn.functional as F

from charlm.bounds import Bound
from charlm.models.base import CharModel, KindConfig


@dataclass(frozen=True)
class MyConfig(KindConfig):
    channels: int = field(default=128, metadata={"bound": Bound(low=1)})  # width of every layer
    kernel: int = field(default=3, metadata={"bound": Bound(low=2, high=9)})  # taps of each causal convolution
    depth: int = field(default=4, metadata={"bound": Bound(low=1, high=10)})  # layers; layer i looks kernel-1 steps of 2**i back
    dropout: float = field(default=0.0, metadata={"bound": Bound(low=0, high=1, high_open=True)})


class MyModel(CharModel):
    Config = MyConfig

    def __init__(self, cfg: MyConfig, vocab_size: int, context: int):
        super().__init__()
        self.context, self.max_len = context, None
        self.embed = nn.Embedding(vocab_size, cfg.channels)
        self.convs = nn.ModuleList(nn.Conv1d(cfg.channels, cfg.channels, cfg.kernel, dilation=2**i)
                                   for i in range(cfg.depth))
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.channels, vocab_size)

    def forward(self, idx, targets=None):
        x = self.embed(idx).transpose(1, 2)  # (B, C, T)
        for conv in self.convs:
            pad = (conv.kernel_size[0] - 1) * conv.dilation[0]  # on the left only: position t never sees t+1
            x = x + self.drop(F.gelu(conv(F.pad(x, (pad, 0)))))
        logits = self.head(x.transpose(1, 2))
        loss = None if targets is None else F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1))
        return logits, loss
