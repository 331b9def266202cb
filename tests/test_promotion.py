"""Promotion with continued training (ASHA, charlm/promotion.py): real sweeps on a journal storage,
real worker processes, a real MLflow store. Rungs here are 2/3 s, 2 s and the 6 s clock."""

import os
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from charlm import promotion
from charlm.promotion import bracket_of, bracket_shares, promotable, rung_budgets
from helpers import PYTHON, ROOT, cli, journal_study, mlflow_client

FIXED = {"model.n_layer": 1, "model.n_head": 2, "model.n_embd": 32, "model.hidden": 64, "data.context": 32,
         "train.batch_size": 16, "train.max_steps": 100000, "train.max_minutes": 0.1, "train.schedule": "wsd",
         "train.validation_interval": 20, "train.warmup_steps": 10, "train.eval_chars": 2000,
         "train.sample_chars": 0, "train.precision": "fp32", "train.patience": 0, "train.system_metrics": False,
         "train.device": "cpu"}  # as sweeps/smoke.yaml: rungs of seconds judge steps, and tiny steps are the CPU's


def asha_sweep(folder: Path, name: str, n_trials: int, min_seconds: float = 0.6, brackets: int = 1, **fixed) -> Path:
    doc = {"study": {"name": name, "n_trials": n_trials}, "sampler": {"type": "random", "seed": 0},
           "pruner": {"type": "asha", "min_seconds": min_seconds, "reduction_factor": 3, "brackets": brackets},
           "base": str(ROOT / "experiments" / "gpt.yaml"), "fixed": {**FIXED, **fixed},
           "space": {"model.kind": {"choice": ["gpt", "ff"]}, "train.lr": {"float": [1e-4, 1e-2], "log": True},
                     "when": {"model.kind == ff": {"model.layers": {"int": [1, 2]}, "model.n_embd": 16}}}}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def history(cwd: Path, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in mlflow_client(cwd).get_metric_history(run_id, key)]


def test_rungs_grow_by_the_factor_up_to_the_clock_and_the_best_fraction_goes_on():
    assert rung_budgets(20, 3, 540) == [20, 60, 180, 540]
    assert rung_budgets(20, 3, 100) == [pytest.approx(100 / 3), 100]
    trials = [optuna.trial.create_trial(state=TrialState.COMPLETE, value=v, system_attrs={promotion.rung_key(0): v})
              for v in (2.0, 1.0, 3.0, 1.5, 2.5)]
    for n, t in enumerate(trials):
        t.number = n
    # 5 at the rung: the best 5 // 3 = 1 goes on; once the rung is final it rounds up to 2
    assert [promotable(trials, 0, n, 3) for n in range(5)] == [False, True, False, False, False]
    assert [promotable(trials, 0, n, 3, closing=True) for n in range(5)] == [False, True, False, True, False]


def at_rungs(bracket: int, values: dict[int, float]) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(state=TrialState.RUNNING, system_attrs={
        promotion.BRACKET: bracket, **{promotion.rung_key(k): v for k, v in values.items()}})


def test_brackets_spend_equal_compute_and_the_first_trial_runs_to_the_clock_unjudged():
    budgets = rung_budgets(240 / 9, 3, 240)  # the bench's rungs: 27 s, 80 s, 4 min
    cost = [240 / 9 + (80 - 240 / 9) / 3 + 160 / 9, 80 + 160 / 3, 240]  # a trial's expected seconds per bracket
    shares = bracket_shares(budgets, 3, 3)
    assert [s * c for s, c in zip(shares, cost)] == pytest.approx([shares[2] * 240] * 3)
    assert sum(shares) == pytest.approx(1.0) and shares == pytest.approx([0.579, 0.270, 0.150], abs=1e-3)
    drawn = [bracket_of(n, shares) for n in range(300)]
    assert drawn[0] == 2  # trial 0: the clock, unjudged
    for run in (drawn[:30], drawn[100:130], drawn):  # any stretch of trials meets each bracket about its share
        assert [run.count(b) / len(run) for b in range(3)] == pytest.approx(shares, abs=0.04)
    assert {bracket_of(n, bracket_shares(budgets, 3, 1)) for n in range(50)} == {0}  # one bracket: plain ASHA


def test_a_trial_is_promoted_against_its_own_bracket_only():
    # bracket 0's three best came up from 27 s and lead rung 1; bracket 1's started there and trail
    trials = [at_rungs(0, {0: 1.9, 1: 1.0}), at_rungs(0, {0: 1.9, 1: 1.1}), at_rungs(0, {0: 1.9, 1: 1.2}),
              at_rungs(1, {1: 2.0}), at_rungs(1, {1: 2.1}), at_rungs(1, {1: 2.2})]
    for n, t in enumerate(trials):
        t.number = n
    # pooled, rung 1's best two would be bracket 0's 1.0 and 1.1; each bracket sends its own best third
    assert [promotable(trials, 1, n, 3) for n in range(6)] == [True, False, False, True, False, False]


