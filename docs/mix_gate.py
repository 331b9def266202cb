"""One mixing weight, a weight per character gated by the two models' entropies, or that gate over
three experts (the network, the n-gram, their normalised product)? Chosen on val only
(docs/REPORT.md section 8).

    python docs/mix_gate.py [--model mlruns/best/default]

Takes a saved mixture (``make best``'s model) and scores its val split once per part: the
network's and the n-gram's log-probabilities of every character. Each half of val then fits what
the other half is scored with (two-fold): one weight; the gate ``w = sigmoid(c0 + c1 H_network +
c2 H_ngram)`` of network against n-gram; and the shipped gate, which adds their product as a third
expert (charlm/models/mixture.py). The test split is never read.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from charlm import checkpoint  # noqa: E402
from charlm.data import load_corpus  # noqa: E402
from charlm.evaluate import per_char  # noqa: E402
from charlm.models.mixture import Mixture, _parts, fit_gate, mixed_loss, one_weight, picked, split_parts  # noqa: E402


def two_fold(a, b, y, fit) -> list[float]:
    """The mixed loss on each half of the characters, of the gate ``fit(a, b, y)`` makes from the other half."""
    first = torch.arange(len(y)) < len(y) // 2
    return [float(mixed_loss(fit(a[k], b[k], y[k]), a[~k], b[~k], y[~k])) for k in (~first, first)]



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mlruns/best/default", help="a saved mixture (default mlruns/best/default)")
    args = ap.parse_args()
    ck = checkpoint.load(args.model, "cpu")
    if not isinstance(ck.model, Mixture):
        raise SystemExit(f"{args.model} is not a mixture (model.mix_order = 0)")
    t = ck.cfg.train
    val = load_corpus(ck.cfg.data).val
    a, b, y = split_parts(per_char(ck.model, val, _parts, t.eval_stride, t.eval_batch_size, "cpu"))
    right = [picked(m, y) for m in (a, b)]
    designs = {"one weight": one_weight, "entropy gate, network against n-gram": partial(fit_gate, product=False),
               "entropy gate over network, n-gram and product": fit_gate}
    rows = {name: two_fold(a, b, y, fit) for name, fit in designs.items()}
    print(f"val split: {len(val):,} characters; network alone {-float(right[0].mean()):.4f}, "
          f"{ck.cfg.model.mix_order}-gram alone {-float(right[1].mean()):.4f}")
    print("| fitted on the other half | first half | second half | mean |\n|---|---|---|---|")
    for name, (one, two) in rows.items():
        print(f"| {name} | {one:.4f} | {two:.4f} | {(one + two) / 2:.4f} |")


if __name__ == "__main__":
    main()
