"""The Python API (``charlm.train``, ``sweep``, ``best``, ``load``) on real MLflow and Optuna stores:
what a script gets back, and that the command line, which calls the same functions, prints the same
figures."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from optuna.trial import TrialState

import charlm
from charlm.errors import CharlmError
from helpers import ROOT, SMOKE, cli, mlflow_client

TINY = {"model.n_layer": 1, "model.n_head": 2, "model.n_embd": 32, "data.context": 32, "train.batch_size": 16,
        "train.max_steps": 20, "train.validation_interval": 10, "train.warmup_steps": 5, "train.eval_chars": 2000,
        "train.sample_chars": 50, "train.device": "cpu", "train.precision": "fp32"}


def test_train_records_one_run_keeps_the_checkpoint_and_takes_overrides_either_way(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = charlm.train(ROOT / "experiments" / "gpt.yaml", TINY, out=tmp_path / "kept")
    assert run.result.steps == 20 and math.isfinite(run.result.test_loss) and run.config.model.n_embd == 32
    logged = mlflow_client(tmp_path).get_run(run.run_id).data
    assert logged.metrics["test_loss"] == pytest.approx(run.result.test_loss) and logged.params["model.n_embd"] == "32"
    assert (tmp_path / "kept" / "model.pt").is_file() and "model/model.pt" in run.checkpoint
    # the same run from "KEY=VALUE" strings, untracked: same seed, no clock, same loss on CPU
    again = charlm.train(ROOT / "experiments" / "gpt.yaml", [f"{k}={v}" for k, v in TINY.items()], track=False)
    assert again.run_id is None and again.result.best_val_loss == pytest.approx(run.result.best_val_loss, abs=1e-6)
    assert not list((tmp_path / "mlruns" / "states").iterdir())  # finished: no state and no lock left behind
    with pytest.raises(CharlmError, match="did you mean 'model.n_layer'"):
        charlm.train(ROOT / "experiments" / "gpt.yaml", {"model.n_layr": 2}, track=False)


def test_a_training_state_is_one_process_s_at_a_time_and_leaves_no_files(tmp_path):
    """Two identical `train` runs at once must not resume from each other's saves; the second gets a
    state of its own, gone when it ends, and a killed process's own state goes at the next run."""
    import os
    import subprocess

    from charlm.api import _own_state

    shared = tmp_path / "train-abc.pt"
    dead = subprocess.Popen(["true"])
    dead.wait()
    left = tmp_path / f"train-abc-pid{dead.pid}.pt"  # what a SIGKILL leaves of a second, concurrent run
    live = tmp_path / f"train-abc-pid{os.getpid()}.pt"
    left.write_bytes(b"x")
    live.write_bytes(b"x")
    with _own_state(shared) as first:
        assert first == shared and not left.exists() and live.exists()  # only a dead process's state goes
        live.unlink()
        with _own_state(shared) as second:
            assert second == live  # held: this call trains from a state of its own
            second.write_bytes(b"saved")
        assert not live.exists()
        first.write_bytes(b"saved")  # a state to resume: its lock stays with it
    assert shared.exists() and shared.with_suffix(".lock").exists()
    shared.unlink()
    with _own_state(shared) as again:
        assert again == shared  # the lock is free again, and the file the last holder left still locks
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    """A 3-trial smoke study run through ``charlm.sweep``, then ``charlm.best`` over one seed."""
    import os

    cwd = tmp_path_factory.mktemp("api")
    doc = yaml.safe_load(SMOKE.read_text())
    doc["study"].update(name="api", n_trials=3)
    doc["base"] = str(ROOT / "experiments" / "gpt.yaml")
    doc["baseline"] = str(ROOT / "experiments" / "ngram.yaml")
    doc["fixed"]["train.max_steps"] = 30
    (cwd / "api.yaml").write_text(yaml.safe_dump(doc))
    before = os.getcwd()
    os.chdir(cwd)
    env = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        study = charlm.sweep("api.yaml")
        best = charlm.best("api.yaml", seeds=[0])
        yield cwd, study, best
    finally:
        os.chdir(before)
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env


def test_sweep_returns_the_study_and_a_dry_run_its_preview(study_dir):
    cwd, study, _ = study_dir
    assert study.study_name == "api" and len(study.trials) == 3
    assert {t.state for t in study.trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert study.trials[0].user_attrs["charlm.enqueued"] == "base"
    preview = charlm.sweep(cwd / "api.yaml", dry_run=True)
    assert "trial 0 (base): model.kind=gpt" in preview
    with pytest.raises(CharlmError, match="--workers must be >= 1"):
        charlm.sweep(cwd / "api.yaml", workers=0)


def test_best_returns_the_saved_model_and_its_figures(study_dir):
    cwd, study, best = study_dir
    assert best.path == cwd / "mlruns" / "best" / "api" or best.path.resolve() == (cwd / "mlruns" / "best" / "api")
    assert best.metrics["trial"] == study.best_trial.number and best.metrics["seeds"] == [0]
    assert best.metrics == json.loads((cwd / "mlruns" / "best" / "api" / "metrics.json").read_text())
    assert math.isfinite(best.metrics["test_loss_mean"])


def test_load_scores_and_generates_what_the_command_line_prints(study_dir, monkeypatch):
    cwd, _, best = study_dir
    monkeypatch.chdir(cwd)
    text = cwd / "t.txt"
    text.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n")
    model = best.load()
    r = cli("eval", "--model", "mlruns/best/api", "--text", str(text), "--json", cwd=cwd)
    assert r.returncode == 0, r.stderr
    assert model.score(text.read_text()) == pytest.approx(json.loads(r.stdout)["loss"], abs=1e-9)
    out = model.generate("ROMEO:", 40, seed=3)
    assert len(out) == 40 and out == model.generate("ROMEO:", 40, seed=3)
    r = cli("sample", "--model", "mlruns/best/api", "--prompt", "ROMEO:", "--chars", "40", "--seed", "3", cwd=cwd)
    assert r.stdout == "ROMEO:" + out + "\n"
    # the registered model, by its alias: the same weights
    registered = charlm.load("models:/charlm-api@champion")
    assert registered.score(text.read_text()) == pytest.approx(model.score(text.read_text()), abs=1e-9)
    with pytest.raises(CharlmError, match="Cannot load models:/charlm-nope@champion"):
        charlm.load("models:/charlm-nope@champion")
    with pytest.raises(CharlmError, match="temperature must be a number >= 0"):
        model.generate("ROMEO:", 5, temperature=-1)
