"""Sweep YAML -> Optuna study; one MLflow child run per trial under one parent run per study.

The loop is Optuna's ask/tell, so the total trial count is exact across calls and workers:
a worker takes a file lock, fails trials whose worker died (and queues a retry of each), counts
COMPLETE + PRUNED + RUNNING + WAITING (+ FAIL that were not retried) against ``n_trials``, and
asks for the next trial, all before releasing the lock. Each running trial records its host, pid
and a heartbeat, so a worker killed with SIGKILL is noticed at once on the same machine (its pid
is gone) and after ``STALE_AFTER`` seconds elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from charlm import config, interrupts, progress
from charlm.data import Corpus, load_corpus
from charlm.errors import CharlmError
from charlm.progress import Progress
from charlm.report import log_report, study_plots
from charlm.space import SweepSpec, grid_space, space_size, suggest
from charlm.stopping import Patience
from charlm.tracking import MlflowTracker, file_lock, get_or_create_experiment, tracking_uri
from charlm.train import train

HEARTBEAT_SECONDS = 10.0
STALE_AFTER = 60.0  # a RUNNING trial whose heartbeat is older than this is treated as dead
MAX_RETRIES = 2  # a trial whose worker died is re-queued at most this many times
HOST = socket.gethostname()
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)

optuna.logging.set_verbosity(optuna.logging.WARNING)


# ----------------------------------------------------------------------------- storage


def storage_url(spec: SweepSpec) -> str:
    """The sweep's storage, or by default a journal file: mlruns/optuna/<study>.journal."""
    return spec.study.storage or f"journal:mlruns/optuna/{spec.study.name}.journal"


def redact(url: str) -> str:
    """``postgresql://user:secret@host/db`` -> ``postgresql://user:***@host/db``."""
    import re

    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def open_storage(url: str):
    """Any Optuna RDB URL (sqlite:///, postgresql://, mysql://), or ``journal:PATH`` for a journal file."""
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url[len("journal:"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path), lock_obj=_GuardedOpenLock(str(path))))
    if "://" not in url:
        raise CharlmError(f"Storage '{redact(url)}' is not a URL; use sqlite:///file.db, postgresql://..., or journal:path")
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
    except Exception as e:  # driver missing, server down, bad credentials
        raise CharlmError(f"Cannot open Optuna storage {redact(url)}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None


class _GuardedOpenLock(optuna.storages.journal.JournalFileOpenLock):
    """Optuna's lock file, held with Ctrl-C and SIGTERM deferred (see charlm/interrupts.py)."""

    def acquire(self) -> bool:
        interrupts.enter()
        try:
            return super().acquire()
        except BaseException:
            interrupts.leave()
            raise

    def release(self) -> None:
        try:
            super().release()
        finally:
            interrupts.leave()


def lock_path(spec: SweepSpec, url: str) -> Path:
    if url.startswith("journal:"):
        return Path(url[len("journal:"):] + ".charlm-lock")  # not ".lock": Optuna's own journal lock uses that
    return Path("mlruns") / f".sweep-{spec.study.name}.lock"


# ----------------------------------------------------------------------------- sampler and pruner


def make_sampler(spec: SweepSpec, worker: int = 0) -> optuna.samplers.BaseSampler:
    seed = spec.sampler.seed + worker
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # multivariate/group TPE are flagged experimental
        if spec.sampler.type == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if spec.sampler.type == "grid":
            return optuna.samplers.GridSampler(grid_space(spec), seed=spec.sampler.seed)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.sampler.n_startup_trials,
                                          multivariate=True, group=True, constant_liar=True)


def reference_value(values: list[float], how: str, percentile: float, direction: str) -> float:
    if how == "median":
        return float(np.median(values))
    if how == "best":
        return min(values) if direction == "minimize" else max(values)
    q = percentile if direction == "minimize" else 100 - percentile
    return float(np.percentile(values, q))


