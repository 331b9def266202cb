"""Which n-gram order to mix with the network, chosen on val only (docs/REPORT.md section 7).

    python docs/mix_orders.py [--model mlruns/best/default] [--orders 5 6 8 10]

Takes a saved mixture (``make best``'s model), keeps its network, counts a Kneser-Ney n-gram of
each order on the model's own training split, fits the mixing weight on its val split and prints
the val loss at that weight. The test split is never read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from charlm import checkpoint  # noqa: E402
from charlm.data import load_corpus  # noqa: E402
from charlm.evaluate import full_pass  # noqa: E402
from charlm.models.mixture import Mixture  # noqa: E402
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
    network = ck.model.neural
    print(f"val split: {len(corpus.val):,} characters; network alone: "
          f"{full_pass(network, corpus.val, t.eval_stride, t.eval_batch_size, 'cpu').loss:.4f}")
    print("| n-gram order mixed in | mean w (network) | val loss |\n|---|---|---|")
    for order in args.orders:
        mix = Mixture(network, NGram(ck.cfg.model, len(corpus.vocab), order - 1)).eval()
        mix.fit(corpus.train)
        w = mix.calibrate(corpus.val, stride=t.eval_stride, batch_size=t.eval_batch_size, device="cpu")
        print(f"| {order} | {w:.3f} | {full_pass(mix, corpus.val, t.eval_stride, t.eval_batch_size, 'cpu').loss:.4f} |")


if __name__ == "__main__":
    main()
