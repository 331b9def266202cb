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
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from charlm.objective import requeue, run_trial
from charlm.report import SweepProgress, counted, refresh_summary, target_trials
from charlm.storage import Session, study_lock
from charlm.tracking import tracking_uri

HEARTBEAT_SECONDS = 10.0  # at most; a shorter heartbeat_timeout_s beats 4 times per timeout
HOST = socket.gethostname()


def _host_id() -> str:
    """Hostname, boot and pid namespace: pids can be checked only where all three match."""
    parts = [HOST]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    return " ".join(parts)


HOST_ID = _host_id()


def beat_every(timeout_s: float) -> float:
    return min(HEARTBEAT_SECONDS, timeout_s / 4)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stale(session: Session, t: optuna.trial.FrozenTrial, now: float) -> bool:
    """Dead: its pid is gone (same host), or its heartbeat has not moved for the timeout, timed by
    this process's monotonic clock from the moment it first saw that heartbeat value."""
    attrs = t.system_attrs
    if attrs.get("charlm.host_id") == HOST_ID and "charlm.pid" in attrs and not _pid_alive(int(attrs["charlm.pid"])):
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


def _close_dead_run(t: optuna.trial.FrozenTrial) -> None:
    from mlflow.tracking import MlflowClient

    run_id = t.user_attrs.get("mlflow_run_id")
    if not run_id:
        return
    client = MlflowClient(tracking_uri())
    attrs = t.system_attrs
    with contextlib.suppress(Exception):
        client.set_tag(run_id, "optuna.state", "FAIL")
        client.set_tag(run_id, "stop_reason", "error")
        client.set_tag(run_id, "error", f"worker pid {attrs.get('charlm.pid')} on {attrs.get('charlm.host')} died")
        client.set_terminated(run_id, status="FAILED")


def fail_dead_trials(session: Session) -> list[int]:
    """Mark RUNNING trials whose worker is gone as FAIL, close their MLflow runs, re-queue them."""
    study = session.study
    storage = study._storage
    now = time.monotonic()
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    dead = []
    for t in running:
        if _is_stale(session, t, now) and _fail_if_running(storage, t._trial_id):
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

    def __init__(self, study: optuna.Study, trial: optuna.Trial, every: float = HEARTBEAT_SECONDS):
        self.storage, self.trial_id, self.every = study._storage, trial._trial_id, every
        self.count = 0
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


def _next_trial(session: Session, target: int, deadline: float | None) -> optuna.Trial | bool:
    """Under the study's lock: a new (or queued) trial; True to wait for other workers' running
    trials; False when the study is done or the deadline has passed."""
    study = session.study
    with study_lock(session.spec, session.storage_url):
        fail_dead_trials(session)
        if deadline and time.time() >= deadline:
            return False
        trials = study.get_trials(deepcopy=False)
        # queued trials (re-runs of dead workers' trials) are part of the total: run them
        if counted(trials) < target or any(t.state == TrialState.WAITING for t in trials):
            return study.ask()
        return any(t.state == TrialState.RUNNING for t in trials)


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
        with Heartbeat(study, trial, every):
            state = run_trial(session, trial)
        if shown is not None:
            shown.update()
        else:
            print(f"[worker {session.worker}] trial {trial.number}: {state.name}", file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            with study_lock(session.spec, session.storage_url):
                refresh_summary(session)


def threads_for(workers: int) -> None:
    """Share this machine's cores among its workers."""
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, workers)))


def spawn(path: str, n_trials: int, workers: int, storage_url: str, shown: SweepProgress | None = None) -> None:
    """Start ``workers`` child processes on this sweep and wait for them, forwarding SIGTERM."""
    args = [sys.executable, "-m", "charlm", "sweep", path, "--n-trials", str(n_trials),
            "--storage", storage_url, "--workers", str(workers)]
    procs = [subprocess.Popen(args + ["--worker-index", str(i)]) for i in range(workers)]

    def forward(signum, frame):
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signum)
        raise SystemExit(128 + signum)

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
