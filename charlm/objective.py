"""One trial, start to end: suggest a config, train it as an MLflow child run, report every
evaluation to the pruner, and tell Optuna how it ended. Also the baseline run beside the trials.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from pathlib import Path

import optuna
from optuna.trial import TrialState

from charlm import config, promotion
from charlm.data import Corpus, load_corpus
from charlm.device import explain
from charlm.errors import CorruptState, OutsideFault
from charlm.plan import first_bracket, room_for
from charlm.promotion import rung_budgets
from charlm.search import compute_step
from charlm.space import suggest
from charlm.storage import Session, artifact_store, storage_fault
from charlm.tracking import MlflowTracker, outside, ui_runs_url
from charlm.trainer import EvalEvent, RunResult, StopReason, train

ENQUEUED = "charlm.enqueued"  # user attribute and MLflow tag: where a queued trial's configuration came from
COVER = "charlm.cover"  # user attribute and MLflow tag: the value of study.cover a first draw was given (a drawn trial)
COVER_TRY = "charlm.cover_try"  # user attribute: which draw of its covered value this is (1 is the first)
COVER_TRIES = 3  # a covered value whose draws are too slow for every rung is drawn this often at most
PREVIEW = "preview_seconds"  # user attr: the rung-end previews' seconds, compute spent off the trial's clock
MAX_RETRIES = 2  # a trial whose worker died is re-queued at most this many times
_CORPUS: dict[tuple, Corpus] = {}


def corpus_for(cfg: config.Config) -> Corpus:
    """Every trial of a process shares one encoded corpus (same file, same splits)."""
    key = (cfg.data.path, cfg.data.val_fraction, cfg.data.test_fraction)
    if key not in _CORPUS:
        _CORPUS[key] = load_corpus(cfg.data)
    return _CORPUS[key]


def trial_state(result: RunResult) -> TrialState:
    """How a training's stop reason ends its Optuna trial. A run that diverged after a good
    evaluation holds valid restored weights and a finite full-pass value: COMPLETE with that value
    (its run keeps ``stop_reason=diverged``); one that diverged before any good evaluation: FAIL."""
    if result.stop_reason is StopReason.PRUNED:
        return TrialState.PRUNED
    if result.stop_reason is StopReason.DEADLINE:  # stopped by the study's deadline: its val-slice best stands
        return TrialState.COMPLETE if math.isfinite(result.slice_val_loss) else TrialState.FAIL
    if not math.isfinite(result.best_val_loss):
        return TrialState.FAIL
    return TrialState.COMPLETE


class Reporter:
    """The trainer's ``on_eval`` for a trial: report the best value so far at the evaluation's
    compute step (training milliseconds: peers are compared at equal seconds) and ask the pruner.
    A promoted trial's reporter carries on from what the trial reported before."""

    def __init__(self, trial: optuna.Trial, before: optuna.trial.FrozenTrial | None = None):
        values = before.intermediate_values if before is not None else {}
        self.trial, self.best = trial, min(values.values(), default=math.inf)
        self.last: int | None = max(values, default=None)

    def report(self, value: float, elapsed: float | None = None) -> None:
        """``elapsed`` None: just after the last report (a rung's preview of the same moment)."""
        self.best = min(self.best, value)
        self.last = compute_step(elapsed, self.last) if elapsed is not None else (self.last or 0) + 1
        self.trial.report(self.best, self.last)

    def __call__(self, ev: EvalEvent) -> StopReason | None:
        self.report(ev.best_val_loss, ev.elapsed)  # best so far: a pruned trial's value is its best
        return StopReason.PRUNED if self.trial.should_prune() else None