class PatiencePruner(optuna.pruners.BasePruner):
    """The trainer's patience rule with the reference taken from other trials at the same step.

    Each trial reports its best value so far at every evaluation step. At a step, the peers are
    the finished trials (and, if they got that far, pruned ones) that reported at or before that
    step; their value there is their best so far. With at least ``min_trials`` peers, the trial's
    value is judged against ``reference`` of theirs with the trial's own ``patience`` and
    ``min_relative_improvement`` (user attributes set by the objective). ``reference: self``
    judges the trial against itself, which is exactly the trainer's early stop.
    """

    def __init__(self, reference: str = "median", percentile: float = 50.0, min_trials: int = 3,
                 warmup_steps: int = 0):
        self.reference = reference
        self.percentile = percentile
        self.min_trials = min_trials
        self.warmup_steps = warmup_steps
        self._state: dict[int, tuple[Patience, int]] = {}  # trial number -> (rule, last step seen)

    def _peers_at(self, study: optuna.Study, trial, step: int) -> list[float]:
        values = []
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
            if t.number == trial.number or not t.intermediate_values:
                continue
            steps = [s for s in t.intermediate_values if s <= step]
            if not steps:
                continue
            if t.state == TrialState.PRUNED and max(t.intermediate_values) < step:
                continue  # it never got this far; its value here is unknown
            values.append(t.intermediate_values[max(steps)])
        return values

    def prune(self, study: optuna.Study, trial) -> bool:
        step = trial.last_step
        if step is None or step < self.warmup_steps:
            return False
        rule, last = self._state.get(trial.number, (None, -1))
        if rule is None:
            rule = Patience(int(trial.user_attrs.get("patience", 3)),
                            float(trial.user_attrs.get("min_relative_improvement", 0.0)))
        if step == last:
            return rule.should_stop
        value = trial.intermediate_values[step]
        if study.direction == optuna.study.StudyDirection.MAXIMIZE:
            value = -value
        if self.reference == "self":
            fired = rule.update(step, value)
        else:
            peers = self._peers_at(study, trial, step)
            if len(peers) < self.min_trials:
                self._state[trial.number] = (rule, step)
                return False  # too few peers to judge this step: neither a hit nor a miss
            if study.direction == optuna.study.StudyDirection.MAXIMIZE:
                peers = [-v for v in peers]
            ref = reference_value(peers, self.reference, self.percentile, "minimize")
            fired = rule.update(step, value, reference=ref)
        self._state[trial.number] = (rule, step)
        return fired


def make_pruner(spec: SweepSpec, max_steps: int, interval: int) -> optuna.pruners.BasePruner:
    p = spec.pruner
    if p.type == "patience":
        return PatiencePruner(p.reference, p.percentile, p.min_trials, p.warmup_steps)
    if p.type == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.min_trials, n_warmup_steps=p.warmup_steps)
    if p.type == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=interval)
    if p.type == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=interval, max_resource=max_steps)
    return optuna.pruners.NopPruner()


# ----------------------------------------------------------------------------- study + parent run


@dataclass
class Session:
    """Everything a worker needs, built once per process."""

    spec: SweepSpec
    storage_url: str
    study: optuna.Study
    parent_run_id: str
    worker: int = 0


def open_study(spec: SweepSpec, storage_url: str, worker: int = 0, create: bool = False) -> optuna.Study:
    base = spec.base_config()
    storage = open_storage(storage_url)
    kw = dict(study_name=spec.study.name, storage=storage, sampler=make_sampler(spec, worker),
              pruner=make_pruner(spec, base.train.max_steps, base.train.validation_interval))
    if create:
        return optuna.create_study(direction=spec.study.direction, load_if_exists=True, **kw)
    try:
        return optuna.load_study(**kw)
    except KeyError:
        raise CharlmError(f"No study '{spec.study.name}' in {redact(storage_url)}; run the sweep first") from None


def prepare(spec: SweepSpec, storage_url: str) -> Session:
    """Create (or find) the MLflow experiment, the study and its parent run, once, before any
    worker; under the sweep's lock, so two `make sweep` started at once share one of each."""
    with file_lock(lock_path(spec, storage_url)):
        return _prepare(spec, storage_url)


