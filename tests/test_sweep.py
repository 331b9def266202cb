"""Sweeps end to end: real Optuna journal storage, real worker processes, a real MLflow store."""

import json
import math
import subprocess
import time

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from charlm import config
from charlm.loop import EvalEvent, StopReason
from charlm.objective import Reporter, trial_state
from charlm.report import counted
from charlm.search import PatiencePruner, compute_step
from charlm.stopping import Patience
from charlm.storage import open_storage
from charlm.sweepfile import SweepError, load_sweep
from charlm.tracking import NullTracker
from charlm.trainer import train
from helpers import PYTHON, ROOT, SMOKE, cli, free_port, journal_study, mlflow_runs

# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("path", sorted((ROOT / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_every_sweep_file_loads_and_validates(path):
    spec = load_sweep(path)
    assert spec.study.name and spec.space
    spec.base_config()


def _sweep_err(tmp_path, doc: dict | str) -> str:
    f = tmp_path / "s.yaml"
    f.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    with pytest.raises(SweepError) as e:
        load_sweep(f)
    msg = str(e.value)
    assert "\n" not in msg and str(f) in msg
    return msg


def _doc(**changes):
    doc = {"study": {"name": "t", "n_trials": 2}, "base": "experiments/gpt.yaml",
           "space": {"model.kind": {"choice": ["gpt", "ff"]}, "train.lr": {"float": [1e-4, 1e-2], "log": True}}}
    for k, v in changes.items():
        doc[k] = v
    return doc


def test_a_huge_int_range_is_checked_without_listing_its_values(tmp_path, monkeypatch):
    """A range of 10^12 integers (a typo for 10) is checked at its ends and counted, never listed
    (that was a MemoryError with a traceback); a grid over it is refused in one line."""
    from charlm.space import space_size

    monkeypatch.chdir(ROOT)
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(_doc(space={"train.patience": {"int": [4, 10**12]}})))
    assert space_size(load_sweep(f)) == 10**12 - 3
    f.write_text(yaml.safe_dump(_doc(space={"data.context": {"choice": list(range(8, 78))}})))  # 70 choices
    assert space_size(load_sweep(f)) == 70  # checked at its first and last choice, not at 0 and 69
    msg = _sweep_err(tmp_path, _doc(space={"train.patience": {"int": [4, 10**12]}}, sampler={"type": "grid"}))
    assert "'space.train.patience'" in msg and "at most 100,000 values for grid search" in msg


