"""A running study at a glance: which trials count, counts by state, the parent run's summary,
the trials table and the sweep's progress line."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from charlm.progress import Progress
from charlm.report import state_counts, study_plots
from charlm.space import SweepSpec, space_size
from charlm.storage import Session
from charlm.tracking import tracking_uri

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
PLOT_EVERY_SECONDS = 30.0  # plots and the trials table cost ~1 s at 200 trials; counts are cheap
_last_plots = [0.0]


def counted(trials) -> int:
    """Trials that count towards n_trials: all but the failed ones that were re-queued."""
    retried = {int(t.user_attrs["retry_of"]) for t in trials if "retry_of" in t.user_attrs}
    return sum(1 for t in trials if t.state in COUNTED or (t.state == TrialState.FAIL and t.number not in retried))


def target_trials(spec: SweepSpec) -> int:
    """n_trials, or the grid's size when a grid search has fewer points (no point runs twice)."""
    if spec.sampler.type == "grid":
        return int(min(spec.study.n_trials, space_size(spec)))
    return spec.study.n_trials


def best_complete(study: optuna.Study, trials) -> optuna.trial.FrozenTrial | None:
    """The best COMPLETE trial in the study's own direction, or None before the first."""
    return study.best_trial if any(t.state == TrialState.COMPLETE for t in trials) else None


def refresh_summary(session: Session, plots: bool | None = None) -> dict[str, Any]:
    """Counts, best value and params on the parent run after every trial; plots and a trials table
    at most every PLOT_EVERY_SECONDS per worker, and always when the sweep ends."""
    import tempfile

    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient

    study = session.study
    trials = study.get_trials(deepcopy=False)
    counts = state_counts(trials)
    summary: dict[str, Any] = {"counts": counts}
    finished = counts["complete"] + counts["pruned"] + counts["fail"]
    ts = int(time.time() * 1000)
    metrics = [Metric(f"n_{k}", float(v), ts, finished) for k, v in counts.items() if k != "waiting"]
    tags = []
    best = best_complete(study, trials)
    if best is not None:
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
            "params": " ".join(f"{k.split('.')[-1]}={fmt(v)}" for k, v in t.params.items()),
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


def fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


class SweepProgress:
    """The coordinator's view of the whole study: trials done of the target (pruned and failed
    counted apart), the best value so far and an ETA from the pace since this call started."""

    def __init__(self, session: Session, deadline: float | None):
        self.session, self.deadline = session, deadline
        self.target = target_trials(session.spec)
        self.start_done = counted(session.study.get_trials(deepcopy=False))
        self.t0 = time.time()
        self.bar = Progress(f"sweep {session.spec.study.name}", self.target, "trial", initial=self.start_done)
        self.shown = self.start_done

    def update(self) -> None:
        study = self.session.study
        trials = study.get_trials(deepcopy=False)
        done = counted(trials)
        if done == self.shown:
            return
        self.bar.advance(done - self.shown)
        self.shown = done
        n = state_counts(trials)
        best_trial = best_complete(study, trials)
        best = f"{best_trial.value:.4f}" if best_trial is not None else "-"
        rate = (time.time() - self.t0) / max(1, done - self.start_done)
        eta = rate * max(0, self.target - done)
        if self.deadline:
            eta = min(eta, max(0.0, self.deadline - time.time()))
        eta_text = f"{int(eta // 60)}m{int(eta % 60):02d}s"
        self.bar.event(f"{done}/{self.target} trials ({n['pruned']} pruned, {n['fail']} failed), "
                       f"best val {best}, ETA {eta_text}", pruned=n["pruned"], failed=n["fail"],
                       best=best, eta=eta_text)

    def close(self) -> None:
        self.bar.close()