def _prepare(spec: SweepSpec, storage_url: str) -> Session:
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    client = MlflowClient(uri)
    exp_id = get_or_create_experiment(client, spec.study.name, uri)
    study = open_study(spec, storage_url, create=True)
    if study.direction.name.lower() != spec.study.direction:
        raise CharlmError(f"Study '{spec.study.name}' exists with direction {study.direction.name.lower()}; "
                          f"{spec.path} asks for {spec.study.direction}. Rename the study to start afresh")
    parent = study.user_attrs.get("mlflow_parent_run_id")
    if parent:
        try:
            client.update_run(parent, status="RUNNING")
        except Exception:  # the MLflow store was reset while the study survived: start a new parent
            parent = None
    if not parent:
        from charlm.tracking import git_commit

        run = client.create_run(exp_id, run_name=f"study-{spec.study.name}", tags={
            "charlm.role": "study", "optuna.study_name": spec.study.name,
            "mlflow.source.git.commit": git_commit(), "mlflow.note.content":
            f"Optuna study '{spec.study.name}' from {spec.path}; trials are the child runs."})
        parent = run.info.run_id
        study.set_user_attr("mlflow_parent_run_id", parent)
        from mlflow.entities import Param

        client.log_batch(parent, params=[Param("sweep_file", spec.path), Param("storage", redact(storage_url)),
                                         Param("sampler", spec.sampler.type), Param("pruner", spec.pruner.type),
                                         Param("n_trials", str(spec.study.n_trials))])
    session = Session(spec, storage_url, study, parent)
    if spec.baseline and not study.user_attrs.get("mlflow_baseline_run_id"):
        log_baseline(session)
    return session


def log_baseline(session: Session) -> None:
    """Train the sweep's baseline experiment once, as a run beside the trials (not a trial)."""
    spec = session.spec
    cfg = config.load(spec.baseline)
    cfg = config.override(cfg, {"experiment": spec.study.name}, where=spec.baseline)
    tags = {"charlm.role": "baseline", "charlm.study_run": session.parent_run_id, "optuna.study_name": spec.study.name}
    with MlflowTracker(spec.study.name, f"baseline-{cfg.name}", tags=tags) as tracker:
        result = train(cfg, tracker, corpus=_corpus(cfg))
    session.study.set_user_attr("mlflow_baseline_run_id", tracker.run_id)
    print(f"baseline {cfg.name} ({cfg.model.kind}): val {result.best_val_loss:.4f}, test {result.test_loss:.4f} "
          f"nats/char; MLflow run {tracker.run_id}", file=sys.stderr)


# ----------------------------------------------------------------------------- accounting


def retried_numbers(trials) -> set[int]:
    return {int(t.user_attrs["retry_of"]) for t in trials if "retry_of" in t.user_attrs}


def counted(study: optuna.Study) -> int:
    """Trials that count towards n_trials: all but the failed ones that were re-queued."""
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    return sum(1 for t in trials if t.state in COUNTED or (t.state == TrialState.FAIL and t.number not in retried))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_dead_trials(session: Session) -> list[int]:
    """Mark RUNNING trials whose worker is gone as FAIL, close their MLflow runs, re-queue them."""
    from mlflow.tracking import MlflowClient

    study = session.study
    now = time.time()
    dead = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = t.system_attrs
        beat = attrs.get("charlm.heartbeat")
        if beat is None:
            started = t.datetime_start.timestamp() if t.datetime_start else now
            stale = now - started > STALE_AFTER
        elif attrs.get("charlm.host") == HOST:
            stale = not _pid_alive(int(attrs.get("charlm.pid", -1))) or now - beat > STALE_AFTER
        else:
            stale = now - beat > STALE_AFTER
        if not stale:
            continue
        try:
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        except Exception:
            continue
        dead.append(t.number)
        run_id = t.user_attrs.get("mlflow_run_id")
        if run_id:
            client = MlflowClient(tracking_uri())
            with contextlib.suppress(Exception):
                client.set_tag(run_id, "optuna.state", "FAIL")
                client.set_tag(run_id, "stop_reason", "error")
                client.set_tag(run_id, "error", f"worker pid {attrs.get('charlm.pid')} on {attrs.get('charlm.host')} died")
                client.set_terminated(run_id, status="FAILED")
        _requeue(study, t)
    return dead


def _requeue(study: optuna.Study, t) -> None:
    """Queue a failed trial's parameters again (at most MAX_RETRIES times along one chain)."""
    history = list(t.user_attrs.get("retry_history", [])) + [t.number]
    if len(history) <= MAX_RETRIES:
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number, "retry_history": history})


class Heartbeat:
    """Records host, pid and a heartbeat on the running trial every HEARTBEAT_SECONDS."""

    def __init__(self, study: optuna.Study, trial):
        self.storage, self.trial_id = study._storage, trial._trial_id
        self.storage.set_trial_system_attr(self.trial_id, "charlm.host", HOST)
        self.storage.set_trial_system_attr(self.trial_id, "charlm.pid", os.getpid())
        self._beat()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _beat(self):
        with contextlib.suppress(Exception):  # finished trials refuse updates; that is fine
            self.storage.set_trial_system_attr(self.trial_id, "charlm.heartbeat", time.time())

    def _run(self):
        while not self._stop.wait(HEARTBEAT_SECONDS):
            self._beat()

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=5)


