"""Interpolated Kneser-Ney over characters: the count-based floor a neural model must beat.

Order = ``data.context + 1`` (a 6-gram reads 5 characters). Nothing is learned by gradient:
``fit(train_ids)`` counts once, and ``forward`` obeys the shared contract, so the same full-pass
evaluation, checkpoints and MLflow logging apply. Discounts are estimated per order from the
counts (D = n1 / (n1 + 2 n2)); lower orders use continuation counts, as Kneser and Ney prescribe.

    P_k(w | h) = max(c(h, w) - D_k, 0) / c(h) + D_k * N1+(h .) / c(h) * P_{k-1}(w | h')

with h' the context h without its oldest character, P_0 uniform, and P_k = P_{k-1} for an
unseen context h. The sparse counts are buffers, so they travel in the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from charlm.models.base import CharModel, KindConfig

EVAL_CHUNK = 2048


@dataclass(frozen=True)
class NGramConfig(KindConfig):
    """No hyperparameters of its own: its order is data.context + 1 (or a mixture's model.mix_order)."""


class NGram(CharModel):
    Config = NGramConfig

    def __init__(self, cfg: NGramConfig, vocab_size: int, context: int):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.context = context  # characters of history; order = context + 1
        self.max_len = None
        for k in range(context + 1):  # k = history length of the table
            # persisted: the distinct (k+1)-grams as base-V ids and their (continuation) counts,
            # a few MB even for an 8-gram; the dense lookup tables are rebuilt from them on load
            self.register_buffer(f"grams{k}", torch.zeros(0, dtype=torch.int64))
            self.register_buffer(f"gcounts{k}", torch.zeros(0, dtype=torch.int32))
            self.register_buffer(f"discount{k}", torch.zeros(()))
        self._tables: list[tuple[np.ndarray, np.ndarray]] = []  # per k: (history keys, counts[key, next])

    @property
    def order(self) -> int:
        return self.context + 1

    def fit(self, ids: torch.Tensor) -> None:
        """Count every (history, next) pair of the training ids."""
        V = self.vocab_size
        x = ids.long().numpy()
        n = len(x)
        if V ** self.order >= 2**63:
            from charlm.errors import CharlmError

            raise CharlmError(f"An n-gram of order {self.order} over {V} symbols overflows 64-bit ids; "
                              "use a smaller data.context for model.kind=ngram")
        grams = np.zeros(0, dtype=np.int64)  # unique (k+2)-grams of the order above, as base-V ids
        for k in range(self.context, -1, -1):  # highest order first: lower ones need its types
            if k == self.context:  # raw counts at the top order
                g = np.zeros(n - k, dtype=np.int64)
                for j in range(k + 1):
                    g = g * V + x[j:n - k + j]
                uniq, cnt = np.unique(g, return_counts=True)
            else:  # continuation counts: distinct characters seen before each (k+1)-gram
                uniq, cnt = np.unique(grams % V ** (k + 1), return_counts=True)
            n1, n2 = (cnt == 1).sum(), (cnt == 2).sum()
            d = n1 / (n1 + 2 * n2) if n1 + 2 * n2 > 0 else 0.5
            setattr(self, f"grams{k}", torch.from_numpy(uniq))
            setattr(self, f"gcounts{k}", torch.from_numpy(cnt.astype(np.int32)))
            setattr(self, f"discount{k}", torch.tensor(float(min(max(d, 0.05), 0.95))))
            grams = uniq
        self._build_tables()

    def _build_tables(self) -> None:
        """Dense (history, next) count tables from the persisted sparse counts, for fast lookup."""
        V = self.vocab_size
        self._tables = []
        for k in range(self.context + 1):
            uniq = getattr(self, f"grams{k}").numpy()
            keys, rows = np.unique(uniq // V, return_inverse=True)
            table = np.zeros((len(keys), V), dtype=np.float32)
            table[rows, uniq % V] = getattr(self, f"gcounts{k}").numpy()
            self._tables.append((keys, table))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # tables are sized by the data, so take them whole instead of copying into empty buffers
        for name in list(self._buffers):
            if prefix + name in state_dict:
                self._buffers[name] = state_dict[prefix + name].clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._build_tables()

    def forward(self, idx, targets=None):
        B, T = idx.shape
        V = self.vocab_size
        x = idx.detach().cpu().long().numpy()
        probs = np.full((B, T, V), 1.0 / V)
        history = np.zeros((B, T), dtype=np.int64)  # base-V id of the last k characters
        for k in range(self.context + 1):
            if k > T:  # no position in so short a sequence has k characters of history
                break
            if k > 0:  # extend each history by one older character
                older = np.zeros((B, T), dtype=np.int64)
                older[:, k - 1:] = x[:, : T - k + 1]
                history = history + older * V ** (k - 1)
            keys, table = self._tables[k] if self._tables else (np.zeros(0, dtype=np.int64), None)
            d = float(getattr(self, f"discount{k}"))
            if len(keys) == 0:
                continue
            valid = np.zeros((B, T), dtype=bool)
            valid[:, k - 1 if k else 0:] = True  # position t has t + 1 characters of history
            rows = np.searchsorted(keys, history).clip(max=len(keys) - 1)
            seen = valid & (keys[rows] == history)
            c = table[rows[seen]].astype(np.float64)
            total = c.sum(axis=1, keepdims=True)
            types = (c > 0).sum(axis=1, keepdims=True)
            probs[seen] = (np.maximum(c - d, 0) + d * types * probs[seen]) / total
        logits = torch.from_numpy(np.log(probs)).float().to(idx.device)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, V), targets.reshape(-1))
        return logits, loss

    def eval_plan(self, stride: int) -> tuple[int, int]:
        return self.context - 1 + EVAL_CHUNK if self.context else EVAL_CHUNK, EVAL_CHUNK

    def flops_per_token(self, seq_len: int) -> float:
        return 0.0
