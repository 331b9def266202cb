"""Workers without training: per-trial sampler seeds, dead-trial recovery racing a finishing trial,
heartbeat staleness timed by the observer's own clock. In-process, on journal storages."""

from __future__ import annotations

import dataclasses

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from charlm import workers
from charlm.space import suggest
from charlm.storage import Session, open_storage, open_study
from charlm.sweepfile import load_sweep
from helpers import ROOT, SMOKE


def _spec(tmp_path, sampler: str = "random", timeout: float = 60.0):
    doc = yaml.safe_load(SMOKE.read_text())
    doc.pop("baseline")
    doc["base"] = str(ROOT / "experiments" / "gpt.yaml")
    doc["study"] = {"name": "w", "n_trials": 6, "heartbeat_timeout_s": timeout}
    doc["sampler"] = {"type": sampler, "seed": 0, "n_startup_trials": 2}
    f = tmp_path / "w.yaml"
    f.write_text(yaml.safe_dump(doc))
    return load_sweep(f)


def _draw(spec, url: str, n: int) -> list[tuple]:
    """``n`` trials asked, suggested and told by a freshly opened study (as a new process would)."""
    study = open_study(spec, url, create=True)
    out = []
    for _ in range(n):
        trial = study.ask()
        values = suggest(trial, spec)
        study.tell(trial, float(values["train.lr"]))
        out.append(tuple(sorted(trial.params.items())))
    return out


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_a_resumed_study_never_replays_and_a_fresh_one_reproduces(tmp_path, sampler):
    spec = _spec(tmp_path, sampler)
    resumed = _draw(spec, f"journal:{tmp_path / 'a.journal'}", 3) + _draw(spec, f"journal:{tmp_path / 'a.journal'}", 3)
    assert len(set(resumed)) == 6  # the second call does not start the first one's stream again
    # the same seed from a fresh storage proposes the same trials, resumed or not
    assert _draw(spec, f"journal:{tmp_path / 'b.journal'}", 6) == resumed


def test_two_processes_on_one_study_draw_distinct_trials(tmp_path):
    spec = _spec(tmp_path)
    url = f"journal:{tmp_path / 'c.journal'}"
    a, b = open_study(spec, url, create=True), open_study(spec, url)  # each "worker 0" with seed 0
    params = []
    for _ in range(4):
        for study in (a, b):
            trial = study.ask()
            suggest(trial, spec)
            study.tell(trial, 1.0)
            params.append(tuple(sorted(trial.params.items())))
    assert len(set(params)) == 8


@pytest.fixture(scope="module")
def shared_mlflow(tmp_path_factory):
    """One SQLite MLflow store for this module's tests (creating one costs seconds)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlruns') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        yield MlflowClient(uri)


@pytest.fixture
def dead_trial(tmp_path, shared_mlflow):
    """A RUNNING trial of a worker on another host whose heartbeat stopped long ago, with its run."""
    spec = _spec(tmp_path)
    study = optuna.create_study(study_name="w", storage=open_storage(f"journal:{tmp_path / 'd.journal'}"))
    client = shared_mlflow
    run = client.create_run(client.create_experiment(tmp_path.name))
    trial = study.ask()
    trial.suggest_float("train.lr", 1e-4, 1e-2)
    trial.set_user_attr("mlflow_run_id", run.info.run_id)
    for key, value in (("charlm.host", "elsewhere"), ("charlm.host_id", "elsewhere x"), ("charlm.pid", 1),
                       ("charlm.beat", 7)):
        study._storage.set_trial_system_attr(trial._trial_id, key, value)
    session = Session(spec, "", study, "parent")
    session.beats[trial._trial_id] = (7, -1e9)  # seen at 7 "forever" ago by this process's clock
    return session, trial, client, run.info.run_id


def _finish(session, trial, client, run_id):
    """What a live worker does at the end of a trial: end its run, then tell Optuna."""
    client.set_terminated(run_id, status="FINISHED")
    session.study.tell(trial, 1.0)


def _assert_finished(session, trial, client, run_id):
    assert session.study.trials[trial.number].state == TrialState.COMPLETE
    assert client.get_run(run_id).info.status == "FINISHED"
    assert not [t for t in session.study.trials if t.state == TrialState.WAITING]  # nothing re-queued


def test_a_trial_finishing_after_the_snapshot_is_left_finished(dead_trial, monkeypatch):
    session, trial, client, run_id = dead_trial
    judged = workers._is_stale

    def stale_then_finished(*args):
        verdict = judged(*args)
        _finish(session, trial, client, run_id)  # the worker was alive after all
        return verdict

    monkeypatch.setattr(workers, "_is_stale", stale_then_finished)
    assert workers.fail_dead_trials(session) == []
    _assert_finished(session, trial, client, run_id)


def test_a_trial_finishing_between_the_reread_and_the_write_is_left_finished(dead_trial, monkeypatch):
    session, trial, client, run_id = dead_trial
    storage = session.study._storage
    write = storage.set_trial_state_values

    def finish_first(trial_id, state, values=None):
        if state == TrialState.FAIL:
            _finish(session, trial, client, run_id)
        return write(trial_id, state, values)

    monkeypatch.setattr(storage, "set_trial_state_values", finish_first)
    assert workers.fail_dead_trials(session) == []
    _assert_finished(session, trial, client, run_id)


def test_a_dead_trial_is_failed_its_run_closed_and_requeued(dead_trial):
    session, trial, client, run_id = dead_trial
    assert workers.fail_dead_trials(session) == [trial.number]
    trials = session.study.trials
    assert trials[trial.number].state == TrialState.FAIL
    assert client.get_run(run_id).info.status == "FAILED"
    assert [t.user_attrs["retry_of"] for t in trials if t.state == TrialState.WAITING] == [trial.number]


def test_staleness_is_a_heartbeat_that_stops_moving_by_the_observers_clock(dead_trial):
    session, trial, _, _ = dead_trial
    session = dataclasses.replace(session, beats={})
    storage = session.study._storage
    now = 1000.0  # this process's monotonic clock; the worker's clock is never read
    for beat in (8, 9, 10):  # a beat every 20 s, timeout 60 s: alive
        storage.set_trial_system_attr(trial._trial_id, "charlm.beat", beat)
        assert not workers._is_stale(session, storage.get_trial(trial._trial_id), now)
        now += 20
    assert not workers._is_stale(session, storage.get_trial(trial._trial_id), now + 35)  # 55 s since beat 10
    assert workers._is_stale(session, storage.get_trial(trial._trial_id), now + 45)  # 65 s