# ----------------------------------------------------------------------------- one trial


_CORPUS: dict[tuple, Corpus] = {}


def _corpus(cfg: config.Config) -> Corpus:
    key = (cfg.data.path, cfg.data.val_fraction, cfg.data.test_fraction)
    if key not in _CORPUS:
        _CORPUS[key] = load_corpus(cfg.data)
    return _CORPUS[key]


def run_trial(session: Session, trial) -> TrialState:
    spec, study = session.spec, session.study
    hb = Heartbeat(study, trial)
    tracker = None
    try:
        values = suggest(trial, spec)
        cfg = spec.trial_config(values, trial.number)
        for key in ("patience", "min_relative_improvement", "validation_interval"):
            trial.set_user_attr(key, getattr(cfg.train, key))
        tracker = MlflowTracker(spec.study.name, cfg.name, parent_run_id=session.parent_run_id, tags={
            "optuna.study_name": spec.study.name, "optuna.trial_number": str(trial.number)})
        trial.set_user_attr("mlflow_run_id", tracker.run_id)
        if "retry_of" in trial.user_attrs:
            tracker.set_tags({"optuna.retry_of": trial.user_attrs["retry_of"]})
        best = [math.inf]

        def on_eval(ev):
            best[0] = min(best[0], ev.val_loss)
            trial.report(best[0], ev.step)  # best so far: a pruned trial's value is its best
            return "pruned" if trial.should_prune() else None

        with tracker:
            result = train(cfg, tracker, on_eval, corpus=_corpus(cfg))
            if result.stop_reason == "pruned":
                state, value = TrialState.PRUNED, None
                tracker.set_tags({"optuna.state": "PRUNED", "prune_step": result.steps})
                tracker.log_metrics({"prune_step": result.steps}, step=result.steps)
            elif result.stop_reason == "diverged" or not math.isfinite(result.best_val_loss):
                state, value = TrialState.FAIL, None
                tracker.set_tags({"optuna.state": "FAIL"})
                tracker.end("FAILED")
            else:
                state, value = TrialState.COMPLETE, result.best_val_loss
                tracker.set_tags({"optuna.state": "COMPLETE"})
        trial.set_user_attr("stop_reason", result.stop_reason)
        trial.set_user_attr("steps", result.steps)
        trial.set_user_attr("test_loss", result.test_loss)
        trial.set_user_attr("train_seconds", round(result.train_seconds, 3))
        trial.set_user_attr("final_eval_seconds", round(result.final_eval_seconds, 3))
        if result.early_stop_step is not None:
            trial.set_user_attr("early_stop_step", result.early_stop_step)
        if state == TrialState.COMPLETE:
            study.tell(trial, value)
        else:
            study.tell(trial, state=state)
        return state
    except (KeyboardInterrupt, SystemExit):
        # interrupted, not broken: fail it and queue the same parameters for the next call
        with contextlib.suppress(Exception):
            study.tell(trial, state=TrialState.FAIL)
            _requeue(study, study.trials[trial.number])
            if tracker is not None:
                tracker.set_tags({"optuna.state": "FAIL", "stop_reason": "interrupted"})
        raise
    except Exception as e:  # one broken trial never stops the sweep; the reason stays on its run
        message = f"{type(e).__name__}: {e}"
        print(f"trial {trial.number} failed: {message}", file=sys.stderr)
        with contextlib.suppress(Exception):
            trial.set_user_attr("error", message[:1000])
            if tracker is not None:
                tracker.set_tags({"optuna.state": "FAIL", "stop_reason": "error", "error": message[:5000]})
                tracker.end("FAILED")
        with contextlib.suppress(Exception):
            study.tell(trial, state=TrialState.FAIL)
        return TrialState.FAIL
    finally:
        hb.stop()


# ----------------------------------------------------------------------------- summary on the parent run


PLOT_EVERY_SECONDS = 30.0  # plots and the trials table cost ~1 s at 200 trials; counts are cheap
_last_plots = [0.0]


