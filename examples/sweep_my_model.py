"""Sweep a model of your own through charlm's Python API, then retrain, load and sample the winner.

    python examples/sweep_my_model.py        # from the checkout's root: about a minute on 2 cores

The same as ``python -m charlm sweep examples/my_model.yaml`` then ``best``: the command line calls
these functions.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # examples.my_model importable wherever this runs from

import charlm  # noqa: E402

study = charlm.sweep(ROOT / "examples" / "my_model.yaml")
print(f"best trial {study.best_trial.number}: val {study.best_value:.4f}, depth {study.best_params['model.depth']}")
best = charlm.best(ROOT / "examples" / "my_model.yaml")
print(f"retrained: test {best.metrics['test_loss_mean']:.4f} nats/char, saved to {best.path}")
model = best.load()
print(model.generate("ROMEO:", chars=100, seed=1))
