"""Worker processes and what keeps them honest: heartbeats, dead-trial recovery, the trial loop.

A worker takes the study's lock (charlm/storage.py ``study_lock``: a PostgreSQL advisory lock,
or a lock file beside a journal or SQLite file), fails the trials whose worker died (and queues a
retry of each), counts the trials against ``n_trials`` and asks for the next one, all before
releasing the lock, so the total is exact across every worker that shares the storage.

Each running trial records its host, pid and a heartbeat counter that its worker advances every
``beat_every`` seconds. A worker killed even with SIGKILL is noticed at once on the same machine
(its pid is gone) and elsewhere once its counter has not moved for ``study.heartbeat_timeout_s``
by the observer's own monotonic clock: no two hosts' clocks are ever compared. A worker with
nothing left to ask waits for the other workers' running trials to finish (or to go silent, then
it runs their re-queued copies), so a study is complete when the last worker returns.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from charlm import interrupts, promotion, tracking
from charlm.device import visible_gpus, worker_env
from charlm.hosts import HOST, HOST_ID, pid_alive
from charlm.objective import requeue, run_trial
from charlm.plan import room_for
from charlm.promotion import close_paused, is_paused, next_promotion
from charlm.report import SweepProgress, counted, refresh_summary, target_trials
from charlm.storage import Session, study_lock

HEARTBEAT_SECONDS = 10.0  # at most; a shorter heartbeat_timeout_s beats 4 times per timeout


def beat_every(timeout_s: float) -> float:
    return min(HEARTBEAT_SECONDS, timeout_s / 4)


def _is_stale(session: Session, t: optuna.trial.FrozenTrial, now: float) -> bool:
    """Dead: its pid is gone (same host), or its heartbeat has not moved for the timeout, timed by
    this process's monotonic clock from the moment it first saw that heartbeat value. A paused
    trial (charlm/promotion.py) has no worker and is never stale."""
    attrs = t.system_attrs
    if is_paused(t):
        return False
    if attrs.get("charlm.host_id") == HOST_ID and "charlm.pid" in attrs and not pid_alive(int(attrs["charlm.pid"])):
        return True
    beat = attrs.get("charlm.beat")
    seen = session.beats.get(t._trial_id)
    if seen is None or seen[0] != beat:
        session.beats[t._trial_id] = (beat, now)
        return False
    return now - seen[1] > session.spec.study.heartbeat_timeout_s


def _fail_if_running(storage, trial_id: int) -> bool:
    """FAIL the trial unless it has finished; True only when this call failed it. The storage
    refuses to change a finished trial, so a trial finishing at the same moment stays finished."""
    try:
        if storage.get_trial(trial_id).state != TrialState.RUNNING:  # re-read: it may have finished since
            return False
        return storage.set_trial_state_values(trial_id, TrialState.FAIL)
    except UpdateFinishedTrialError:  # it finished between the re-read and the write
        return False
    except Exception:
        return False


def _close_dead_run(t: optuna.trial.FrozenTrial, paused: bool = False) -> None:
    """The dead worker's MLflow run: FAILED, or PAUSED (FINISHED) when the trial goes on elsewhere."""
    run_id = t.user_attrs.get("mlflow_run_id")
    if not run_id:
        return
    client = tracking.client()
    attrs = t.system_attrs
    with contextlib.suppress(Exception):
        client.set_tag(run_id, "optuna.state", "PAUSED" if paused else "FAIL")
        client.set_tag(run_id, "error", f"worker pid {attrs.get('charlm.pid')} on {attrs.get('charlm.host')} died")
        if not paused:
            client.set_tag(run_id, "stop_reason", "error")
        client.set_terminated(run_id, status="FINISHED" if paused else "FAILED")


def _close_paused(session: Session) -> None:
    """Nothing trains and nothing can be promoted: the paused trials end PRUNED, and their runs say so."""
    client = tracking.client()
    for t in close_paused(session.study):
        with contextlib.suppress(Exception):
            client.set_tag(t.user_attrs["mlflow_run_id"], "optuna.state", "PRUNED")
            client.set_tag(t.user_attrs["mlflow_run_id"], "stop_reason", "pruned")


def fail_dead_trials(session: Session) -> list[int]:
    """Mark RUNNING trials whose worker is gone as FAIL, close their MLflow runs, re-queue them."""
    study = session.study
    storage = study._storage
    now = time.monotonic()
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    dead = []
    for t in running:
        if not _is_stale(session, t, now):
            continue
        if promotion.RUNG in t.system_attrs:  # past a rung: its state is saved; it goes on from there
            storage.set_trial_system_attr(t._trial_id, promotion.PAUSED, True)
            _close_dead_run(t, paused=True)
            dead.append(t.number)
        elif _fail_if_running(storage, t._trial_id):
            dead.append(t.number)
            t = storage.get_trial(t._trial_id)
            _close_dead_run(t)
            requeue(study, t)
    alive = {t._trial_id for t in running}
    for trial_id in [k for k in session.beats if k not in alive]:
        del session.beats[trial_id]
    return dead