def refresh_summary(session: Session, plots: bool | None = None) -> dict[str, Any]:
    """Counts, best value and params on the parent run after every trial; plots and a trials table
    at most every PLOT_EVERY_SECONDS per worker, and always when the sweep ends."""
    import tempfile

    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient

    study = session.study
    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(1 for t in trials if t.state == s) for s in TrialState}
    summary: dict[str, Any] = {"counts": counts}
    finished = counts["complete"] + counts["pruned"] + counts["fail"]
    ts = int(time.time() * 1000)
    metrics = [Metric(f"n_{k}", float(v), ts, finished) for k, v in counts.items() if k != "waiting"]
    tags = []
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        summary.update(best_value=best.value, best_trial=best.number, best_params=best.params)
        metrics.append(Metric("best_value", float(best.value), ts, finished))
        tags += [RunTag("best_trial", str(best.number)), RunTag("best_run_id", best.user_attrs.get("mlflow_run_id", "")),
                 RunTag("best_params", json.dumps(best.params, sort_keys=True))]
    client = MlflowClient(tracking_uri())
    client.log_batch(session.parent_run_id, metrics=metrics, tags=tags)
    if plots is None:
        plots = time.time() - _last_plots[0] >= PLOT_EVERY_SECONDS
    if not plots:
        return summary
    _last_plots[0] = time.time()
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        (folder / "best_params.json").write_text(json.dumps(summary, indent=2, default=str))
        (folder / "trials.csv").write_text(trials_table(trials, csv=True))
        study_plots(study, folder)
        for f in folder.iterdir():
            client.log_artifact(session.parent_run_id, str(f), "study")
    return summary


def trials_table(trials, csv: bool = False, limit: int | None = None) -> str:
    rows = []
    for t in trials:
        rows.append({
            "trial": t.number, "state": t.state.name,
            "value": "" if t.value is None else f"{t.value:.4f}",
            "stop": t.user_attrs.get("stop_reason", ""),
            "steps": t.user_attrs.get("steps", t.last_step or ""),
            "early_stop_step": t.user_attrs.get("early_stop_step", ""),
            "params": " ".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in t.params.items()),
        })
    if csv:
        import csv as csvmod
        import io

        buf = io.StringIO()
        w = csvmod.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["trial"])
        w.writeheader()
        w.writerows(rows)
        return buf.getvalue()
    rows = sorted(rows, key=lambda r: (r["value"] == "", r["value"]))[:limit]
    head = f"{'trial':>5}  {'state':<8} {'value':>7}  {'stop':<11} {'steps':>6}  params"
    lines = [head] + [f"{r['trial']:>5}  {r['state']:<8} {r['value']:>7}  {r['stop']:<11} {str(r['steps']):>6}  {r['params']}"
                      for r in rows]
    return "\n".join(lines)


def _fmt(v):
    return f"{v:.3g}" if isinstance(v, float) else str(v)


# ----------------------------------------------------------------------------- workers


def target_trials(spec: SweepSpec) -> int:
    """n_trials, or the grid's size when a grid search has fewer points (no point runs twice)."""
    if spec.sampler.type == "grid":
        return int(min(spec.study.n_trials, space_size(spec)))
    return spec.study.n_trials


class SweepProgress:
    """The coordinator's view of the whole study: trials done of the target (pruned and failed
    counted apart), the best value so far and an ETA from the pace since this call started."""

    def __init__(self, session: Session, deadline: float | None):
        self.session, self.deadline = session, deadline
        self.target = target_trials(session.spec)
        self.start_done = counted(session.study)
        self.t0 = time.time()
        self.bar = Progress(f"sweep {session.spec.study.name}", self.target, "trial", initial=self.start_done)
        self.shown = self.start_done

    def update(self) -> None:
        study = self.session.study
        trials = study.get_trials(deepcopy=False)
        done = counted(study)
        if done == self.shown:
            return
        self.bar.advance(done - self.shown)
        self.shown = done
        n = {s: sum(t.state == s for t in trials) for s in (TrialState.PRUNED, TrialState.FAIL)}
        complete = [t.value for t in trials if t.state == TrialState.COMPLETE]
        best = f"{min(complete):.4f}" if complete else "-"
        rate = (time.time() - self.t0) / max(1, done - self.start_done)
        eta = rate * max(0, self.target - done)
        if self.deadline:
            eta = min(eta, max(0.0, self.deadline - time.time()))
        eta_text = f"{int(eta // 60)}m{int(eta % 60):02d}s"
        self.bar.event(f"{done}/{self.target} trials ({n[TrialState.PRUNED]} pruned, {n[TrialState.FAIL]} failed), "
                       f"best val {best}, ETA {eta_text}", pruned=n[TrialState.PRUNED], failed=n[TrialState.FAIL],
                       best=best, eta=eta_text)

    def close(self) -> None:
        self.bar.close()


