"""A study, explained, on its parent run: counts and the best trial after every trial
(``refresh_summary``), the progress line (``SweepProgress``), plots (``study_plots``: history,
importances, intermediate values, quality vs time) and ``report.md`` under
``mlruns/reports/<study>/`` (counts, top trials, compute saved, the best model's test figures),
rebuilt at any time by ``python -m charlm report SWEEP.yaml``.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from charlm import paths, tracking
from charlm.plots import pyplot
from charlm.progress import Progress
from charlm.promotion import is_paused
from charlm.space import space_size
from charlm.storage import Session
from charlm.sweepfile import SweepSpec


def state_counts(trials) -> dict[str, int]:
    """``{"complete": 5, "pruned": 2, "fail": 0, ...}`` over every Optuna state."""
    return {s.name.lower(): sum(1 for t in trials if t.state == s) for s in TrialState}


def quality_vs_time(study: optuna.Study, path: Path) -> Path | None:
    """Every finished trial's reports on the compute axis (training seconds) as a faint curve, its
    value as a marker, by model kind and state; dashed lines where an ASHA study's rungs end."""
    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
              if "train_seconds" in t.user_attrs and _judged(t)]
    if not trials:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    kinds = sorted({str(t.params.get("model.kind", "model")) for t in trials})
    colors = dict(zip(kinds, ["tab:orange", "tab:blue", "tab:green", "tab:red", "tab:purple"]))
    for t in trials:
        curve = sorted(t.intermediate_values.items())
        if len(curve) > 1:
            ax.plot([s / 1000 for s, _ in curve], [v for _, v in curve], color=colors[str(t.params.get("model.kind",
                    "model"))], alpha=0.25, linewidth=0.8)
    for kind in kinds:
        for state, marker in ((TrialState.COMPLETE, "o"), (TrialState.PRUNED, "x")):
            pts = [(t.user_attrs["train_seconds"], _value(t), t.number) for t in trials
                   if str(t.params.get("model.kind", "model")) == kind and t.state == state]
            if not pts:
                continue
            xs, ys, ns = zip(*pts)
            ax.scatter(xs, ys, marker=marker, color=colors[kind], label=f"{kind} {state.name.lower()} ({len(pts)})")
            for x, y, n in pts:
                ax.annotate(str(n), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for k, seconds in enumerate(study.user_attrs.get("rung_seconds", [])):
        ax.axvline(seconds, color="gray", linestyle="--", linewidth=0.8)
        ax.annotate(f"rung {k}", (seconds, 1), xycoords=("data", "axes fraction"), fontsize=7, rotation=90,
                    xytext=(-9, -40), textcoords="offset points", color="gray")
    ax.set_xlabel("training seconds (the compute axis)")
    ax.set_ylabel("val loss, nats/char (best so far; pruned: before pruning)")
    ax.set_title(f"study '{study.study_name}': quality vs compute")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _judged(t) -> bool:
    """A value or a report: a trial skipped untrained (too slow for any rung, charlm/objective.py) has neither."""
    return t.value is not None or bool(t.intermediate_values)


def _value(t) -> float:
    return t.value if t.value is not None else min(t.intermediate_values.values())


def study_plots(study: optuna.Study, folder: Path) -> list[Path]:
    """The study's plots as PNG files in ``folder``; a plot that cannot be drawn yet is skipped."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return []
    plt = pyplot()
    from optuna.visualization import matplotlib as ovm

    plots = {"optimization_history.png": lambda: ovm.plot_optimization_history(study),
             "intermediate_values.png": lambda: ovm.plot_intermediate_values(study)}
    if len(complete) >= 2 and len({k for t in complete for k in t.params}) >= 2:
        plots["param_importances.png"] = lambda: ovm.plot_param_importances(study)
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, make in plots.items():
            try:
                ax = make()
                fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
                fig.set_size_inches(8, 5)
                fig.tight_layout()
                fig.savefig(folder / name, dpi=90)
                out.append(folder / name)
            except Exception as e:  # a plot that cannot be drawn yet must not stop the sweep
                print(f"(plot {name} skipped: {type(e).__name__}: {e})", file=sys.stderr)
            finally:
                plt.close("all")
    if quality_vs_time(study, folder / "quality_vs_time.png"):
        out.append(folder / "quality_vs_time.png")
    return out


def _budget(spec: SweepSpec, t) -> tuple[float, str]:
    """The trial's budget: seconds when the clock bounds it, else steps."""
    cfg = spec.replay(t)
    if cfg.train.max_minutes > 0:
        return cfg.train.max_minutes * 60, "seconds"
    return float(cfg.train.max_steps), "steps"


def compute_saved(spec: SweepSpec, trials) -> dict:
    """What early stopping and pruning saved against running every finished trial to its budget."""
    used = budget = 0.0
    unit = "seconds"
    for t in trials:
        if t.state not in (TrialState.COMPLETE, TrialState.PRUNED) or "steps" not in t.user_attrs:
            continue
        b, unit = _budget(spec, t)
        budget += b
        used += t.user_attrs["train_seconds"] if unit == "seconds" else t.user_attrs["steps"]
    return {"used": used, "budget": budget, "unit": unit, "saved_share": 1 - used / budget if budget else 0.0}


def write_report(spec: SweepSpec, study: optuna.Study, out: Path | None = None, top: int = 10) -> Path:
    """``report.md`` and its plots under ``out`` (default ``mlruns/reports/<study>/``)."""
    out = Path(out or paths.REPORT_ROOT / spec.study.name)
    out.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    plots = study_plots(study, out)
    counts = {k.upper(): v for k, v in state_counts(trials).items() if v}
    finished = sorted((t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and _judged(t)),
                      key=lambda t: (t.state != TrialState.COMPLETE, _value(t)))
    skipped = [t for t in trials if "skipped" in t.user_attrs]
    saved = compute_saved(spec, trials)
    lines = [f"# Study `{spec.study.name}`", "",
             f"Sweep file `{spec.path}`: {spec.sampler.type} sampler, {spec.pruner.type} pruner, "
             f"target {spec.study.n_trials} trials. Losses are nats per character.", "",
             "## Trials by state", "", "| state | trials |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in counts.items()]
    if skipped:
        names = ", ".join(f"{t.number} ({t.params.get('model.kind', 'model')})" for t in skipped)
        lines += ["", f"Skipped untrained (PRUNED, no value): trial {names}, too slow on this machine for any rung "
                  "that fits the plan and the deadline."]
    lines += ["", f"## Top {min(top, len(finished))} trials", "",
              "| trial | state | val loss | stop | steps | train s | params |", "|---|---|---|---|---|---|---|"]
    for t in finished[:top]:
        params = ", ".join(f"{k.split('.')[-1]}={fmt(v)}" for k, v in t.params.items())
        lines.append(f"| {t.number} | {t.state.name} | {_value(t):.4f} | {t.user_attrs.get('stop_reason', '')} | "
                     f"{t.user_attrs.get('steps', '')} | {t.user_attrs.get('train_seconds', 0):.0f} | {params} |")
    lines += ["", "## Compute saved by early stopping and pruning", "",
              f"Finished trials used {saved['used']:,.0f} of the {saved['budget']:,.0f} {saved['unit']} their "
              f"budgets allowed: {saved['saved_share']:.0%} saved.", ""]
    best_file = paths.BEST_ROOT / spec.study.name / "metrics.json"
    lines += ["## Best model", ""]
    if best_file.is_file():
        m = json.loads(best_file.read_text())
        lines.append(f"`make best` retrained trial {m['trial']} over seeds {m['seeds']}: test loss "
                     f"**{m['test_loss_mean']:.4f} ± {m['test_loss_std']:.4f}** (val {m['val_loss_mean']:.4f}); "
                     f"saved seed {m['saved_seed']} to `{best_file.parent}/`.")
        if "network_test_loss_mean" in m:
            lines.append(f"The network alone scored {m['network_test_loss_mean']:.4f} ± "
                         f"{m['network_test_loss_std']:.4f}; the rest is the n-gram mixture.")
        lines += ["", "| seed | val | test | steps | stop |", "|---|---|---|---|---|"]
        lines += [f"| {r['seed']} | {r['val_loss']:.4f} | {r['test_loss']:.4f} | {r['steps']} | {r['stop']} |"
                  for r in m["runs"]]
    else:
        lines.append(f"Not retrained yet: run `make best SWEEP={spec.path}`.")
    lines += ["", "## Plots", ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out / "report.md"


def log_report(spec: SweepSpec, study: optuna.Study, parent_run_id: str) -> Path:
    """Write the report and log it with its plots to the study's parent MLflow run."""
    path = write_report(spec, study)
    client = tracking.client()
    for f in sorted(path.parent.iterdir()):
        if f.suffix in (".md", ".png"):
            client.log_artifact(parent_run_id, str(f), "report")
    return path


# ----------------------------------------------------------------------------- while the sweep runs


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
    client = tracking.client()
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
        self.shown, self.paused = self.start_done, 0

    def update(self) -> None:
        study = self.session.study
        trials = study.get_trials(deepcopy=False)
        done = counted(trials)
        paused = sum(1 for t in trials if is_paused(t))  # RUNNING to Optuna: without this, counted nowhere
        if (done, paused) == (self.shown, self.paused):
            return
        self.bar.advance(done - self.shown)
        self.shown, self.paused = done, paused
        n = state_counts(trials)
        best_trial = best_complete(study, trials)
        best = f"{best_trial.value:.4f}" if best_trial is not None else "-"
        rate = (time.time() - self.t0) / max(1, done - self.start_done)
        eta = rate * max(0, self.target - done)
        if self.deadline:
            eta = min(eta, max(0.0, self.deadline - time.time()))
        eta_text = f"{int(eta // 60)}m{int(eta % 60):02d}s"
        self.bar.event(f"{done}/{self.target} trials ({paused} paused at a rung, {n['pruned']} pruned, {n['fail']} failed), "
                       f"best val {best}, ETA {eta_text}", paused=paused, pruned=n["pruned"], failed=n["fail"],
                       best=best, eta=eta_text)

    def close(self) -> None:
        self.bar.close()