@pytest.fixture(scope="module")
def asha_study(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("asha")
    r = cli("sweep", str(asha_sweep(cwd, "asha", 6)), cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    return cwd, journal_study(cwd, "asha")


def test_a_promoted_trial_continues_its_curve_and_its_optuna_trial(asha_study):
    cwd, study = asha_study
    trials = study.trials
    assert len(trials) == 6 and {t.state for t in trials} == {TrialState.COMPLETE, TrialState.PRUNED}
    # carried to the 6 s clock: usually one; on a loaded machine the rungs' order can carry two
    tops = [t for t in trials if t.state == TrialState.COMPLETE]
    assert tops
    for top in tops:
        assert top.system_attrs[promotion.RUNG] == 1 and top.user_attrs["stop_reason"] == "max_minutes"
        assert top.value == min(top.intermediate_values.values())  # one protocol: its best report
        val = history(cwd, top.user_attrs["mlflow_run_id"], "val_loss")
        steps = [s for s, _ in val]
        assert steps == sorted(set(steps)) and steps[0] == 20  # one curve: never restarted at step 0
        assert steps[-1] == top.user_attrs["steps"]
        rungs = [step for step, _ in history(cwd, top.user_attrs["mlflow_run_id"], "rung")]
        assert len(rungs) == 2  # judged at both rungs below the clock
        for rung_step in rungs:  # it went on from where it was: the next evaluation is no worse than the rung's
            before = dict(val)[rung_step]  # (it may be much better: on a loaded machine a rung ends early in the curve)
            after = next(v for s, v in val if s > rung_step)
            assert after < before + 0.1, (rung_step, before, after)
        assert val[0][1] > dict(val)[rungs[-1]] + 0.2  # a restart would be back near the first evaluation
    assert study.user_attrs["rung_seconds"] == pytest.approx([2 / 3, 2, 6])  # the plot's rung lines
    # the rung-end previews run off the clock; their seconds are kept for honest compute totals
    assert all(t.user_attrs["preview_seconds"] > 0 for t in trials if promotion.RUNG in t.system_attrs)
    assert (cwd / "mlruns" / "reports" / "asha" / "quality_vs_time.png").stat().st_size > 1000
    for t in trials:
        if t.state == TrialState.PRUNED:  # paused at a rung, then closed with its best value
            assert t.value == min(t.intermediate_values.values()) and t.system_attrs[promotion.PAUSED] is not False


def test_a_trial_out_of_patience_before_its_rung_ends_is_complete(tmp_path):
    # rungs of 6 and 18 s: two evaluations (40 steps, about 1 s) end well inside the first, even on a
    # machine that lends the sweep one core of two (2 s rungs were passed there: a PRUNED flake)
    sweep = asha_sweep(tmp_path, "patient", 2, min_seconds=6, **{"train.patience": 1, "train.min_relative_improvement": 0.9,
                                                                  "train.max_minutes": 0.3})
    r = cli("sweep", str(sweep), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    trials = journal_study(tmp_path, "patient").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert all(t.user_attrs["stop_reason"] == "early_stop" and promotion.RUNG not in t.system_attrs for t in trials)


@pytest.mark.slow
def test_a_worker_killed_during_a_promotion_loses_nothing(tmp_path):
    # rungs of 2, 6 and 18 s: a trial training the top rung has finished rung 1, and only the best
    # of rung 1 gets there (rung 1 holds at most 2 of the 6 trials: its best goes on once the rung
    # is final), so after its worker dies it is promoted again and must go on from its state
    sweep = asha_sweep(tmp_path, "killed", 6, min_seconds=1.5, **{"train.max_minutes": 0.3})
    env = {**os.environ, "CI": "true"}
    first = subprocess.Popen([PYTHON, "-m", "charlm", "sweep", str(sweep)], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline, victim = time.time() + 240, None
        while victim is None and time.time() < deadline and first.poll() is None:
            time.sleep(0.1)
            if not (tmp_path / "mlruns" / "optuna" / "killed.journal").exists():
                continue
            victim = next((t for t in journal_study(tmp_path, "killed").get_trials(states=(TrialState.RUNNING,))
                           if t.system_attrs.get(promotion.RUNG) == 1 and not t.system_attrs.get(promotion.PAUSED)),
                          None)
        assert victim is not None, "no trial was caught training past a rung"
        time.sleep(1.0)  # well into the next rung
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    r = cli("sweep", str(sweep), cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    trials = journal_study(tmp_path, "killed").trials
    assert len(trials) == 6 and TrialState.FAIL not in {t.state for t in trials}  # nothing failed or re-queued
    t, k = trials[victim.number], 1  # the last rung it had finished
    assert t.state == TrialState.COMPLETE and t.user_attrs["stop_reason"] == "max_minutes"  # it went on to the top
    assert t.system_attrs[promotion.rung_key(k)] == victim.system_attrs[promotion.rung_key(k)]  # its rungs stand
    val = history(tmp_path, t.user_attrs["mlflow_run_id"], "val_loss")
    rung_step = next(s for s, v in history(tmp_path, t.user_attrs["mlflow_run_id"], "rung") if v == k)
    before = [s for s, _ in val if s <= rung_step]
    assert before == sorted(set(before)) and before[0] == 20  # the rungs it had finished were kept, not redone
    assert t.user_attrs["steps"] > rung_step


@pytest.mark.slow
def test_a_bracket_starts_judging_at_its_own_rung_and_the_last_runs_unjudged(tmp_path):
    # rungs 2/3 s, 2 s, 6 s in three brackets: trial 0 goes to the last (the clock), trial 2 to the
    # middle one (first judged at 2 s), trials 1 and 3 to the first (see the shares above)
    r = cli("sweep", str(asha_sweep(tmp_path, "brackets", 4, brackets=3)), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    trials = journal_study(tmp_path, "brackets").trials
    assert [t.system_attrs[promotion.BRACKET] for t in trials] == [2, 0, 1, 0]
    unjudged, middle = trials[0], trials[2]
    assert unjudged.state == TrialState.COMPLETE and unjudged.user_attrs["stop_reason"] == "max_minutes"
    assert not [k for k in unjudged.system_attrs if k.startswith("charlm.rung")]
    assert history(tmp_path, unjudged.user_attrs["mlflow_run_id"], "rung") == []
    assert promotion.rung_key(0) not in middle.system_attrs and promotion.rung_key(1) in middle.system_attrs
    val = history(tmp_path, middle.user_attrs["mlflow_run_id"], "val_loss")
    assert val[0][0] == 20 and len(val) > 1  # one curve from its first evaluation: trained straight to 2 s
    assert mlflow_client(tmp_path).get_run(middle.user_attrs["mlflow_run_id"]).data.tags["bracket"] == "1"



@pytest.mark.slow
def test_a_queued_trial_runs_to_the_clock_unjudged_whatever_its_number(tmp_path):
    # trial 1 would be drawn into the first bracket; queued by the sweep file, it goes to the last,
    # where the base experiment's trial 0 goes: known to be good at the clock, judged there
    path = asha_sweep(tmp_path, "queued", 3, brackets=3)
    doc = yaml.safe_load(path.read_text())
    doc["enqueue"] = [{"model.kind": "ff", "train.lr": 0.004, "model.layers": 2}]
    path.write_text(yaml.safe_dump(doc))
    r = cli("sweep", str(path), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    trials = journal_study(tmp_path, "queued").trials
    assert [t.user_attrs.get("charlm.enqueued") for t in trials] == ["base", "sweep file #0", None]
    assert [t.system_attrs[promotion.BRACKET] for t in trials] == [2, 2, 1]
    assert trials[1].state == TrialState.COMPLETE and not [k for k in trials[1].system_attrs if k.startswith("charlm.rung")]

def test_wsd_holds_the_peak_whatever_the_length_then_decays_over_its_last_fraction():
    from charlm import config
    from charlm.optim import lr_at

    def schedule(max_steps):
        cfg = config.load(None, ["train.schedule=wsd", "train.lr=0.01", "train.min_lr_ratio=0.1",
                                 "train.warmup_steps=10", "train.decay_fraction=0.2", f"train.max_steps={max_steps}"])
        return [lr_at(s, cfg) for s in range(max_steps)]

    short, long = schedule(110), schedule(1010)
    assert short[9] == long[9] == 0.01 and short[:88] == long[:88]  # before its decay a short run is a long one's prefix
    assert long[800] == 0.01 and long[-1] == pytest.approx(0.001, rel=0.05)  # decays over the last 200 steps
    assert long[910] == pytest.approx(0.01 - 0.009 * 0.5, rel=0.01)


def test_the_sweep_progress_line_counts_the_trials_paused_at_a_rung(capsys, monkeypatch):
    # a paused trial is RUNNING to Optuna: the line named it nowhere until the study's end
    from types import SimpleNamespace

    from charlm.report import SweepProgress
    from charlm.sweepfile import load_sweep

    monkeypatch.setenv("CI", "true")  # plain lines, as in a log
    study = optuna.create_study()
    shown = SweepProgress(SimpleNamespace(spec=load_sweep(ROOT / "sweeps" / "smoke.yaml"), study=study), None)
    study.tell(study.ask(), 1.5)
    paused = study.ask()
    study._storage.set_trial_system_attr(paused._trial_id, promotion.PAUSED, True)
    shown.update()
    assert "2/8 trials (1 paused at a rung, 0 pruned, 0 failed), best val 1.5000" in capsys.readouterr().err
    study._storage.set_trial_system_attr(paused._trial_id, promotion.PAUSED, False)  # promoted: a change to show
    shown.update()
    assert "(0 paused at a rung" in capsys.readouterr().err
