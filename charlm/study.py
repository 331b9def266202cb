"""Sweep YAML -> Optuna study; one MLflow child run per trial under one parent run per study.

``run`` prepares the study (charlm/storage.py) and its parent run once, then runs trials here or
in ``--workers`` child processes (charlm/workers.py), each a child run (charlm/objective.py); the
parent run's summary and report come from charlm/report.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time

import optuna
from optuna.trial import TrialState

from charlm import config, paths, plan, preflight, tracking
from charlm.errors import CharlmError, OutsideFault
from charlm.objective import COVER, ENQUEUED, log_baseline
from charlm.promotion import RUNG, rung_budgets
from charlm.report import SweepProgress, counted, fmt, log_report, refresh_summary, target_trials, trials_table
from charlm.space import suggest
from charlm.storage import Session, open_planned, open_study, retune, storage_fault, storage_url, study_lock
from charlm.sweepfile import SweepSpec
from charlm.tracking import get_or_create_experiment, git_commit, tracking_uri, ui_runs_url
from charlm.workers import spawn, threads_for, worker_loop


def prepare(spec: SweepSpec, url: str, started_at: float | None = None, warm_start: str | None = None) -> Session:
    """Create (or find) the MLflow experiment, the study and its parent run, once, before any
    worker; under the study's lock, so two `make sweep` started at once share one of each. A
    budgeted sweep plans here (charlm/plan.py) and a fresh study queues its known configurations.
    First, the text and every place it writes are checked (charlm/preflight.py): one line, and
    nothing started."""
    import tempfile

    from charlm.data import resolve_corpus

    resolve_corpus(spec.base_config().data.path)  # the text every trial reads: absent, one line before any run
    preflight.tracking(tracking_uri())
    preflight.optuna_storage(url)  # before its lock file is made beside it
    preflight.folder(tempfile.gettempdir(), "the scratch folder (TMPDIR) trials write their files to")
    with study_lock(spec, url):
        exp_id = get_or_create_experiment(spec.study.name, tracking_uri())  # a deleted one: refused first
        study = open_study(spec, url, create=True)
        if study.direction.name.lower() != spec.study.direction:
            raise CharlmError(f"Study '{spec.study.name}' exists with direction {study.direction.name.lower()}; "
                              f"{spec.path} asks for {spec.study.direction}. Rename the study to start afresh")
        if spec.study.budget:
            spec = _planned(spec, study, started_at)
            retune(study, spec)
        fresh = not study.get_trials(deepcopy=False)
        session = Session(spec, url, study, _parent_run(spec, url, study, exp_id), experiment_id=exp_id,
                          stop_at=spec.plan.study_deadline if spec.plan else None)
        if spec.plan is not None:
            tracking.client().log_text(session.parent_run_id, spec.plan.describe() + "\n\n" + spec.plan.to_json(),
                                       "plan.txt")
        warm = warm_start_values(spec, warm_start) if warm_start else []  # a bad name fails before any work
        if fresh:
            enqueue_known(session, warm)
        elif warm:
            print(f"--warm-start {warm_start}: study '{spec.study.name}' has trials already; its queue is left as "
                  "it is (a warm start seeds a new study)", file=sys.stderr)
        if spec.pruner.type == "asha":  # for the plots and the report: where the rungs end
            p = spec.pruner
            study.set_user_attr("rung_seconds", rung_budgets(p.min_seconds, p.reduction_factor,
                                                             spec.base_config().train.max_minutes * 60))
        if spec.baseline and not study.user_attrs.get("mlflow_baseline_run_id"):
            try:
                log_baseline(session)
            except BaseException as e:  # a bad baseline, or Ctrl-C in it: the parent run is not left RUNNING
                tracking.client().set_terminated(session.parent_run_id,
                                                 status="KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
                raise
        return session


def _planned(spec: SweepSpec, study: optuna.Study, started_at: float | None) -> SweepSpec:
    """The study's plan: made now for a new study (this machine measured), or the one it keeps with
    the deadline moved to this call's budget (its clock and rungs stay: paused trials depend on them)."""
    budget = plan.parse_duration(spec.study.budget)
    now = time.time() if started_at is None else started_at
    kept = study.user_attrs.get(plan.PLAN_ATTR)
    if kept:
        made = plan.Plan.from_json(kept)
        made = dataclasses.replace(made, started_at=now, budget_s=budget, study_s=made.study_s + budget - made.budget_s)
        print("resuming the study's plan with a new deadline", file=sys.stderr)
    else:
        print(f"measuring this machine for a {budget / 60:g}-minute plan ...", file=sys.stderr, flush=True)
        made = plan.make_plan(spec, budget, plan.measure(spec), started_at=now)
    study.set_user_attr(plan.PLAN_ATTR, made.to_json())
    print(made.describe(), file=sys.stderr, flush=True)
    return plan.apply(spec, made)