def bracket_for(session: Session, trial: optuna.Trial, cfg: config.Config) -> int | None:
    """A new ASHA trial's bracket: its number's (charlm/promotion.py ``bracket_of``), moved later
    where the plan's measured speed gives it too few steps in that bracket's first rung, earlier
    where the deadline leaves no time for it (charlm/plan.py ``first_bracket``); None: none fits
    (a queued trial, the base experiment's above all, then runs in the last bracket all the same).
    A queued trial (the base, the sweep file's ``enqueue:``, ``--warm-start``) starts in the last
    bracket, unjudged to the clock, where the deadline leaves the time: it is there because it is known to be good at the clock, and a
    short rung misjudges exactly such a model (on val, 45m study, seed 2: the base GPT's 1.65 at
    134 s trailed a 2 x 128 GPT's 1.52 there, and led everything at the clock with 1.354)."""
    p = session.spec.pruner
    budgets = rung_budgets(p.min_seconds, p.reduction_factor, cfg.train.max_minutes * 60)
    queued = ENQUEUED in trial.user_attrs
    drawn = p.brackets - 1 if queued else promotion.bracket_of(
        trial.number, promotion.bracket_shares(budgets, p.reduction_factor, p.brackets))
    first = first_bracket(cfg, drawn, budgets, session.spec.plan, session.stop_at)
    if first is None and queued:  # the user's own default is never skipped: unjudged to the clock
        return p.brackets - 1
    return first


def climb(session: Session, trial: optuna.Trial, cfg: config.Config, tracker: MlflowTracker,
          before: optuna.trial.FrozenTrial | None, first: int = 0) -> tuple[RunResult, Reporter] | None:
    """ASHA (charlm/promotion.py): train rung after rung while the trial ranks in the top fraction
    of its rung; None when it pauses, its state kept with its MLflow run for whoever promotes it.
    ``first``: a new trial's bracket (:func:`bracket_for`)."""
    p, storage = session.spec.pruner, session.study._storage
    budgets = rung_budgets(p.min_seconds, p.reduction_factor, cfg.train.max_minutes * 60)
    if before is None:  # a new trial: its bracket's first rung is the first it is judged at
        storage.set_trial_system_attr(trial._trial_id, promotion.BRACKET, first)
        tracker.set_tags({"bracket": first})
        k = first
    else:
        first, k = before.system_attrs.get(promotion.BRACKET, 0), before.system_attrs[promotion.RUNG] + 1
    state_path = tracker.download(promotion.STATE_ARTIFACT) if before is not None else \
        tracker.workdir / Path(promotion.STATE_ARTIFACT).name
    on_eval = Reporter(trial, before)
    while True:
        top = k == len(budgets) - 1
        result = train(cfg, tracker, on_eval, corpus=corpus_for(cfg), state_path=state_path, progress=False,
                       until=None if top else budgets[k], continued=k > first, stop_at=session.stop_at)
        if result.stop_reason is not StopReason.RUNG_END:
            return result, on_eval  # the top rung's end, its own patience, divergence
        mine = storage.get_trial(trial._trial_id).system_attrs
        if mine.get(promotion.PAUSED) or mine.get("charlm.pid") != os.getpid():  # judged dead while alive
            tracker.set_tags({"error": "paused or taken over by another worker; this rung is discarded"})
            return None
        on_eval.report(result.rung_value)
        tracker.log_metrics({"rung": k}, step=result.steps)  # rung_value is among the result's metrics
        tracker.log_artifact(state_path, str(Path(promotion.STATE_ARTIFACT).parent))  # any host can go on from here
        storage.set_trial_system_attr(trial._trial_id, promotion.rung_key(k), result.rung_value)
        storage.set_trial_system_attr(trial._trial_id, promotion.RUNG, k)
        spent = {"steps": result.steps, "train_seconds": round(result.train_seconds, 3),  # previews: every rung's so far
                 PREVIEW: round(trial.user_attrs.get(PREVIEW, 0.0) + result.preview_seconds, 3)}
        for key, v in spent.items():
            trial.set_user_attr(key, v)  # where it stands, should it pause here for good
        if not promotion.promotable(session.study.get_trials(deepcopy=False), k, trial.number, p.reduction_factor) \
                or not room_for(session.spec, session.deadline or session.stop_at)(k):  # no time to climb: paused for the closing promotion
            storage.set_trial_system_attr(trial._trial_id, promotion.PAUSED, True)
            tracker.set_tags({"optuna.state": "PAUSED", "rung": k})
            return None
        k += 1


