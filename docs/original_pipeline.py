"""Reproduce the original take-home pipeline's faults and measure what each fix buys.

    python docs/original_pipeline.py [--steps 3000]

Same data (tiny shakespeare, contiguous 80/10/10), same shape as the original (10 characters in,
one hidden layer of 256, 16-wide embeddings), same seed and optimiser for every variant; only the
fault under study changes. Prints one table; docs/REPORT.md quotes it.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from charlm import config  # noqa: E402
from charlm.data import Batcher, load_corpus  # noqa: E402
from charlm.evaluate import full_pass  # noqa: E402
from charlm.stopping import Patience  # noqa: E402

CONTEXT, EMBD, HIDDEN = 10, 16, 256


class WindowMLP(nn.Module):
    """The original's shape. ``step_units``: Heaviside hidden units (x > 0), whose derivative is 0
    almost everywhere; ``sees_target``: the window ends at the character being predicted (the
    original "fixed" model's leak) instead of the one before it."""

    def __init__(self, vocab: int, step_units: bool, sees_target: bool):
        super().__init__()
        self.vocab_size, self.context, self.max_len = vocab, CONTEXT, None
        self.step_units, self.sees_target = step_units, sees_target
        self.emb = nn.Embedding(vocab + 1, EMBD)
        self.window = nn.Conv1d(EMBD, HIDDEN, CONTEXT)
        self.head = nn.Linear(HIDDEN, vocab)

    def forward(self, idx, targets=None):
        B, T = idx.shape
        seq = idx
        if self.sees_target:  # shift left: position t reads characters up to and including t + 1
            if targets is None:
                raise ValueError("the leaky model cannot predict without being shown the answer")
            seq = torch.cat([idx[:, 1:], targets[:, -1:]], dim=1)
        pad = torch.full((B, CONTEXT - 1), self.vocab_size, dtype=idx.dtype)
        h = self.window(self.emb(torch.cat([pad, seq], 1)).transpose(1, 2)).transpose(1, 2)
        h = (h > 0).float() if self.step_units else F.gelu(h)
        logits = self.head(h)
        loss = F.cross_entropy(logits.reshape(-1, self.vocab_size), targets.reshape(-1)) if targets is not None else None
        return logits, loss

    def eval_plan(self, stride):
        return CONTEXT - 1 + 2048, 2048


def zero_one(logits, targets):
    return (logits.argmax(-1) != targets).float().mean()


def run(name, corpus, steps, step_units=False, sees_target=False, loss_kind="ce", patience=0):
    torch.manual_seed(0)
    model = WindowMLP(len(corpus.vocab), step_units, sees_target)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    batches = Batcher(corpus.train, 64, 32, seed=0)
    val_slice = corpus.val[:16384]
    rule = Patience(patience, 0.0)
    moved = False
    t0 = time.perf_counter()
    done = steps
    for step in range(1, steps + 1):
        x, y = batches.next()
        logits, ce = model(x, y)
        loss = zero_one(logits, y) if loss_kind == "01" else ce
        opt.zero_grad()
        if loss.requires_grad:  # the 0-1 loss has no gradient at all: nothing to step on
            loss.backward()
            moved = moved or any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
            opt.step()
        if patience and step % 200 == 0:
            with torch.no_grad():
                model.eval()
                _, vl = model(val_slice[None, :-1].long(), val_slice[None, 1:].long())
                model.train()
            if rule.update(step, vl.item()):
                done = step
                break
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        if sees_target:  # only scoreable when handed the answer: the figure a leaky pipeline reports
            v = corpus.val.long()
            logits, vl = model(v[None, :-1], v[None, 1:])
            val, acc = vl.item(), (logits.argmax(-1) == v[None, 1:]).float().mean().item()
        else:
            val = full_pass(model, corpus.val).loss
            v = corpus.val.long()
            logits, _ = model(v[None, :-1])
            acc = (logits.argmax(-1) == v[None, 1:]).float().mean().item()
    return {"variant": name, "steps": done, "seconds": seconds, "val_loss": val, "val_acc": acc,
            "moved": moved or loss_kind != "01"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    corpus = load_corpus(config.DataConfig(context=CONTEXT))
    n = args.steps
    rows = [
        run("original: Heaviside units + 0-1 loss", corpus, n, step_units=True, loss_kind="01"),
        run("cross-entropy, Heaviside units", corpus, n, step_units=True),
        run("cross-entropy, GELU units (the fix)", corpus, n),
        run("GELU + CE, window sees its target", corpus, n, sees_target=True),
        run("the fix + patience 3 (early stop)", corpus, n * 3, patience=3),
        run(f"the fix, fixed {n * 3} steps", corpus, n * 3),
    ]
    print(f"uniform guess: {math.log(len(corpus.vocab)):.4f} nats/char")
    print(f"{'variant':<40}{'steps':>7}{'seconds':>9}{'val loss':>10}{'val acc':>9}")
    for r in rows:
        print(f"{r['variant']:<40}{r['steps']:>7}{r['seconds']:>9.1f}{r['val_loss']:>10.4f}{r['val_acc']:>9.1%}"
              + ("   (no gradient: weights never moved)" if not r["moved"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
