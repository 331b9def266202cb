"""Sweep machinery under load: many very small trials, real workers, real stores.

    python bench/sweep_load.py [--trials 200] [--workers 2]

Runs a study of tiny trials (20 steps on 30k characters) in a temporary folder and prints
trials/minute and the per-trial overhead: each trial's wall time (Optuna's start to complete)
minus its training loop and final evaluations, i.e. what the framework itself costs a trial
(MLflow run, params, artifacts, summary refresh, storage round trips).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SWEEP = """
study: {{name: load, n_trials: {trials}}}
sampler: {{type: random, seed: 0}}
pruner: {{type: none}}
base: base.yaml  # the corpus is the base experiment's: a sweep may not move the test split
fixed:
  data.context: 16
  model.n_layer: 1
  model.n_head: 2
  model.n_embd: 32
  model.hidden: 64
  train.batch_size: 8
  train.max_steps: 20
  train.validation_interval: 10
  train.warmup_steps: 5
  train.eval_chars: 500
  train.sample_chars: 50
  train.precision: fp32
space:
  model.kind: {{choice: [gpt, ff]}}
  train.lr: {{float: [1.0e-3, 1.0e-2], log: true}}
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    from charlm.data import read_text, resolve_corpus

    with tempfile.TemporaryDirectory(prefix="charlm-load-") as d:
        d = Path(d)
        text = d / "tiny.txt"
        text.write_text(read_text(resolve_corpus())[:30_000], encoding="utf-8")
        (d / "base.yaml").write_text(f"data: {{path: {text}}}\n")
        sweep = d / "load.yaml"
        sweep.write_text(SWEEP.format(trials=args.trials))
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "charlm", "sweep", str(sweep), "--workers", str(args.workers)],
                           cwd=d, capture_output=True, text=True, env={**os.environ})
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            print(r.stderr[-3000:])
            return 1
        import optuna

        from charlm.storage import open_storage

        study = optuna.load_study(study_name="load", storage=open_storage(f"journal:{d}/mlruns/optuna/load.journal"))
        trials = study.get_trials()
        done = [t for t in trials if t.datetime_complete and "train_seconds" in t.user_attrs]
        overhead = [(t.datetime_complete - t.datetime_start).total_seconds() - t.user_attrs["train_seconds"]
                    - t.user_attrs["final_eval_seconds"] for t in done]
        inside = sum(t.user_attrs["train_seconds"] + t.user_attrs["final_eval_seconds"] for t in done)
    states = {s.name: sum(t.state == s for t in trials) for s in optuna.trial.TrialState if any(t.state == s for t in trials)}
    print(f"{len(trials)} trials with {args.workers} workers in {wall:.1f} s: {len(trials) / wall * 60:.0f} trials/minute; "
          f"states {states}")
    print(f"per-trial overhead (trial wall time minus training and evaluation): median {statistics.median(overhead):.3f} s, "
          f"p90 {sorted(overhead)[int(0.9 * len(overhead))]:.3f} s, max {max(overhead):.3f} s")
    print(f"whole sweep, start-up included: {(wall * args.workers - inside) / len(done):.3f} worker-seconds per trial "
          f"outside training and evaluation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