def run_trial(session: Session, trial: optuna.Trial, before: optuna.trial.FrozenTrial | None = None) -> TrialState | None:
    """Train one trial (``before``: a paused trial promoted, continued from its state); None when it
    pauses at a rung. An exception fails this trial only; Ctrl-C/SIGTERM re-queues it and stops."""
    spec, study = session.spec, session.study
    tracker = None
    try:
        cfg = spec.trial_config(suggest(trial, spec), trial.number)
        first = 0
        if before is None and spec.pruner.type == "asha":
            first = bracket_for(session, trial, cfg)
            if first is None:
                return skip(study, trial, cfg)
        if before is not None:
            tracker = MlflowTracker(spec.study.name, run_id=before.user_attrs["mlflow_run_id"])
        else:
            for key in ("patience", "min_relative_improvement", "validation_interval"):
                trial.set_user_attr(key, getattr(cfg.train, key))  # the pruner applies the trial's own rule
            tracker = new_run(session, trial, cfg)
        with tracker:
            if spec.pruner.type == "asha":
                climbed = climb(session, trial, cfg, tracker, before, first)
                if climbed is None:
                    return None
                result, on_eval = climbed
            else:
                on_eval = Reporter(trial)
                result = train(cfg, tracker, on_eval, corpus=corpus_for(cfg), progress=False, stop_at=session.stop_at)
            show_in_dashboard(trial, tracker, result, spec.study.name)
            state = _close_run(tracker, result)
        return _tell(study, trial, result, state, on_eval.best)
    except (KeyboardInterrupt, SystemExit):
        # interrupted, not broken: a trial past a rung pauses there (the next call goes on from its
        # saved state); any other fails and its parameters are queued for the next call
        with contextlib.suppress(Exception):
            if promotion.RUNG in study._storage.get_trial(trial._trial_id).system_attrs:
                study._storage.set_trial_system_attr(trial._trial_id, promotion.PAUSED, True)
                if tracker is not None:
                    tracker.set_tags({"optuna.state": "PAUSED", "stop_reason": StopReason.INTERRUPTED})
            else:
                study.tell(trial, state=TrialState.FAIL)
                requeue(study, study.trials[trial.number])
                if tracker is not None:
                    tracker.set_tags({"optuna.state": "FAIL", "stop_reason": StopReason.INTERRUPTED})
        raise
    except Exception as e:
        if isinstance(e, OutsideFault) or outside(e):
            raise _outside_fault(session, trial, e) from None
        return _broken(study, trial, tracker, e)


def _outside_fault(session: Session, trial: optuna.Trial, e: Exception) -> OutsideFault:
    """A store, server or disk failed: not the trial's fault, and the next trial would fail alike.
    The trial is queued again (a trial past a rung pauses there) and the sweep stops in one line.
    An error that is not already one of charlm's comes from the Optuna storage (MLflow's calls and
    charlm's writes raise their own): the line names the storage."""
    study = session.study
    if not isinstance(e, OutsideFault):
        if isinstance(e, OSError) and e.filename:
            e = OutsideFault(f"trial {trial.number} could not use {e.filename}: {e.strerror or e}; check its disk")
        else:
            e = storage_fault(session.storage_url, e, f"during trial {trial.number}")
    with contextlib.suppress(Exception):  # a storage that is down takes neither: the next sweep fails it
        if promotion.RUNG in study._storage.get_trial(trial._trial_id).system_attrs and \
                not isinstance(e, CorruptState):
            study._storage.set_trial_system_attr(trial._trial_id, promotion.PAUSED, True)
        else:
            study.tell(trial, state=TrialState.FAIL)
            requeue(study, study.trials[trial.number])
    return e.keeping(f"trial {trial.number} is queued to run again; the study's finished trials are kept in "
                     "its storage: run the sweep again to go on")