class Heartbeat:
    """Records host, pid and a heartbeat counter on the running trial every ``every`` seconds."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial, every: float = HEARTBEAT_SECONDS,
                 before: optuna.trial.FrozenTrial | None = None):
        self.storage, self.trial_id, self.every = study._storage, trial._trial_id, every
        # a promoted trial (``before``: as claimed) counts on from its last worker's beats, so
        # observers never see an old value again
        self.count = int(before.system_attrs.get("charlm.beat", 0)) if before is not None else 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Heartbeat:
        self.storage.set_trial_system_attr(self.trial_id, "charlm.host", HOST)
        self.storage.set_trial_system_attr(self.trial_id, "charlm.host_id", HOST_ID)
        self.storage.set_trial_system_attr(self.trial_id, "charlm.pid", os.getpid())
        self._beat()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _beat(self):
        self.count += 1
        with contextlib.suppress(Exception):  # finished trials refuse updates; that is fine
            self.storage.set_trial_system_attr(self.trial_id, "charlm.beat", self.count)

    def _run(self):
        while not self._stop.wait(self.every):
            self._beat()


Job = tuple[optuna.Trial, optuna.trial.FrozenTrial | None]  # (the trial, its paused self when promoted)


def _next_trial(session: Session, target: int, deadline: float | None) -> Job | bool:
    """Under the study's lock: a paused trial to promote, else a new (or queued) trial; True to wait
    for other workers' running trials; False when the study is done or the deadline has passed."""
    study, asha = session.study, session.spec.pruner.type == "asha"
    fits = room_for(session.spec, deadline)
    with study_lock(session.spec, session.storage_url):
        fail_dead_trials(session)
        late = bool(deadline) and time.time() >= deadline
        if not late and asha:
            paused = next_promotion(study, session.spec.pruner.reduction_factor, fits=fits)
            if paused is not None:
                return optuna.Trial(study, paused._trial_id), paused
        trials = study.get_trials(deepcopy=False)
        # queued trials (re-runs of dead workers' trials) are part of the total: run them; nothing
        # new starts that could not reach its first judgement before the deadline
        if not late and fits(-1) and (counted(trials) < target or any(t.state == TrialState.WAITING for t in trials)):
            return study.ask(), None
        if any(t.state == TrialState.RUNNING and not is_paused(t) for t in trials):
            return not late
        # the rungs are final: carry the best on to the top rung (past the deadline too, until
        # one trial has reached it: a study must end with a model to retrain)
        finished = any(t.state == TrialState.COMPLETE for t in trials)
        if asha and (not late or not finished):
            paused = next_promotion(study, session.spec.pruner.reduction_factor, closing=True,
                                    fits=fits if finished else lambda k: True)
            if paused is not None:
                return optuna.Trial(study, paused._trial_id), paused
        if asha:
            _close_paused(session)
        return False


def worker_loop(session: Session, deadline: float | None, shown: SweepProgress | None = None) -> None:
    """Run trials until the study holds its target of counted trials, none of them running (or
    until the deadline passes)."""
    study = session.study
    target = target_trials(session.spec)
    every = beat_every(session.spec.study.heartbeat_timeout_s)
    waiting = False
    while True:
        trial = _next_trial(session, target, deadline)
        if trial is False:
            break
        if trial is True:
            if not waiting and shown is None:
                print(f"[worker {session.worker}] waiting for other workers' running trials", file=sys.stderr, flush=True)
            waiting = True
            time.sleep(min(2.0, every))
            continue
        waiting = False
        trial, before = trial
        with Heartbeat(study, trial, every, before):
            state = run_trial(session, trial, before)
        if shown is not None:
            shown.update()
        else:
            said = "PAUSED" if state is None else state.name
            print(f"[worker {session.worker}] trial {trial.number}: {said}", file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            with study_lock(session.spec, session.storage_url):
                refresh_summary(session)


def threads_for(workers: int) -> None:
    """Share this machine's cores among its workers."""
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, workers)))


def spawn(path: str, n_trials: int, workers: int, storage_url: str, shown: SweepProgress | None = None,
          extra: tuple[str, ...] = ()) -> None:
    """Start ``workers`` child processes on this sweep and wait for them, forwarding SIGTERM.
    ``extra``: the coordinator's --budget, --text and --seed, so each child opens the same study."""
    args = [sys.executable, "-m", "charlm", "sweep", path, "--n-trials", str(n_trials),
            "--storage", storage_url, "--workers", str(workers), *extra]
    gpus = visible_gpus()  # shared round-robin; each worker capped at its share of its GPU's memory
    procs = [subprocess.Popen(args + ["--worker-index", str(i)], env={**os.environ, **worker_env(i, workers, gpus)})
             for i in range(workers)]

    def forward(signum, frame):
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signum)
        interrupts.handle(signum)  # raised once an MLflow call under way (the progress line's) returns

    old = signal.signal(signal.SIGTERM, forward)
    try:
        alive = procs
        while alive:
            with contextlib.suppress(subprocess.TimeoutExpired):
                alive[0].wait(timeout=2)
            alive = [p for p in procs if p.poll() is None]
            if shown is not None:
                with contextlib.suppress(Exception):  # a progress line must never stop the sweep
                    shown.update()
    except KeyboardInterrupt:
        for p in procs:  # children got the terminal's SIGINT too; give them time to close their runs
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=30)
        raise
    finally:
        signal.signal(signal.SIGTERM, old)
    bad = [p.returncode for p in procs if p.returncode not in (0, None)]
    if bad:
        print(f"{len(bad)} worker(s) exited with status {bad}; finished trials are kept", file=sys.stderr)