def base_values(spec: SweepSpec) -> tuple[dict, list[str]]:
    """The base experiment's own values for the space's keys (its hand-chosen default), and the
    keys where it lies outside the space (those the sampler draws)."""
    flat = config.flatten(spec.base_config())
    values, outside = {}, []
    for p in spec.space:
        if p.when is not None and str(values.get(p.when[0], flat.get(p.when[0]))) not in map(str, p.when[1]):
            continue
        if p.kind == "fixed" or p.key not in flat:  # a key the base's kind has not: the sampler draws it
            continue
        v = flat[p.key]
        inside = (v in p.choices) if p.kind == "choice" else p.low <= v <= p.high
        if inside:
            values[p.key] = v
        else:
            outside.append(f"{p.key}={v}")
    return values, outside


def queues_base(spec: SweepSpec) -> bool:
    """The base experiment goes first, but in a grid search (the grid is every point, each once)."""
    return spec.study.enqueue_base and bool(spec.space) and spec.sampler.type != "grid"


def known_trials(spec: SweepSpec, warm: list[tuple[dict, str]] = ()) -> list[tuple[dict, dict]]:
    """The study's first trials, in order, each with the user attributes that say where it came
    from: the base experiment's configuration, the sweep file's ``enqueue:`` list, ``--warm-start``'s
    trials (queued: :data:`ENQUEUED`), then one partial draw per value of ``study.cover`` that none
    of them has (:data:`COVER`: that value fixed, the rest drawn, judged like any draw). On val, 45m
    studies: a drawn LSTM was the best trial of every study that drew one (1.3560 to 1.3709), and
    seed 2 on an AVX2 machine drew six trials, none an LSTM, and ended at 1.5675."""
    queued = [(base_values(spec)[0], "base")] if queues_base(spec) else []
    queued += [(values, f"sweep file #{i}") for i, values in enumerate(spec.enqueue)]
    queued += list(warm)
    first = [(values, {ENQUEUED: source}) for values, source in queued]
    key = spec.study.cover
    if key and spec.sampler.type != "grid":
        seen = {values.get(key) for values, _ in queued}
        choices = next(p.choices for p in spec.space if p.key == key)
        first += [({key: c}, {COVER: f"{key}={c}"}) for c in choices if c not in seen]
    return first


def enqueue_known(session: Session, warm: list[tuple[dict, str]]) -> None:
    """Before any draw: :func:`known_trials`, in Optuna's queue."""
    spec, study = session.spec, session.study
    if queues_base(spec):
        outside = base_values(spec)[1]
        if outside:
            print(f"the base experiment lies outside the space at {', '.join(outside)}: its queued trial draws "
                  "those", file=sys.stderr)
    first = known_trials(spec, warm)
    for values, attrs in first:
        study.enqueue_trial(values, user_attrs=attrs, skip_if_exists=True)
    if first:
        print(f"queued first: {', '.join(_source(attrs) for _, attrs in first)}", file=sys.stderr)