def _broken(study: optuna.Study, trial: optuna.Trial, tracker: MlflowTracker | None, e: Exception) -> TrialState:
    """One broken trial never stops the sweep: it fails, and the reason stays on its run."""
    message = explain(e)
    print(f"trial {trial.number} failed: {message}", file=sys.stderr)
    with contextlib.suppress(Exception):
        trial.set_user_attr("error", message[:1000])
        if tracker is not None:
            tracker.set_tags({"optuna.state": "FAIL", "stop_reason": StopReason.ERROR, "error": message[:5000]})
            tracker.end("FAILED")
    with contextlib.suppress(Exception):
        study.tell(trial, state=TrialState.FAIL)
    return TrialState.FAIL


def skip(study: optuna.Study, trial: optuna.Trial, cfg: config.Config) -> TrialState:
    """A configuration no bracket fits, at this budget on this machine: PRUNED untrained, the reason
    kept on the trial, so the sampler learns to leave its region and no time is spent on it."""
    why = (f"skipped untrained: a {cfg.model.kind} this slow gets too few steps in any rung that fits "
           "the plan and the deadline (charlm/plan.py)")
    trial.set_user_attr("skipped", why)
    study.tell(trial, state=TrialState.PRUNED)
    print(f"trial {trial.number}: {why}", file=sys.stderr)
    cover_again(study, trial)
    return TrialState.PRUNED


def cover_again(study: optuna.Study, trial: optuna.Trial) -> None:
    """A covered draw (``study.cover``) skipped as too slow is drawn again with its value kept, up to
    :data:`COVER_TRIES` draws: its kind is not lost to one draw of its largest sizes. On val, 12m
    seed 0 on an AVX2 machine: the study's one LSTM draw (3 x 512 on 256 characters) was skipped,
    and the study ended on a feed-forward net at 1.8275, where at 45m a 1 x 256 LSTM led with 1.3709.
    Skipping costs no training: the speed is the plan's measured one."""
    covered, tries = trial.user_attrs.get(COVER), trial.user_attrs.get(COVER_TRY, 1)
    if covered is None or tries >= COVER_TRIES:
        return
    key = covered.partition("=")[0]
    study.enqueue_trial({key: trial.params[key]}, user_attrs={COVER: covered, COVER_TRY: tries + 1})
    print(f"trial {trial.number}: {covered} is drawn again (draw {tries + 1} of at most {COVER_TRIES})",
          file=sys.stderr)


def new_run(session: Session, trial: optuna.Trial, cfg: config.Config) -> MlflowTracker:
    """The trial's MLflow run: a child of the study's run, its id kept on the trial."""
    spec = session.spec
    tracker = MlflowTracker(spec.study.name, cfg.name, parent_run_id=session.parent_run_id, tags={
        "optuna.study_name": spec.study.name, "optuna.trial_number": str(trial.number),
        "mlflow.note.content": f"Trial {trial.number} of Optuna study '{spec.study.name}' "
        f"({Path(spec.path).name}): a {cfg.model.kind} with the sampled parameters, seed {cfg.train.seed}; "
        "a child of the study's run."})
    trial.set_user_attr("mlflow_run_id", tracker.run_id)
    tracker.log_metrics({"trial_number": trial.number}, step=0)  # a metric, so the UI can chart by it
    if "retry_of" in trial.user_attrs:
        tracker.set_tags({"optuna.retry_of": trial.user_attrs["retry_of"]})
    for key in (ENQUEUED, COVER):  # the base experiment, the sweep file's list, a warm start; a covered value
        if key in trial.user_attrs:
            tracker.set_tags({key: trial.user_attrs[key]})
    return tracker


