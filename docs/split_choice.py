"""How much of the text the retrain learns from, chosen on val only (docs/REPORT.md section 8).

    python docs/split_choice.py [--orders 6 10] [--models DIR ...]

The trials learn from the first 80% of the text; ``make best`` retrains on the first 89%
(``best.set: {data.val_fraction: 0.01}``). This counts a Kneser-Ney n-gram of each order on each
of the two training splits and scores both, full pass, on the 1% that neither learns from: the
retrain's val split, characters 89-90% of the text. ``--models`` scores saved networks there too
(``charlm train ... --set data.val_fraction=0.1`` or ``0.01``, then their ``--out`` folders). The
test split (the last 10%) is never scored.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from charlm import checkpoint, config  # noqa: E402
from charlm.data import load_corpus  # noqa: E402
from charlm.evaluate import full_pass  # noqa: E402
from charlm.models.ngram import NGram  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--orders", type=int, nargs="+", default=[6, 10])
    ap.add_argument("--models", nargs="*", default=[], help="saved models (folders or model.pt) to score on the slice")
    args = ap.parse_args()
    base = config.load(ROOT / "experiments" / "ngram.yaml")
    trials = load_corpus(base.data)  # val_fraction 0.1: learns from [0, 80%)
    retrain = load_corpus(config.override(base, {"data.val_fraction": 0.01}, "split").data)  # [0, 89%)
    held_out = retrain.val  # [89%, 90%): neither split learns from it
    assert len(trials.train) + len(trials.val) == len(retrain.train) + len(retrain.val)  # same test split
    print(f"held-out slice: {len(held_out):,} characters (89-90% of the text)")
    print("| n-gram order | learns from 80% | learns from 89% |\n|---|---|---|")
    for order in args.orders:
        losses = []
        for corpus in (trials, retrain):
            model = NGram(NGram.Config(), len(corpus.vocab), order - 1).eval()
            model.fit(corpus.train)
            losses.append(full_pass(model, held_out).loss)
        print(f"| {order} | {losses[0]:.4f} | {losses[1]:.4f} |")
    for path in args.models:
        ck = checkpoint.load(path, "cpu")
        if ck.vocab.chars != retrain.vocab.chars:
            raise SystemExit(f"{path} was trained on another text (its vocabulary differs); give a model of this text")
        learned = 1 - ck.cfg.data.val_fraction - ck.cfg.data.test_fraction
        loss = full_pass(ck.model, held_out, ck.cfg.train.eval_stride, ck.cfg.train.eval_batch_size).loss
        print(f"{path}: learned from the first {learned:.0%}; {loss:.4f} on the slice")


if __name__ == "__main__":
    main()