def worker_loop(session: Session, deadline: float | None, shown: SweepProgress | None = None) -> None:
    """Run trials until the study holds its target of counted trials or the deadline passes."""
    spec, study = session.spec, session.study
    lock = lock_path(spec, session.storage_url)
    target = target_trials(spec)
    while True:
        with file_lock(lock):
            fail_dead_trials(session)
            # queued trials (re-runs of dead workers' trials) are part of the total: run them
            queued = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
            if (counted(study) >= target and not queued) or (deadline and time.time() >= deadline):
                break
            trial = study.ask()
        state = run_trial(session, trial)
        if shown is not None:
            shown.update()
        else:
            print(f"[worker {session.worker}] trial {trial.number}: {state.name}", file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            with file_lock(lock):
                refresh_summary(session)


def run(spec: SweepSpec, workers: int = 1, worker_index: int | None = None) -> int:
    url = storage_url(spec)
    deadline = time.time() + spec.study.timeout_min * 60 if spec.study.timeout_min else None
    progress.TRAINING["enabled"] = False  # the sweep reports per trial, not per evaluation
    if worker_index is not None:  # a child started by the coordinator below
        study = open_study(spec, url, worker=worker_index)
        session = Session(spec, url, study, study.user_attrs["mlflow_parent_run_id"], worker_index)
        _threads_for(workers)
        worker_loop(session, deadline)
        return 0

    session = prepare(spec, url)
    print(f"study '{spec.study.name}' in {redact(url)}; MLflow experiment '{spec.study.name}', "
          f"parent run {session.parent_run_id}; {counted(session.study)}/{target_trials(spec)} trials so far",
          file=sys.stderr)
    status = "FINISHED"
    shown = SweepProgress(session, deadline)
    try:
        if workers <= 1:
            worker_loop(session, deadline, shown)
        else:
            _spawn(spec, workers, url, shown)
            # a worker that died after the others had finished leaves its trial to no one: the
            # coordinator fails it, and runs what is queued itself
            worker_loop(session, deadline, shown)
    except (KeyboardInterrupt, SystemExit):
        status = "KILLED"
        raise
    finally:
        shown.close()
        from mlflow.tracking import MlflowClient

        with contextlib.suppress(Exception):
            refresh_summary(session, plots=status == "FINISHED")  # on Ctrl-C, exit fast
        if status == "FINISHED":
            try:
                print(f"report: {log_report(spec, session.study, session.parent_run_id)}", file=sys.stderr)
            except Exception as e:  # the trials are safe either way; say why the report is missing
                print(f"(report skipped: {type(e).__name__}: {e})", file=sys.stderr)
        MlflowClient(tracking_uri()).set_terminated(session.parent_run_id, status=status)
    trials = session.study.get_trials(deepcopy=False)
    print(trials_table(trials, limit=15))
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    if done:
        b = session.study.best_trial
        print(f"best: trial {b.number}, val loss {b.value:.4f} nats/char; MLflow run {b.user_attrs.get('mlflow_run_id')}")
    return 0


def _threads_for(workers: int) -> None:
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, workers)))


def _spawn(spec: SweepSpec, workers: int, storage_url: str, shown: SweepProgress | None = None) -> None:
    args = [sys.executable, "-m", "charlm", "sweep", spec.path, "--n-trials", str(spec.study.n_trials),
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


def dry_run(spec: SweepSpec, n: int = 3) -> str:
    lines = [f"study '{spec.study.name}': {spec.study.n_trials} trials, {spec.sampler.type} sampler, "
             f"{spec.pruner.type} pruner" + (f" (reference {spec.pruner.reference})" if spec.pruner.type == "patience" else ""),
             f"storage: {redact(storage_url(spec))}",
             f"base: {spec.base or '(defaults)'}; fixed: {spec.fixed}", "space:"]
    lines += [f"  {p.key:<32} {p.describe()}" for p in spec.space]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=spec.sampler.seed))
    for i in range(n):
        trial = study.ask()
        values = suggest(trial, spec)
        cfg = spec.trial_config(values, i)
        study.tell(trial, 0.0)
        lines.append(f"sample {i}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in values.items()))
        lines.append(f"          -> {cfg.model.kind}, context {cfg.data.context}, max_steps {cfg.train.max_steps}")
    return "\n".join(lines)