def show_in_dashboard(trial: optuna.Trial, tracker: MlflowTracker, result: RunResult, study: str) -> None:
    """What optuna-dashboard shows on the trial: its loss curve (Optuna's artifact store) and a note
    linking to its MLflow run. Before the trial is told: a finished trial takes no more attributes."""
    from optuna.artifacts import upload_artifact
    from optuna_dashboard import save_note

    try:
        curve = tracker.workdir / "loss_curve.png"
        if curve.is_file():
            upload_artifact(study_or_trial=trial, file_path=str(curve), artifact_store=artifact_store(study))
        url = ui_runs_url(tracker.experiment_id, tracker.run_id)
        save_note(trial, f"MLflow run [{tracker.run_id}]({url}) (open with `make ui`)\n\n"
                         f"stop: {result.stop_reason} after {result.steps} steps; best val loss "
                         f"{result.slice_val_loss:.4f} nats/char on the val slice; {result.n_params:,} parameters")
    except Exception as e:  # the trial's result stands without its dashboard extras
        print(f"trial {trial.number}: dashboard artifact/note skipped ({type(e).__name__}: {e})", file=sys.stderr)


def _close_run(tracker: MlflowTracker, result: RunResult) -> TrialState:
    state = trial_state(result)
    tracker.set_tags({"optuna.state": state.name})
    if state == TrialState.PRUNED:
        tracker.set_tags({"prune_step": result.steps, "prune_seconds": round(result.train_seconds, 3)})
        tracker.log_metrics({"prune_step": result.steps}, step=result.steps)
    elif state == TrialState.FAIL:
        tracker.end("FAILED")
    return state


def _tell(study: optuna.Study, trial: optuna.Trial, result: RunResult, state: TrialState,
          value: float | None = None) -> TrialState:
    """Every trial's value is its best intermediate evaluation (the val slice the pruner compared,
    ``value`` when its reports went beyond this result's), pruned or not: one protocol ranks them
    all. The full passes of a finished trial are attributes."""
    attrs = {"stop_reason": str(result.stop_reason), "steps": result.steps, "full_val_loss": result.best_val_loss,
             "test_loss": result.test_loss, "train_seconds": round(result.train_seconds, 3),
             "final_eval_seconds": round(result.final_eval_seconds, 3), "finish_seconds": round(result.finish_seconds, 3)}
    if result.early_stop_step is not None:
        attrs["early_stop_step"] = result.early_stop_step
    for k, v in attrs.items():
        trial.set_user_attr(k, v)
    if state == TrialState.COMPLETE:
        study.tell(trial, result.slice_val_loss if value is None else min(value, result.slice_val_loss))
    else:
        study.tell(trial, state=state)
    return state


def requeue(study: optuna.Study, t) -> None:
    """Queue a failed trial's parameters again (at most MAX_RETRIES times along one chain)."""
    history = list(t.user_attrs.get("retry_history", [])) + [t.number]
    if len(history) <= MAX_RETRIES:
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number, "retry_history": history})


def log_baseline(session: Session) -> None:
    """Train the sweep's baseline experiment once, as a run beside the trials (not a trial)."""
    spec = session.spec
    cfg = spec.baseline_config()
    tags = {"charlm.role": "baseline", "charlm.study_run": session.parent_run_id, "optuna.study_name": spec.study.name,
            "mlflow.note.content": f"Baseline of Optuna study '{spec.study.name}': {Path(spec.baseline).name} "
            f"({cfg.model.kind}) trained once, seed {cfg.train.seed}, as the floor the trials should beat; not a trial."}
    with MlflowTracker(spec.study.name, f"baseline-{cfg.name}", tags=tags) as tracker:
        result = train(cfg, tracker, corpus=corpus_for(cfg), progress=False)
    session.study.set_user_attr("mlflow_baseline_run_id", tracker.run_id)
    print(f"baseline {cfg.name} ({cfg.model.kind}): val {result.best_val_loss:.4f}, test {result.test_loss:.4f} "
          f"nats/char; MLflow run {tracker.run_id}", file=sys.stderr)
