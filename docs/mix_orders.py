"""Which n-gram order to mix with the network, chosen on val only (docs/REPORT.md section 7).

    python docs/mix_orders.py [--model mlruns/best/default] [--orders 5 6 8 10]

Takes a saved mixture (``make best``'s model), keeps its network, counts a Kneser-Ney n-gram of
each order on the model's own training split and prints, on its val split, the n-gram alone and
the mixture through the shipped gate, each half of val scored with the gate fitted on the other
(two-fold, as ``docs/mix_gate.py``). The test split is never read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mix_gate import two_fold  # noqa: E402

from charlm import checkpoint  # noqa: E402
from charlm.data import load_corpus  # noqa: E402
from charlm.evaluate import per_char  # noqa: E402
from charlm.models.mixture import Mixture, _parts, fit_gate, picked, split_parts  # noqa: E402
from charlm.models.ngram import NGram  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mlruns/best/default", help="a saved mixture (default mlruns/best/default)")
    ap.add_argument("--orders", type=int, nargs="+", default=[5, 6, 8, 10])
    args = ap.parse_args()
    ck = checkpoint.load(args.model, "cpu")
    if not isinstance(ck.model, Mixture):
        raise SystemExit(f"{args.model} is not a mixture (model.mix_order = 0)")
    corpus, t = load_corpus(ck.cfg.data), ck.cfg.train
    print(f"val split: {len(corpus.val):,} characters")
    print("| n-gram order mixed in | n-gram alone | mixed, first half | mixed, second half | mixed, mean |\n|---|---|---|---|---|")
    for order in args.orders:
        mix = Mixture(ck.model.neural, NGram(NGram.Config(), len(corpus.vocab), order - 1)).eval()
        mix.fit(corpus.train)
        a, b, y = split_parts(per_char(mix, corpus.val, _parts, t.eval_stride, t.eval_batch_size, "cpu"))
        one, two = two_fold(a, b, y, fit_gate)
        alone = -float(picked(b, y).mean())
        print(f"| {order} | {alone:.4f} | {one:.4f} | {two:.4f} | {(one + two) / 2:.4f} |")


if __name__ == "__main__":
    main()
