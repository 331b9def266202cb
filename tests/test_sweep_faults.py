"""Sweeps that meet trouble, each a real sweep in its own folder: processes started at once on one
storage, trials that diverge or raise, a sweep or one of its workers killed or interrupted, a
`best` cut short; the study still ends with every trial accounted for and nothing left RUNNING."""

import os
import signal
import subprocess
import time

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

from charlm.report import counted
from charlm.storage import open_storage
from helpers import PYTHON, ROOT, SMOKE, cli, journal_study, mlflow_runs


@pytest.mark.slow  # a whole sweep killed and resumed (~30 s); one worker of two killed stays in make test
def test_sigkill_mid_trial_then_resume(tmp_path):
    """Kill the sweep with SIGKILL while a trial runs; the rerun fails and retries it."""
    f = _long_trial_sweep(tmp_path, "killme")
    proc = subprocess.Popen([PYTHON, "-m", "charlm", "sweep", str(f)], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    killed = _wait_mid_trial(tmp_path, "killme", proc)
    if killed is not None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert killed is not None, f"no trial reached the middle in time (sweep exited with {proc.returncode})"

    r = cli("sweep", str(f), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    study = journal_study(tmp_path, "killme")
    trials = {t.number: t for t in study.get_trials()}
    assert trials[killed.number].state == TrialState.FAIL
    retries = [t for t in trials.values() if t.user_attrs.get("retry_of") == killed.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == killed.params
    assert counted(study.get_trials()) == 2 and sum(t.state == TrialState.COMPLETE for t in trials.values()) == 2
    client, runs = mlflow_runs(tmp_path, "killme")
    assert not [x for x in runs if x.info.status == "RUNNING"]
    dead = client.get_run(killed.user_attrs["mlflow_run_id"])
    assert dead.info.status == "FAILED" and dead.data.tags["optuna.state"] == "FAIL"

def test_sqlite_storage_prepared_once_for_two_workers(tmp_path):
    """Any Optuna URL works; SQLite is created by the coordinator before the workers open it."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    r = cli("sweep", str(SMOKE), "--workers", "2", "--n-trials", "4", "--storage", url, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    study = optuna.load_study(study_name="smoke", storage=url)
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    _, runs = mlflow_runs(tmp_path, "smoke")
    assert len([x for x in runs if x.data.tags.get("mlflow.parentRunId")]) == 4


def test_diverging_trials_fail_and_the_sweep_carries_on(tmp_path):
    f = _smoke_variant(tmp_path, "wild", 4, {"train.lr": {"choice": [10.0, 0.003]}},
                       fixed={"train.warmup_steps": 0}, sampler={"type": "grid"})
    r = cli("sweep", str(f), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    study = journal_study(tmp_path, "wild")
    by_lr = {t.params["train.lr"]: t for t in study.trials}
    assert by_lr[10.0].state == TrialState.FAIL and by_lr[0.003].state == TrialState.COMPLETE
    assert len(study.trials) == 2  # the grid has two points; the failure counts as a run trial
    client, runs = mlflow_runs(tmp_path, "wild")
    failed = client.get_run(by_lr[10.0].user_attrs["mlflow_run_id"])
    assert failed.info.status == "FAILED" and failed.data.tags["stop_reason"] == "diverged"


def test_two_sweeps_started_at_once_share_one_study(tmp_path):
    """Two `make sweep` on the same study at the same moment, each in its own folder as on its own
    machine: one study, one parent run, distinct parameters, and together exactly n_trials trials."""
    storage = f"journal:{tmp_path / 'shared' / 'smoke.journal'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"}
    args = [PYTHON, "-m", "charlm", "sweep", str(SMOKE), "--n-trials", "6", "--storage", storage]
    procs = []
    for host in ("a", "b"):
        (tmp_path / host).mkdir()
        procs.append(subprocess.Popen(args, cwd=tmp_path / host, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    study = optuna.load_study(study_name="smoke", storage=open_storage(storage))
    assert sorted(t.number for t in study.trials) == list(range(6))
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 6  # no trial drawn twice
    workers = {t.system_attrs.get("charlm.pid") for t in study.trials}
    assert len(workers) == 2  # both contributed
    _, runs = mlflow_runs(tmp_path, "smoke")
    assert sum(1 for x in runs if x.data.tags.get("charlm.role") == "study") == 1
    assert sum(1 for x in runs if x.data.tags.get("charlm.role") == "baseline") == 1
    assert len([x for x in runs if x.data.tags.get("mlflow.parentRunId")]) == 6


def _smoke_variant(tmp_path, name, n_trials, space, fixed=(), drop=(), data=None, **sections):
    """sweeps/smoke.yaml with another study name, space and sections, written to tmp_path; ``data``
    goes into the base experiment (a sweep may not move the test split itself)."""
    doc = yaml.safe_load(SMOKE.read_text())
    doc.pop("baseline", None)
    doc["study"] = {"name": name, "n_trials": n_trials}
    doc["base"] = str(ROOT / "experiments" / "gpt.yaml")
    if data:
        base = yaml.safe_load((ROOT / "experiments" / "gpt.yaml").read_text())
        base["data"] = {**base.get("data", {}), **data}
        doc["base"] = str(tmp_path / f"{name}-base.yaml")
        (tmp_path / f"{name}-base.yaml").write_text(yaml.safe_dump(base))
    doc["fixed"].update(dict(fixed))
    for key in drop:
        doc["fixed"].pop(key)
    doc["space"] = space
    doc.update(sections)
    f = tmp_path / f"{name}.yaml"
    f.write_text(yaml.safe_dump(doc))
    return f


def _long_trial_sweep(tmp_path, name):
    # seconds-long trials, so a signal sent once a trial has reported lands inside that trial
    return _smoke_variant(tmp_path, name, 2, {"train.lr": {"float": [1e-3, 3e-3], "log": True}},
                          fixed={"train.max_steps": 1500}, pruner={"type": "none"})


def _wait_mid_trial(tmp_path, name, proc):
    journal = tmp_path / "mlruns" / "optuna" / f"{name}.journal"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        if journal.exists():
            running = [t for t in journal_study(tmp_path, name).get_trials()
                       if t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs]
            if running and running[0].last_step:
                return running[0]
    return None


@pytest.mark.slow  # two sweeps of seconds-long trials (~55 s); make test keeps the in-process signal tests
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_interrupting_a_sweep_leaves_nothing_running(tmp_path, sig, code):
    f = _long_trial_sweep(tmp_path, "ctrlc")
    # as from a terminal: a shell that starts jobs in the background makes them ignore SIGINT
    proc = subprocess.Popen([PYTHON, "-m", "charlm", "sweep", str(f)], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    trial = _wait_mid_trial(tmp_path, "ctrlc", proc)
    assert trial is not None, proc.stderr.read() if proc.poll() is not None else "no trial got going"
    proc.send_signal(sig)
    t0 = time.time()
    assert proc.wait(timeout=30) == code and time.time() - t0 < 10
    study = journal_study(tmp_path, "ctrlc")
    assert study.trials[trial.number].state == TrialState.FAIL
    queued = [t for t in study.trials if t.state == TrialState.WAITING]
    assert len(queued) == 1 and queued[0].user_attrs["retry_of"] == trial.number  # re-queued
    assert queued[0].system_attrs["fixed_params"] == trial.params
    client, runs = mlflow_runs(tmp_path, "ctrlc")
    assert not [x for x in runs if x.info.status == "RUNNING"]
    killed = client.get_run(trial.user_attrs["mlflow_run_id"])
    assert killed.info.status == "KILLED" and killed.data.tags["stop_reason"] == "interrupted"
    assert [a.path for a in client.list_artifacts(killed.info.run_id, "model")] == ["model/model.pt"]
    parent = [x for x in runs if x.data.tags.get("charlm.role") == "study"][0]
    assert parent.info.status == "KILLED"
    r = cli("sweep", str(f), cwd=tmp_path)  # the next call runs the queued trial and finishes
    assert r.returncode == 0, r.stderr[-2000:]
    assert counted(journal_study(tmp_path, "ctrlc").get_trials()) == 2


@pytest.mark.slow  # 30 s: keeps `make test` under 5 minutes; CI runs it in test-slow
def test_sigkill_one_of_two_workers(tmp_path):
    """Kill one worker of a 2-worker sweep mid-trial: the other fails and re-runs its trial, and
    the study still reaches its total with every trial accounted for."""
    f = _long_trial_sweep(tmp_path, "onedown")
    proc = subprocess.Popen([PYTHON, "-m", "charlm", "sweep", str(f), "--workers", "2", "--n-trials", "3"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    victim = _wait_mid_trial(tmp_path, "onedown", proc)
    assert victim is not None, "no trial got going"
    os.kill(int(victim.system_attrs["charlm.pid"]), signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "1 worker(s) exited with status [-9]" in err, err[-2000:]
    study = journal_study(tmp_path, "onedown")
    trials = study.get_trials()
    assert trials[victim.number].state == TrialState.FAIL
    assert [t.state for t in trials if t.user_attrs.get("retry_of") == victim.number] == [TrialState.COMPLETE]
    assert counted(study.get_trials()) == 3 and sum(t.state == TrialState.COMPLETE for t in trials) == 3
    client, runs = mlflow_runs(tmp_path, "onedown")
    assert not [x for x in runs if x.info.status == "RUNNING"]
    assert client.get_run(victim.user_attrs["mlflow_run_id"]).info.status == "FAILED"


def test_an_exception_in_one_trial_does_not_stop_the_sweep(tmp_path, tiny_text):
    # 40k characters of context: more than the text holds, so that trial raises inside train()
    f = _smoke_variant(tmp_path, "broken", 2, {"data.context": {"choice": [16, 40000]}},
                       data={"path": str(tiny_text)}, drop=["data.context"], sampler={"type": "grid"})
    r = cli("sweep", str(f), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    study = journal_study(tmp_path, "broken")
    by_ctx = {t.params["data.context"]: t for t in study.trials}
    assert by_ctx[16].state == TrialState.COMPLETE and by_ctx[40000].state == TrialState.FAIL
    assert "too short for data.context=40000" in by_ctx[40000].user_attrs["error"]
    client, _ = mlflow_runs(tmp_path, "broken")
    run = client.get_run(by_ctx[40000].user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["stop_reason"] == "error"
    assert "too short" in run.data.tags["error"]


@pytest.mark.slow
def test_best_interrupted_then_run_again_resumes(tmp_path):
    f = _long_trial_sweep(tmp_path, "resumebest")
    r = cli("sweep", str(f), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    log = tmp_path / "best.stderr"
    with open(log, "w") as err:
        proc = subprocess.Popen([PYTHON, "-m", "charlm", "best", str(f)], cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=err, text=True)
    seeds = tmp_path / "mlruns" / "best" / "resumebest" / ".seeds"
    deadline = time.time() + 300
    # seed 0 done, and seed 1 past its first evaluations (its training state saved)
    while time.time() < deadline and proc.poll() is None and not list(seeds.glob("seed-1-*.state.pt")):
        time.sleep(0.2)
    time.sleep(1)
    assert proc.poll() is None, "best finished before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143, log.read_text()[-3000:]
    client, runs = mlflow_runs(tmp_path, "resumebest")
    assert not [x for x in runs if x.info.status == "RUNNING"]
    assert [x.info.status for x in runs if x.data.tags.get("seed") == "1"] == ["KILLED"]
    state = torch.load(next(seeds.glob("seed-1-*.state.pt")), weights_only=True)
    r = cli("best", str(f), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "seed 0:" in r.stdout and r.stdout.count("kept from an earlier run") == 1  # seed 0 kept
    # seed 1 carries on from its last saved evaluation, not from step 0
    step = state["loop"]["step"]  # TrainState's saved fields
    assert f"resuming from step {step}" in r.stdout and step > 0
    assert not list(seeds.glob("*.state.pt"))
    _, runs = mlflow_runs(tmp_path, "resumebest")
    resumed = [x for x in runs if x.data.tags.get("seed") == "1" and x.info.status == "FINISHED"]
    assert len(resumed) == 1 and resumed[0].data.tags["resumed_from_step"] == str(step)
    assert (tmp_path / "mlruns" / "best" / "resumebest" / "model.pt").is_file()
