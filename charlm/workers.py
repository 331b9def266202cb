"""Worker processes and what keeps them honest: heartbeats, dead-trial recovery, the trial loop.

A worker takes the sweep's lock, fails the trials whose worker died (and queues a retry of each),
counts the trials against ``n_trials`` and asks for the next one, all before releasing the lock,
so the total is exact across workers. Each running trial records its host, pid and a heartbeat: a
worker killed with SIGKILL is noticed at once on the same machine (its pid is gone) and after
``STALE_AFTER`` seconds elsewhere.
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

import optuna
from optuna.trial import TrialState

from charlm.objective import requeue, run_trial
from charlm.report import SweepProgress, counted, refresh_summary, target_trials
from charlm.storage import Session, lock_path
from charlm.tracking import file_lock, tracking_uri

HEARTBEAT_SECONDS = 10.0
STALE_AFTER = 60.0  # a RUNNING trial whose heartbeat is older than this is treated as dead
HOST = socket.gethostname()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stale(t: optuna.trial.FrozenTrial, now: float) -> bool:
    attrs = t.system_attrs
    beat = attrs.get("charlm.heartbeat")
    if beat is None:
        started = t.datetime_start.timestamp() if t.datetime_start else now
        return now - started > STALE_AFTER
    if attrs.get("charlm.host") == HOST and not _pid_alive(int(attrs.get("charlm.pid", -1))):
        return True
    return now - beat > STALE_AFTER


def fail_dead_trials(session: Session) -> list[int]:
    """Mark RUNNING trials whose worker is gone as FAIL, close their MLflow runs, re-queue them."""
    from mlflow.tracking import MlflowClient

    study = session.study
    now = time.time()
    dead = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not _is_stale(t, now):
            continue
        try:
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        except Exception:
            continue
        dead.append(t.number)
        run_id = t.user_attrs.get("mlflow_run_id")
        if run_id:
            client = MlflowClient(tracking_uri())
            attrs = t.system_attrs
            with contextlib.suppress(Exception):
                client.set_tag(run_id, "optuna.state", "FAIL")
                client.set_tag(run_id, "stop_reason", "error")
                client.set_tag(run_id, "error", f"worker pid {attrs.get('charlm.pid')} on {attrs.get('charlm.host')} died")
                client.set_terminated(run_id, status="FAILED")
        requeue(study, t)
    return dead


class Heartbeat:
    """Records host, pid and a heartbeat on the running trial every HEARTBEAT_SECONDS, while in ``with``."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial):
        self.storage, self.trial_id = study._storage, trial._trial_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Heartbeat:
        self.storage.set_trial_system_attr(self.trial_id, "charlm.host", HOST)
        self.storage.set_trial_system_attr(self.trial_id, "charlm.pid", os.getpid())
        self._beat()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _beat(self):
        with contextlib.suppress(Exception):  # finished trials refuse updates; that is fine
            self.storage.set_trial_system_attr(self.trial_id, "charlm.heartbeat", time.time())

    def _run(self):
        while not self._stop.wait(HEARTBEAT_SECONDS):
            self._beat()


def worker_loop(session: Session, deadline: float | None, shown: SweepProgress | None = None) -> None:
    """Run trials until the study holds its target of counted trials or the deadline passes."""
    study = session.study
    lock = lock_path(session.spec, session.storage_url)
    target = target_trials(session.spec)
    while True:
        with file_lock(lock):
            fail_dead_trials(session)
            # queued trials (re-runs of dead workers' trials) are part of the total: run them
            queued = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
            if (counted(study.get_trials(deepcopy=False)) >= target and not queued) or (
                    deadline and time.time() >= deadline):
                break
            trial = study.ask()
        with Heartbeat(study, trial):
            state = run_trial(session, trial)
        if shown is not None:
            shown.update()
        else:
            print(f"[worker {session.worker}] trial {trial.number}: {state.name}", file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            with file_lock(lock):
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