def test_sweep_errors_name_file_key_and_expectation(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert "Unknown sweep key 'study.n_trails'" in _sweep_err(tmp_path, _doc(study={"name": "t", "n_trails": 3}))
    assert "did you mean 'study.n_trials'" in _sweep_err(tmp_path, _doc(study={"name": "t", "n_trails": 3}))
    assert "Unknown sweep key 'spaces'" in _sweep_err(tmp_path, {**_doc(), "spaces": {}})
    assert "'study.n_trials'" in _sweep_err(tmp_path, _doc(study={"name": "t", "n_trials": "many"}))
    assert "'study.heartbeat_timeout_s'" in _sweep_err(tmp_path, _doc(study={"name": "t", "heartbeat_timeout_s": 0}))
    msg = _sweep_err(tmp_path, _doc(space={"model.kind": {"choice": []}}))
    assert "'space.model.kind.choice'" in msg and "a non-empty list" in msg
    msg = _sweep_err(tmp_path, _doc(space={"train.lr": {"float": [1e-2, 1e-4]}}))
    assert "'space.train.lr.float'" in msg and "low <= high" in msg
    msg = _sweep_err(tmp_path, _doc(space={"model.n_layr": {"int": [1, 3]}}))
    assert "Unknown config key 'model.n_layr'" in msg and "model.n_layer" in msg
    msg = _sweep_err(tmp_path, _doc(space={"model.kind": {"choice": ["gpt"]},
                                           "when": {"model.knd == gpt": {"model.n_layer": {"int": [1, 2]}}}}))
    assert "Condition 'model.knd == gpt'" in msg and "not an unconditional parameter" in msg
    msg = _sweep_err(tmp_path, _doc(space={"model.n_embd": {"choice": [64, 96]}, "model.n_head": {"choice": [4, 5]}}))
    assert "'model.n_head'" in msg and "divisor of model.n_embd (64), got 5" in msg
    msg = _sweep_err(tmp_path, _doc(space={"data.context": {"int": [0, 64]}}))
    assert "'data.context'" in msg and ">= 1" in msg
    msg = _sweep_err(tmp_path, _doc(pruner={"type": "patient"}))
    assert "'pruner.type'" in msg and "patience | median" in msg
    asha = {"type": "asha", "min_seconds": 20, "reduction_factor": 3, "brackets": 4}  # rungs 20, 60, 180 s: 3
    msg = _sweep_err(tmp_path, _doc(pruner=asha, fixed={"train.max_minutes": 3}))
    assert "'pruner.brackets'" in msg and "from 1 to the number of rungs (3 here" in msg
    assert "Base experiment 'nope.yaml'" in _sweep_err(tmp_path, _doc(base="nope.yaml"))
    assert "YAML syntax error" in _sweep_err(tmp_path, "study: {name: t\nspace: [")


def test_a_width_written_as_a_string_is_checked_as_the_number_the_config_reads(tmp_path, monkeypatch):
    # the config reads '192' as 192, so the heads-divide-widths check must too (it raised TypeError)
    monkeypatch.chdir(ROOT)
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(_doc(space={"model.n_embd": {"choice": [128, "192"]}}, fixed={"model.n_head": 4})))
    assert load_sweep(f).space[0].choices == (128, "192")
    f.write_text(yaml.safe_dump(_doc(space={"model.n_embd": {"choice": [128, "190"]}}, fixed={"model.n_head": 4})))
    with pytest.raises(SweepError, match="divisor of model.n_embd"):
        load_sweep(f)


def test_sweep_cli_error_is_one_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(_doc(space={"train.lr": {"float": [1e-2, 1e-4]}})))
    r = cli("sweep", str(f), cwd=ROOT)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "low <= high" in r.stderr
    assert "Traceback" not in r.stderr


