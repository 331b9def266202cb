"""Quality against training time for every trial of a study, ff and gpt apart.

    python docs/plot_trials.py [SWEEP.yaml] [--out docs/quality_vs_time.png]

Reads the study named by the sweep file from its storage (default: the sweep's journal under
mlruns/optuna/), so run it where the sweep ran.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from charlm.space import load_sweep  # noqa: E402
from charlm.sweep import open_study, storage_url  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", nargs="?", default="sweeps/default.yaml")
    ap.add_argument("--out", default="docs/quality_vs_time.png")
    args = ap.parse_args()
    spec = load_sweep(args.sweep)
    study = open_study(spec, storage_url(spec))
    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {("ff", TrialState.COMPLETE): ("o", "tab:blue"), ("gpt", TrialState.COMPLETE): ("s", "tab:orange"),
              ("ff", TrialState.PRUNED): ("x", "tab:blue"), ("gpt", TrialState.PRUNED): ("x", "tab:orange")}
    for (kind, state), (marker, color) in styles.items():
        pts = [(t.user_attrs["train_seconds"], t.value) for t in study.get_trials(states=(state,))
               if t.params.get("model.kind") == kind and "train_seconds" in t.user_attrs]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, color=color, label=f"{kind} {state.name.lower()} ({len(pts)})")
            for t in study.get_trials(states=(state,)):
                if t.params.get("model.kind") == kind and "train_seconds" in t.user_attrs:
                    ax.annotate(str(t.number), (t.user_attrs["train_seconds"], t.value), fontsize=7,
                                xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("training seconds (2 CPU cores)")
    ax.set_ylabel("val loss, nats/char (pruned: best before pruning)")
    ax.set_title(f"study '{spec.study.name}': quality vs training time")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