def _source(attrs: dict) -> str:
    return attrs[ENQUEUED] if ENQUEUED in attrs else f"a draw with {attrs[COVER]}" if COVER in attrs else "drawn"


WARM_START_TRIALS = 3


def warm_start_values(spec: SweepSpec, name: str) -> list[tuple[dict, str]]:
    """The best finished trials of study ``name`` in this sweep's storage (its own journal by
    default), their values for this space's keys."""
    from charlm.storage import open_storage

    url = spec.study.storage or paths.default_storage(name)
    journal = paths.journal_path(url)
    if journal is not None and not journal.is_file():
        raise CharlmError(f"--warm-start {name}: no study journal {journal}; give a study this storage holds")
    try:
        other = optuna.load_study(study_name=name, storage=open_storage(url))
    except KeyError:
        raise CharlmError(f"--warm-start {name}: no such study in {paths.redact(url)}") from None
    keys = {p.key for p in spec.space}
    done = [t for t in other.get_trials(deepcopy=False) if t.value is not None and
            t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    best = sorted(done, key=lambda t: t.value)[:WARM_START_TRIALS]
    if not best:
        raise CharlmError(f"--warm-start {name}: the study has no finished trial to start from")
    return [({k: v for k, v in t.params.items() if k in keys}, f"warm start {name}#{t.number}") for t in best]


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
    planned = spec.plan.params() if spec.plan is not None else {}
    client.log_batch(parent, params=[Param("sweep_file", spec.path), Param("storage", paths.redact(url)),
                                     Param("sampler", spec.sampler.type), Param("pruner", spec.pruner.type),
                                     Param("n_trials", str(spec.study.n_trials)),
                                     *(Param(k, v) for k, v in planned.items())])
    client.log_artifact(parent, spec.path)  # the sweep exactly as it was run, beside its results
    return parent


def run(spec: SweepSpec, workers: int = 1, worker_index: int | None = None, started_at: float | None = None,
        warm_start: str | None = None) -> optuna.Study:
    """Run (or, as ``worker_index``, help run) the study; returns it, as its storage holds it now."""
    url = storage_url(spec)
    deadline = time.time() + spec.study.timeout_min * 60 if spec.study.timeout_min else None
    if worker_index is not None:  # a child started by the coordinator below
        spec, study = open_planned(spec, url)
        if spec.plan is not None:
            deadline = spec.plan.study_deadline
        threads_for(workers)
        # in flight, only the plan's deadline stops a trial; timeout_min only stops new ones, as in the coordinator
        worker_loop(Session(spec, url, study, study.user_attrs["mlflow_parent_run_id"], worker_index,
                            stop_at=spec.plan.study_deadline if spec.plan else None, deadline=deadline), deadline)
        return study

    session = prepare(spec, url, started_at, warm_start)
    spec = session.spec
    if spec.plan is not None:
        deadline = spec.plan.study_deadline
    session.deadline = deadline
    trials = session.study.get_trials(deepcopy=False)
    print(f"study '{spec.study.name}' in {paths.redact(url)}; MLflow experiment '{spec.study.name}', "
          f"parent run {session.parent_run_id}; {counted(trials)}/{target_trials(spec)} trials so far",
          file=sys.stderr)
    status = "FINISHED"
    shown = SweepProgress(session, deadline)
    try:
        if workers > 1:
            extra = (*(("--budget", spec.study.budget) if spec.study.budget else ()),
                     *(("--text", spec.text) if spec.text else ()), "--seed", str(spec.sampler.seed))
            spawn(spec.path, spec.study.n_trials, workers, url, shown, extra)
        # a worker that died after the others had finished leaves its trial to no one: the
        # coordinator fails it, and runs what is queued itself
        worker_loop(session, deadline, shown)
    except (KeyboardInterrupt, SystemExit):
        status = "KILLED"
        raise
    except OutsideFault:
        status = "FAILED"
        raise
    except Exception as e:
        status = "FAILED"
        if tracking.outside(e) and not isinstance(e, OSError):  # the storage, between trials
            raise storage_fault(url, e).keeping("the study's finished trials are kept in it: run the sweep again "
                                                "to go on") from None
        raise
    finally:
        shown.close()
        _close_parent(session, status)
    _print_results(session.study)
    print(f"MLflow runs (make ui): {ui_runs_url(session.experiment_id)}")
    return session.study


def _close_parent(session: Session, status: str) -> None:
    """The summary (plots only on a finished sweep: on Ctrl-C, exit fast), the report, the status."""
    with contextlib.suppress(Exception):
        refresh_summary(session, plots=status == "FINISHED")
    if status == "FINISHED":
        try:
            print(f"report: {log_report(session.spec, session.study, session.parent_run_id)}", file=sys.stderr)
        except Exception as e:  # the trials are safe either way; say why the report is missing
            print(f"(report skipped: {type(e).__name__}: {e})", file=sys.stderr)
    try:
        tracking.client().set_terminated(session.parent_run_id, status=status)
    except Exception as e:
        if status == "FINISHED" or not tracking.outside(e):
            raise
        # the store is down, and the error on its way out says so; the next sweep resumes this run


def _print_results(study: optuna.Study) -> None:
    trials = study.get_trials(deepcopy=False)
    print(trials_table(trials, limit=15))
    from charlm.retrain import winner

    b = winner(study)  # what `best` retrains: a trial paused for good may beat the finished ones
    if b is not None:
        where = "" if b.state == TrialState.COMPLETE else f" (paused at rung {b.system_attrs[RUNG]})"
        print(f"best: trial {b.number}, val loss {b.value:.4f} nats/char{where}; MLflow run "
              f"{b.user_attrs.get('mlflow_run_id')}")


def dry_run(spec: SweepSpec, n: int = 3) -> str:
    """The study as it would run: the space, the plan (this machine measured), and its first trials,
    drawn by the study's own sampler after the queued ones, as trial numbers 0, 1, 2 ... get them."""
    made = None
    if spec.study.budget:
        made = plan.make_plan(spec, plan.parse_duration(spec.study.budget), plan.measure(spec))
        spec = plan.apply(spec, made)
    lines = [f"study '{spec.study.name}': {spec.study.n_trials} trials, {spec.sampler.type} sampler "
             f"(seed {spec.sampler.seed}), {spec.pruner.type} pruner"
             + (f" (reference {spec.pruner.reference})" if spec.pruner.type == "patience" else ""),
             f"storage: {paths.redact(storage_url(spec))}",
             f"base: {spec.base or '(defaults)'}" + (f"; text: {spec.text}" if spec.text else "")
             + f"; fixed: {spec.fixed}", "space:"]
    lines += [f"  {p.key:<32} {p.describe()}" for p in spec.space]
    if made is not None:
        lines.append(made.describe())
    from charlm.search import make_sampler

    study = optuna.create_study(sampler=make_sampler(spec))
    first = known_trials(spec)
    for values, attrs in first:
        study.enqueue_trial(values, user_attrs=attrs)
    for i in range(max(n, len(first) + 2)):
        trial = study.ask()
        values = suggest(trial, spec)
        cfg = spec.trial_config(values, i)
        study.tell(trial, state=TrialState.FAIL)  # nothing learnt: the draws as the study's first ones
        source = _source(trial.user_attrs)
        lines.append(f"trial {i} ({source}): " + ", ".join(f"{k}={fmt(v)}" for k, v in values.items()))
        lines.append(f"          -> {cfg.model.kind}, context {cfg.data.context}, clock "
                     f"{cfg.train.max_minutes:.2f} min" + ("" if cfg.train.clock_only else
                                                           f", max_steps {cfg.train.max_steps}"))
    return "\n".join(lines)