def test_dry_run_samples_without_training(tmp_path):
    r = cli("sweep", str(SMOKE), "--dry-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # the study's own first trials: the base experiment queued, then the sampler's draws
    assert "model.kind" in r.stdout and "trial 0 (base): model.kind=gpt" in r.stdout
    assert r.stdout.count("(drawn): ") == 2
    assert not (tmp_path / "mlruns").exists()


# ----------------------------------------------------------------------------- pruner


def _study_with_peers(curves, interval=10):
    study = optuna.create_study(pruner=PatiencePruner(reference="median", min_trials=2))
    dist = optuna.distributions.FloatDistribution(0, 1)
    for curve in curves:
        best, inter = float("inf"), {}
        for i, v in enumerate(curve, start=1):
            best = min(best, v)
            inter[i * interval] = best
        study.add_trial(optuna.create_trial(state=TrialState.COMPLETE, value=best, params={"x": 0.5},
                                            distributions={"x": dist}, intermediate_values=inter))
    return study


def _prune_step(study, curve, patience, mri=0.0, interval=10):
    trial = study.ask()
    trial.set_user_attr("patience", patience)
    trial.set_user_attr("min_relative_improvement", mri)
    best = float("inf")
    for i, v in enumerate(curve, start=1):
        best = min(best, v)
        trial.report(best, i * interval)
        if trial.should_prune():
            return i * interval
    return None


PEERS = [[3.0, 2.5, 2.2, 2.0, 1.9, 1.8], [3.1, 2.6, 2.3, 2.1, 2.0, 1.9]]


def test_trial_trailing_the_median_for_patience_evals_is_pruned():
    study = _study_with_peers(PEERS)
    assert _prune_step(study, [3.2, 2.9, 2.8, 2.7, 2.6, 2.5], patience=3) == 30


def test_trial_that_catches_up_in_time_is_not_pruned():
    study = _study_with_peers(PEERS)
    # behind at 10 and 20, level at 30 (resets the count), then ahead
    assert _prune_step(study, [3.2, 2.9, 2.2, 1.95, 1.85, 1.7], patience=3) is None


def test_min_relative_improvement_demands_a_margin_over_peers():
    study = _study_with_peers(PEERS)
    level = [3.05, 2.55, 2.25, 2.05, 1.95, 1.85]  # exactly the median of the two peers
    assert _prune_step(study, level, patience=2, mri=0.0) == 20  # not strictly better: misses
    study = _study_with_peers(PEERS)
    better = [v * 0.995 for v in level]
    assert _prune_step(study, better, patience=2, mri=0.0) is None
    study = _study_with_peers(PEERS)
    assert _prune_step(study, better, patience=2, mri=0.01) == 20  # 0.5% better is not 1% better


@pytest.mark.parametrize("patience,mri", [(1, 0.0), (2, 0.0), (3, 0.0), (2, 0.05), (3, 0.02)])
def test_pruner_with_self_reference_stops_where_the_trainer_does(patience, mri):
    curve = [3.0, 2.5, 2.4, 2.45, 2.41, 2.39, 2.5, 2.6, 2.7, 2.8, 2.9, 3.0]
    rule = Patience(patience, mri)
    trainer_stop = next((i * 10 for i, v in enumerate(curve, start=1) if rule.update(i * 10, v)), None)
    study = optuna.create_study(pruner=PatiencePruner(reference="self"))
    assert trainer_stop is not None
    assert _prune_step(study, curve, patience, mri) == trainer_stop


# Peers: fast models, one evaluation a second. The candidate is a slow model, one evaluation every
# 2 s: evaluation for evaluation (equal steps) it leads them, second for second it trails.
FAST_PEERS = [[3.0, 2.5, 2.2, 2.0, 1.9, 1.8], [3.1, 2.6, 2.3, 2.1, 2.0, 1.9]]
SLOW = [(10, 2.0, 2.9), (20, 4.0, 2.45), (30, 6.0, 2.15)]  # (step, training seconds, val loss)


def _judge_slow_model(axis: str):
    """Where the slow candidate is pruned (its step), with peers and reports on ``axis``."""
    study = optuna.create_study(pruner=PatiencePruner(reference="median", min_trials=2))
    dist = optuna.distributions.FloatDistribution(0, 1)
    for curve in FAST_PEERS:
        at = {(compute_step(i) if axis == "seconds" else i * 10): v for i, v in enumerate(curve, start=1)}
        study.add_trial(optuna.create_trial(state=TrialState.COMPLETE, value=min(curve), params={"x": 0.5},
                                            distributions={"x": dist}, intermediate_values=at))
    trial = study.ask()
    trial.set_user_attr("patience", 2)
    trial.set_user_attr("min_relative_improvement", 0.0)
    on_eval = Reporter(trial)
    for step, seconds, loss in SLOW:
        ev = EvalEvent(step=step, val_loss=loss, train_loss=loss, best_val_loss=loss, lr=1e-3,
                       tokens_per_sec=1.0, elapsed=seconds if axis == "seconds" else step / 1000)
        if on_eval(ev) is StopReason.PRUNED:
            return step
    return None


def test_the_pruner_compares_a_trial_with_its_peers_at_equal_training_seconds():
    assert _judge_slow_model("steps") is None  # at equal steps it leads: never pruned
    # at equal seconds it trails the peers' median at 2 s (2.9 vs 2.55) and 4 s (2.45 vs 2.05):
    # two misses, pruned at its second evaluation
    assert _judge_slow_model("seconds") == 20


def test_a_trial_out_of_its_own_patience_completes_even_when_the_pruner_fires_too(tiny_cfg):
    # min_relative_improvement 0.9: no evaluation after the first improves, so with patience 1 the
    # trainer stops at the second evaluation; a `reference: self` pruner fires at that same one
    cfg = config.override(tiny_cfg, {"train.patience": 1, "train.min_relative_improvement": 0.9}, where="test")
    mirror = Patience(1, 0.9)
    pruned_at = []

    def pruner_fires(ev):
        if mirror.update(ev.step, ev.val_loss):
            pruned_at.append(ev.step)
            return StopReason.PRUNED
        return None

    result = train(cfg, NullTracker(), pruner_fires, progress=False)
    assert pruned_at == [20] and result.early_stop_step == 20
    assert result.stop_reason is StopReason.EARLY_STOP and trial_state(result) is TrialState.COMPLETE


def test_a_pruned_trial_stops_at_once_without_full_passes(tiny_cfg):
    tracker = NullTracker()
    result = train(tiny_cfg, tracker, lambda ev: StopReason.PRUNED if ev.step == 20 else None, progress=False)
    assert result.stop_reason is StopReason.PRUNED and trial_state(result) is TrialState.PRUNED
    assert math.isnan(result.best_val_loss) and math.isnan(result.test_loss) and result.final_eval_seconds == 0
    assert result.slice_val_loss == min(h["val_loss"] for h in result.history)  # the value it is ranked by
    assert "test_loss" not in tracker.metrics and "sample.txt" not in tracker.artifacts
    assert {s for s, _ in tracker.metrics["train_seconds"]} == {10, 20}  # the compute axis beside each step


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def smoke_sweep(tmp_path_factory):
    """`python -m charlm sweep sweeps/smoke.yaml --workers 2` in a fresh folder, as a user would."""
    cwd = tmp_path_factory.mktemp("sweep")
    r = cli("sweep", str(SMOKE), "--workers", "2", cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    return cwd, r


def test_two_workers_optuna_and_mlflow_agree(smoke_sweep):
    cwd, r = smoke_sweep
    spec = load_sweep(SMOKE)
    study = journal_study(cwd, "smoke")
    trials = study.get_trials()
    assert len(trials) == spec.study.n_trials and counted(study.get_trials()) == spec.study.n_trials
    assert sorted(t.number for t in trials) == list(range(spec.study.n_trials))
    states = [t.state for t in trials]
    assert TrialState.PRUNED in states and TrialState.COMPLETE in states
    client, runs = mlflow_runs(cwd, "smoke")
    parents = [x for x in runs if x.data.tags.get("charlm.role") == "study"]
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert study.user_attrs["mlflow_parent_run_id"] == parents[0].info.run_id
    assert len(children) == len(trials)  # no duplicate or orphan runs
    by_id = {x.info.run_id: x for x in children}
    for t in trials:
        run = by_id[t.user_attrs["mlflow_run_id"]]
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.tags["optuna.trial_number"] == str(t.number)
        assert run.data.tags["optuna.state"] == t.state.name
        assert run.info.status == ("FAILED" if t.state == TrialState.FAIL else "FINISHED")
        cfg = spec.replay(t)  # the trial's config: its kind keeps its own keys only
        for key in t.params:
            assert run.data.params[key] == str(config.flatten(cfg)[key])
        # one protocol ranks them all: the best intermediate evaluation on the val slice
        assert t.value == min(t.intermediate_values.values()) == pytest.approx(run.data.metrics["slice_val_loss"])
        if t.state == TrialState.PRUNED:
            assert run.data.tags["stop_reason"] == "pruned"
            assert int(run.data.tags["prune_step"]) == t.user_attrs["steps"]
            assert "test_loss" not in run.data.metrics  # stopped at once: no full passes
        else:
            assert run.data.metrics["best_val_loss"] == pytest.approx(t.user_attrs["full_val_loss"])
    # the n-gram floor is logged once, beside the trials, in the same experiment
    baselines = [x for x in runs if x.data.tags.get("charlm.role") == "baseline"]
    assert len(baselines) == 1 and baselines[0].data.params["model.kind"] == "ngram"
    assert baselines[0].data.tags["stop_reason"] == "fitted" and "test_loss" in baselines[0].data.metrics
    assert study.user_attrs["mlflow_baseline_run_id"] == baselines[0].info.run_id
    # the parent run carries the study summary
    parent = parents[0]
    assert parent.data.metrics["n_complete"] == sum(s == TrialState.COMPLETE for s in states)
    assert parent.data.metrics["best_value"] == pytest.approx(study.best_value)
    assert json.loads(parent.data.tags["best_params"]) == study.best_params
    files = {a.path for a in client.list_artifacts(parent.info.run_id, "study")}
    assert {"study/optimization_history.png", "study/trials.csv", "study/best_params.json"} <= files


def test_resume_counts_the_total_across_calls(smoke_sweep):
    cwd, _ = smoke_sweep
    n = load_sweep(SMOKE).study.n_trials
    r = cli("sweep", str(SMOKE), cwd=cwd)  # already at its total: runs nothing
    assert r.returncode == 0, r.stderr
    assert len(journal_study(cwd, "smoke").trials) == n
    r = cli("sweep", str(SMOKE), "--n-trials", str(n + 1), cwd=cwd)
    assert r.returncode == 0, r.stderr
    study = journal_study(cwd, "smoke")
    assert len(study.trials) == n + 1
    _, runs = mlflow_runs(cwd, "smoke")
    assert sum(1 for x in runs if x.data.tags.get("charlm.role") == "study") == 1  # parent reused
    assert sum(1 for x in runs if x.data.tags.get("charlm.role") == "baseline") == 1  # not re-run


def test_parent_run_holds_the_study_plots_and_report_and_each_trial_its_curve(smoke_sweep):
    cwd, r = smoke_sweep
    client, runs = mlflow_runs(cwd, "smoke")
    parent = next(x for x in runs if x.data.tags.get("charlm.role") == "study")
    logged = {f.path for d in ("study", "report") for f in client.list_artifacts(parent.info.run_id, d)}
    for plot in ("optimization_history", "intermediate_values", "param_importances", "quality_vs_time"):
        assert f"study/{plot}.png" in logged and f"report/{plot}.png" in logged
    assert "report/report.md" in logged
    report = (cwd / "mlruns" / "reports" / "smoke" / "report.md").read_text()
    study = journal_study(cwd, "smoke")
    assert "| PRUNED |" in report and f"| {study.best_trial.number} | COMPLETE | {study.best_value:.4f} |" in report
    assert "saved." in report and "![quality_vs_time](quality_vs_time.png)" in report
    for run in (x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id):
        assert "loss_curve.png" in {f.path for f in client.list_artifacts(run.info.run_id)}
    # the report command rebuilds it, with no traceback for a study that does not exist
    r = cli("report", str(SMOKE), cwd=cwd)
    assert r.returncode == 0 and "report.md" in r.stdout
    r = cli("report", str(SMOKE), cwd=cwd / "mlruns")
    assert r.returncode == 2 and r.stderr.startswith("error: No study 'smoke'")


def test_runs_carry_lineage_and_the_dashboard_shows_curve_and_mlflow_link(smoke_sweep):
    from optuna.artifacts import get_all_artifact_meta
    from optuna_dashboard import get_note

    cwd, r = smoke_sweep
    skipped = [line for line in r.stderr.splitlines() if "dashboard artifact/note skipped" in line]
    assert not skipped, skipped
    client, runs = mlflow_runs(cwd, "smoke")
    exp = client.get_experiment_by_name("smoke")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning" in r.stdout
    parent = next(x for x in runs if x.data.tags.get("charlm.role") == "study")
    assert "smoke.yaml" in {f.path for f in client.list_artifacts(parent.info.run_id)}
    baseline = next(x for x in runs if x.data.tags.get("charlm.role") == "baseline")
    assert "Baseline of Optuna study 'smoke'" in baseline.data.tags["mlflow.note.content"]
    study = journal_study(cwd, "smoke")
    store = cwd / "mlruns" / "optuna-artifacts" / "smoke"
    by_id = {x.info.run_id: x for x in runs}
    for t in study.trials:
        run = by_id[t.user_attrs["mlflow_run_id"]]
        assert run.data.tags["mlflow.note.content"].startswith(f"Trial {t.number} of Optuna study 'smoke'")
        assert run.data.metrics["trial_number"] == t.number and run.data.metrics["n_params"] > 0
        metas = get_all_artifact_meta(t, storage=study._storage)
        assert len(metas) == 1, (t.number, t.state, metas)
        meta = metas[0]
        assert meta.filename == "loss_curve.png" and (store / meta.artifact_id).stat().st_size > 1000
        note = get_note(optuna.Trial(study, t._trial_id))
        assert run.info.run_id in note, (t.number, note)
        assert f"/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}?workflowType=machine_learning)" in note


def test_hyperband_sizes_its_rungs_by_the_compute_trials_really_reach():
    from dataclasses import replace

    from charlm.search import make_pruner

    spec = load_sweep(SMOKE)
    spec = replace(spec, pruner=replace(spec.pruner, type="hyperband"))
    clocked = make_pruner(spec, max_minutes=5.0)  # a clock: every full trial reaches 300 s
    assert (clocked._min_resource, clocked._max_resource) == (300_000 // 27, 300_000)
    pruner = make_pruner(spec)  # no clock: the top is what the first completed trials reached
    study = optuna.create_study(pruner=pruner)
    for _ in range(2):  # each trial stopped after 7 s of training
        trial = study.ask()
        for ms in range(1000, 8000, 1000):
            trial.report(1.0, ms)
            trial.should_prune()
        study.tell(trial, 1.0)
    trial = study.ask()
    trial.report(1.0, 1000)
    trial.should_prune()
    assert pruner._max_resource == 7001  # Optuna's "auto": the last step completed trials reached, plus one


def test_dashboard_serves_the_study_on_loopback(smoke_sweep):
    import urllib.request

    cwd, _ = smoke_sweep
    port = free_port()
    proc = subprocess.Popen([PYTHON, "-m", "charlm", "dashboard", str(SMOKE), "--port", str(port)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, body = time.time() + 60, None
        while time.time() < deadline and body is None and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as resp:
                    body = json.loads(resp.read())
            except OSError:
                time.sleep(0.5)
        assert body is not None, "optuna-dashboard did not answer"
        assert [x["study_name"] for x in body["study_summaries"]] == ["smoke"]
        # each trial's loss curve, served from the sweep's Optuna artifact store, and its note
        study_id = body["study_summaries"][0]["study_id"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{study_id}", timeout=10) as resp:
            trial = json.loads(resp.read())["trials"][0]
        (art,) = trial["artifacts"]
        assert "MLflow run" in trial["note"]["body"]
        url = f"http://127.0.0.1:{port}/artifacts/{study_id}/{trial['trial_id']}/{art['artifact_id']}"
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.headers["Content-Type"] == "image/png" and len(resp.read()) > 1000
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_best_retrains_saves_and_evaluates(smoke_sweep):
    cwd, _ = smoke_sweep
    r = cli("best", str(SMOKE), cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    out = cwd / "mlruns" / "best" / "smoke"
    assert {"model.pt", "config.yaml", "metrics.json", "vocab.json"} <= {p.name for p in out.iterdir()}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["seeds"] == [0, 1] and len(metrics["runs"]) == 2
    study = journal_study(cwd, "smoke")
    assert metrics["trial"] == study.best_trial.number
    saved = config.load(out / "config.yaml").train
    assert saved.max_steps == round(60 * 1.5) and saved.validation_interval == round(10 * 1.5)
    assert saved.patience == study.best_trial.params["train.patience"]  # the trial's stopping rule kept
    # best.set: the retrain trains on 89% and mixes with a 6-gram; both figures are reported
    assert config.load(out / "config.yaml").data.val_fraction == 0.01 and config.load(out / "config.yaml").model.mix_order == 6
    assert all(0 < r["mix_weight"] < 1 and r["test_loss"] < r["network_test_loss"] for r in metrics["runs"])
    assert metrics["network_test_loss_mean"] > metrics["test_loss_mean"]
    text = cwd / "t.txt"
    text.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n")
    r = cli("eval", "--model", str(out), "--text", str(text), "--json", cwd=cwd)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["chars"] == len(text.read_text()) - 1
    client, runs = mlflow_runs(cwd, "smoke")
    best_runs = [x for x in runs if x.data.tags.get("best") == "true" and not x.data.tags.get("mlflow.parentRunId")]
    assert len(best_runs) == 1 and "test_loss_mean" in best_runs[0].data.metrics
    r = cli("sample", "--chars", "20", cwd=cwd)  # default model: the newest mlruns/best/<study>, named
    assert r.returncode == 0 and len(r.stdout) > 20
    assert "model: mlruns/best/smoke/model.pt (the newest under mlruns/best" in r.stderr, r.stderr
    # run again (as after an interruption): finished seeds are picked up, not retrained
    r = cli("best", str(SMOKE), cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("kept from an earlier run") == 2
    assert json.loads((out / "metrics.json").read_text())["test_loss_mean"] == metrics["test_loss_mean"]


def test_best_without_a_completed_trial_is_a_clear_error(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(_doc(study={"name": "empty", "n_trials": 1}, base=str(ROOT / "experiments/gpt.yaml"))))
    (tmp_path / "mlruns" / "optuna").mkdir(parents=True)
    optuna.create_study(study_name="empty", storage=open_storage(f"journal:{tmp_path}/mlruns/optuna/empty.journal"))
    r = cli("best", str(f), cwd=tmp_path)
    assert r.returncode == 2 and "No completed trial in study 'empty'" in r.stderr


def test_values_fixed_under_a_condition_apply_to_trials_and_to_best():
    from charlm.retrain import best_config, chosen
    from charlm.space import suggest

    spec = load_sweep(SMOKE)
    study = optuna.create_study()
    for kind, value in (("ff", 3.0), ("gpt", 3.5)):
        study.enqueue_trial({"model.kind": kind})
        trial = study.ask()
        values = suggest(trial, spec)
        study.tell(trial, value)
        assert values["model.kind"] == kind
        assert values.get("model.n_embd") == (16 if kind == "ff" else None)
        assert "model.n_embd" not in study.trials[-1].params  # not an Optuna parameter
        assert spec.trial_config(values, trial.number).model.n_embd == (16 if kind == "ff" else 32)
    best = chosen(spec, study)
    cfg = best_config(spec, best)
    assert best.params["model.kind"] == "ff" and cfg.model.n_embd == 16
    assert cfg.train.max_steps == round(spec.base_config().train.max_steps * spec.best.budget_multiplier)


def test_storage_urls_never_show_passwords():
    from charlm.errors import CharlmError
    from charlm.paths import redact

    assert redact("postgresql://alice:s3cret@db.example:5432/optuna") == "postgresql://alice:***@db.example:5432/optuna"
    with pytest.raises(CharlmError) as e:
        open_storage("postgresql://alice:s3cret@127.0.0.1:9/optuna")  # nothing listens on port 9
    assert "s3cret" not in str(e.value) and "alice:***@127.0.0.1:9" in str(e.value)


def test_the_report_ranks_what_trained_and_names_a_trial_skipped_untrained(tmp_path, monkeypatch):
    """On an AVX2 machine (45m, seed 2, cfc7a95) a GPT too slow for any rung was skipped untrained,
    and the whole study report was lost to ``min()`` of its empty reports."""
    monkeypatch.chdir(tmp_path)
    from charlm.report import write_report
    from charlm.space import suggest

    spec = load_sweep(SMOKE)
    study = optuna.create_study()
    for value in (1.9, None):
        trial = study.ask()
        suggest(trial, spec)
        if value is None:  # as charlm/objective.py skip() leaves it
            trial.set_user_attr("skipped", "skipped untrained: a gpt this slow gets too few steps")
            study.tell(trial, state=TrialState.PRUNED)
        else:
            for k, v in {"steps": 60, "train_seconds": 3.0, "stop_reason": "max_steps"}.items():
                trial.set_user_attr(k, v)
            trial.report(value, 60)
            study.tell(trial, value)
    report = write_report(spec, study, out=tmp_path / "report").read_text()
    assert "| 0 | COMPLETE | 1.9000 | max_steps | 60 |" in report and "| 1 | PRUNED |" not in report
    kind = study.trials[1].params["model.kind"]
    assert f"Skipped untrained (PRUNED, no value): trial 1 ({kind})" in report
    assert "![quality_vs_time](quality_vs_time.png)" in report
