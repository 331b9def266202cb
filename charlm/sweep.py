"""Sweep YAML -> Optuna study; one MLflow child run per trial under one parent run per study.

``run`` prepares the study (charlm/storage.py) and its parent run once, then runs trials here or
in ``--workers`` child processes (charlm/workers.py), each a child run (charlm/objective.py); the
parent run's summary and report come from charlm/report.py.
"""

from __future__ import annotations

import contextlib
import sys
import time

import optuna
from optuna.trial import TrialState

from charlm import paths, tracking
from charlm.errors import CharlmError
from charlm.objective import log_baseline
from charlm.promotion import rung_budgets
from charlm.report import SweepProgress, counted, fmt, log_report, refresh_summary, target_trials, trials_table
from charlm.space import suggest
from charlm.storage import Session, open_study, storage_url, study_lock
from charlm.sweepfile import SweepSpec
from charlm.tracking import get_or_create_experiment, git_commit, tracking_uri, ui_runs_url
from charlm.workers import spawn, threads_for, worker_loop


def prepare(spec: SweepSpec, url: str) -> Session:
    """Create (or find) the MLflow experiment, the study and its parent run, once, before any
    worker; under the study's lock, so two `make sweep` started at once share one of each."""
    with study_lock(spec, url):
        exp_id = get_or_create_experiment(spec.study.name, tracking_uri())  # a deleted one: refused first
        study = open_study(spec, url, create=True)
        if study.direction.name.lower() != spec.study.direction:
            raise CharlmError(f"Study '{spec.study.name}' exists with direction {study.direction.name.lower()}; "
                              f"{spec.path} asks for {spec.study.direction}. Rename the study to start afresh")
        session = Session(spec, url, study, _parent_run(spec, url, study, exp_id), experiment_id=exp_id)
        if spec.pruner.type == "asha":  # for the plots and the report: where the rungs end
            p = spec.pruner
            study.set_user_attr("rung_seconds", rung_budgets(p.min_seconds, p.reduction_factor,
                                                             spec.base_config().train.max_minutes * 60))
        if spec.baseline and not study.user_attrs.get("mlflow_baseline_run_id"):
            log_baseline(session)
        return session


def _parent_run(spec: SweepSpec, url: str, study: optuna.Study, exp_id: str) -> str:
    """The study's parent MLflow run, reopened, or created when the study has none (or lost it)."""
    from mlflow.entities import Param
    client = tracking.client()
    parent = study.user_attrs.get("mlflow_parent_run_id")
    if parent:
        try:
            client.update_run(parent, status="RUNNING")
            return parent
        except Exception:  # the MLflow store was reset while the study survived: start a new parent
            pass
    run = client.create_run(exp_id, run_name=f"study-{spec.study.name}", tags={
        "charlm.role": "study", "optuna.study_name": spec.study.name,
        "mlflow.source.git.commit": git_commit(), "mlflow.note.content":
        f"Optuna study '{spec.study.name}' from {spec.path}; trials are the child runs."})
    parent = run.info.run_id
    study.set_user_attr("mlflow_parent_run_id", parent)
    client.log_batch(parent, params=[Param("sweep_file", spec.path), Param("storage", paths.redact(url)),
                                     Param("sampler", spec.sampler.type), Param("pruner", spec.pruner.type),
                                     Param("n_trials", str(spec.study.n_trials))])
    client.log_artifact(parent, spec.path)  # the sweep exactly as it was run, beside its results
    return parent


def run(spec: SweepSpec, workers: int = 1, worker_index: int | None = None) -> int:
    url = storage_url(spec)
    deadline = time.time() + spec.study.timeout_min * 60 if spec.study.timeout_min else None
    if worker_index is not None:  # a child started by the coordinator below
        study = open_study(spec, url)
        threads_for(workers)
        worker_loop(Session(spec, url, study, study.user_attrs["mlflow_parent_run_id"], worker_index), deadline)
        return 0

    session = prepare(spec, url)
    trials = session.study.get_trials(deepcopy=False)
    print(f"study '{spec.study.name}' in {paths.redact(url)}; MLflow experiment '{spec.study.name}', "
          f"parent run {session.parent_run_id}; {counted(trials)}/{target_trials(spec)} trials so far",
          file=sys.stderr)
    status = "FINISHED"
    shown = SweepProgress(session, deadline)
    try:
        if workers > 1:
            spawn(spec.path, spec.study.n_trials, workers, url, shown)
        # a worker that died after the others had finished leaves its trial to no one: the
        # coordinator fails it, and runs what is queued itself
        worker_loop(session, deadline, shown)
    except (KeyboardInterrupt, SystemExit):
        status = "KILLED"
        raise
    finally:
        shown.close()
        _close_parent(session, status)
    _print_results(session.study)
    print(f"MLflow runs (make ui): {ui_runs_url(session.experiment_id)}")
    return 0


def _close_parent(session: Session, status: str) -> None:
    """The summary (plots only on a finished sweep: on Ctrl-C, exit fast), the report, the status."""
    with contextlib.suppress(Exception):
        refresh_summary(session, plots=status == "FINISHED")
    if status == "FINISHED":
        try:
            print(f"report: {log_report(session.spec, session.study, session.parent_run_id)}", file=sys.stderr)
        except Exception as e:  # the trials are safe either way; say why the report is missing
            print(f"(report skipped: {type(e).__name__}: {e})", file=sys.stderr)
    tracking.client().set_terminated(session.parent_run_id, status=status)


def _print_results(study: optuna.Study) -> None:
    trials = study.get_trials(deepcopy=False)
    print(trials_table(trials, limit=15))
    if any(t.state == TrialState.COMPLETE for t in trials):
        b = study.best_trial
        print(f"best: trial {b.number}, val loss {b.value:.4f} nats/char; MLflow run {b.user_attrs.get('mlflow_run_id')}")


def dry_run(spec: SweepSpec, n: int = 3) -> str:
    lines = [f"study '{spec.study.name}': {spec.study.n_trials} trials, {spec.sampler.type} sampler, "
             f"{spec.pruner.type} pruner" + (f" (reference {spec.pruner.reference})" if spec.pruner.type == "patience" else ""),
             f"storage: {paths.redact(storage_url(spec))}",
             f"base: {spec.base or '(defaults)'}; fixed: {spec.fixed}", "space:"]
    lines += [f"  {p.key:<32} {p.describe()}" for p in spec.space]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=spec.sampler.seed))
    for i in range(n):
        trial = study.ask()
        values = suggest(trial, spec)
        cfg = spec.trial_config(values, i)
        study.tell(trial, 0.0)
        lines.append(f"sample {i}: " + ", ".join(f"{k}={fmt(v)}" for k, v in values.items()))
        lines.append(f"          -> {cfg.model.kind}, context {cfg.data.context}, max_steps {cfg.train.max_steps}")
    return "\n".join(lines)
