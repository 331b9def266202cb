"""What test files share: the repository's paths and its smoke study, the CLI as a user runs it, a
free port, the stores a sweep run in a folder leaves there (its Optuna journal, its MLflow runs)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Development and CI keep a copy of the corpus in ../shared/data; a user's own setting wins (an empty
# one, as `export CHARLM_DATA_MIRROR=` leaves, is no setting: charlm reads it as unset too).
if not os.environ.get("CHARLM_DATA_MIRROR"):
    os.environ["CHARLM_DATA_MIRROR"] = str(ROOT.parent / "shared" / "data")
MIRROR = Path(os.environ["CHARLM_DATA_MIRROR"])
PYTHON = sys.executable
SMOKE = ROOT / "sweeps" / "smoke.yaml"  # the study the tests sweep: under a minute on 2 cores


def cli(*args, cwd=None, timeout=600, env=None) -> subprocess.CompletedProcess:
    """``python -m charlm ARGS`` in a real process, output captured as text."""
    return subprocess.run([PYTHON, "-m", "charlm", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=env)


def wait_for_http(url: str, proc: subprocess.Popen, timeout: float, why=lambda: "") -> None:
    """Until ``url`` answers; fails with ``why()`` if ``proc`` exits first or the time runs out."""
    import time
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            assert time.time() < deadline and proc.poll() is None, f"{url} did not come up. {why()}"
            time.sleep(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def journal_study(cwd: Path, name: str):
    """The Optuna study ``name`` that a sweep run in ``cwd`` keeps in its default journal."""
    import optuna

    from charlm.storage import open_storage

    return optuna.load_study(study_name=name, storage=open_storage(f"journal:{cwd}/mlruns/optuna/{name}.journal"))


def mlflow_client(cwd: Path):
    """A client of the MLflow store a sweep or a run started in ``cwd`` writes (its default)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{cwd / 'mlruns' / 'mlflow.db'}")


def mlflow_runs(cwd: Path, experiment: str):
    """A client of the MLflow store a sweep run in ``cwd`` writes, and the runs of ``experiment``."""
    client = mlflow_client(cwd)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], max_results=1000)


def reference_speed(slowdown: float = 1.0):
    """This project's 2-core reference machine as the plan's probe measured it (sweeps/default.yaml;
    the rnn probes at 38f45c6), or a machine ``slowdown`` times slower in every step and pass: a
    recorded measurement, for tests of what the plan does with one."""
    from charlm import plan

    probes = (plan.Probe("gpt", 84.2e9, 0.246), plan.Probe("gpt", 271.6e9, 0.852), plan.Probe("gpt", 2.67e9, 0.014),
              plan.Probe("rnn", 1048.4e9, 2.408), plan.Probe("rnn", 2.15e9, 0.007),
              plan.Probe("ff", 312.6e9, 0.470), plan.Probe("ff", 1.71e9, 0.006))
    return plan.Speed(tuple(plan.Probe(p.kind, p.flops_per_step, p.step_seconds * slowdown) for p in probes),
                      eval_chars_per_s=36_000 / slowdown, ngram_chars_per_s=400_000 / slowdown,
                      train_chars=892_315, retrain_chars=992_700, test_chars=111_540, val_chars=111_539,
                      vocab_size=65, measured_s=9.0 * slowdown)
