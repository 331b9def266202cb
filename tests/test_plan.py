"""The budget plan (charlm/plan.py): what it fits, what it leaves to the sweep file, and the
deadline it keeps (a trial in flight stops at its next evaluation with its value kept). Also the
study's first trials: the base experiment and the sweep file's list, queued and tagged."""

import math
import time
from pathlib import Path

import optuna
import pytest
import yaml

from charlm import plan
from charlm.errors import CharlmError
from charlm.promotion import rung_budgets
from charlm.sweepfile import load_sweep
from helpers import ROOT, SMOKE, cli, journal_study, mlflow_runs

DEFAULT = ROOT / "sweeps" / "default.yaml"


def speed(slowdown: float) -> plan.Speed:
    """This project's 2-core reference machine as the probe measured it (sweeps/default.yaml at
    e432314's successor), or a machine ``slowdown`` times slower in every step and pass."""
    probes = (plan.Probe("gpt", 84.2e9, 0.246), plan.Probe("gpt", 271.6e9, 0.852), plan.Probe("gpt", 2.67e9, 0.014),
              plan.Probe("ff", 312.6e9, 0.470), plan.Probe("ff", 1.71e9, 0.006))
    return plan.Speed(tuple(plan.Probe(p.kind, p.flops_per_step, p.step_seconds * slowdown) for p in probes),
                      eval_chars_per_s=36_000 / slowdown, ngram_chars_per_s=400_000 / slowdown,
                      train_chars=892_315, retrain_chars=992_700, test_chars=111_540, val_chars=111_539,
                      vocab_size=65, measured_s=9.0 * slowdown)


def spent(p: plan.Plan) -> float:
    """Every second the plan lays out, from start to the registry: it must end inside the budget."""
    per_seed = p.reserve["per retrain seed"]
    return p.study_s + len(p.seeds) * (p.retrain_s + per_seed) + p.reserve["close"] + plan.START_S / 2


@pytest.mark.parametrize("budget", ["12m", "45m", "3h"])
@pytest.mark.parametrize("slowdown", [1.0, 5.0])
def test_plan_fits_the_budget_and_every_rung_fits_its_clock(budget, slowdown):
    spec = load_sweep(DEFAULT, budget=budget)
    b = plan.parse_duration(budget)
    p = plan.make_plan(spec, b, speed(slowdown), started_at=0.0)
    assert not p.warnings and not p.hand
    assert spent(p) <= b and p.study_s - p.reserve["before_study"] > p.top_s  # room for more than one trial
    # the rungs end at the clock, each reduction_factor times the one before, the first long enough
    # for the base experiment's useful steps on this machine (or the clock alone)
    assert p.rungs[-1] == pytest.approx(p.top_s) and list(p.rungs) == pytest.approx(
        rung_budgets(p.rungs[0] * 0.999, 3, p.top_s))
    base = spec.base_config()
    step = speed(slowdown).step_seconds("gpt", plan.flops_per_step(base, 65))
    assert len(p.rungs) == 1 or p.rungs[0] / step >= p.useful_steps
    assert p.brackets == len(p.rungs) and p.retrain_s == p.top_s
    assert p.seeds == ((0, 1) if b >= 30 * 60 else (0,))
    applied = plan.apply(spec, p)
    assert applied.base_config().train.max_minutes * 60 == pytest.approx(p.top_s)
    assert rung_budgets(applied.pruner.min_seconds, 3, p.top_s) == pytest.approx(list(p.rungs))


def test_a_longer_budget_buys_a_longer_clock_and_a_slower_machine_fewer_rungs():
    spec = load_sweep(DEFAULT)
    plans = [plan.make_plan(spec, plan.parse_duration(b), speed(1.0)) for b in ("12m", "45m", "90m", "3h")]
    clocks = [p.top_s for p in plans]
    assert clocks == sorted(clocks) and len(set(clocks)) == 4
    # the extra time goes to training, not to more trials: twice the budget, about twice the clock
    # (a 90-minute study of more trials found the 45-minute winner again, its clock still binding:
    # REPORT section 8), and every study is the same number of clocks long
    assert clocks[2] / clocks[1] > 1.9 and clocks[3] / clocks[1] > 3.8
    assert [(p.study_s - p.reserve["before_study"]) / p.top_s for p in plans] == pytest.approx([plan.STUDY_SHARE] * 4, rel=1e-3)
    fast = plan.make_plan(spec, 12 * 60, speed(1.0))
    slow = plan.make_plan(spec, 12 * 60, speed(5.0))
    assert len(slow.rungs) < len(fast.rungs) or slow.rungs[0] > fast.rungs[0]


def test_a_hand_set_value_wins_and_the_plan_says_so(tmp_path):
    doc = yaml.safe_load(DEFAULT.read_text())
    doc["base"] = str(ROOT / "experiments" / "gpt.yaml")
    doc["baseline"] = str(ROOT / "experiments" / "ngram.yaml")
    doc["fixed"]["train.max_minutes"] = 2.0
    doc["best"]["seeds"] = [0, 1, 2]
    path = tmp_path / "hand.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    spec = load_sweep(path, budget="45m")
    p = plan.make_plan(spec, 45 * 60, speed(1.0))
    assert p.top_s == 120 and p.seeds == (0, 1, 2)
    text = p.describe()
    assert "hand-set train.max_minutes: 2" in text and "hand-set best.seeds: [0, 1, 2]" in text
    assert plan.apply(spec, p).base_config().train.max_minutes == 2.0
    assert spent(p) <= 45 * 60 and not p.warnings
    # a hand-set clock the budget cannot hold is kept, and warned about
    doc["fixed"]["train.max_minutes"] = 10.0
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    p = plan.make_plan(load_sweep(path, budget="12m"), 12 * 60, speed(1.0))
    assert p.top_s == 600 and any("past the budget" in w or "less than one trial" in w for w in p.warnings)


def test_a_slow_configuration_starts_in_a_later_bracket_and_one_no_rung_fits_is_skipped():
    spec = load_sweep(DEFAULT)
    p = plan.make_plan(spec, 45 * 60, speed(1.0))
    rungs = list(p.rungs)
    base = spec.base_config()
    big = spec.trial_config({"model.kind": "gpt", "model.n_layer": 6, "model.n_embd": 256, "data.context": 256}, 1)
    assert plan.first_bracket(base, 0, rungs, p) == 0
    assert plan.first_bracket(big, 0, rungs, p) >= 1  # ~1 s a step: too few steps in the first rung
    assert plan.first_bracket(big, 0, rungs, p, deadline=time.time() + 10) is None  # nothing fits 10 s
    closing = plan.closing_stretch(rungs)
    assert plan.first_bracket(base, 2, rungs, p, deadline=time.time() + rungs[1] * 1.3 + 10 + closing) == 1
    # a later bracket's first rung that would eat the study's closing stretch is not started there
    assert plan.first_bracket(base, 2, rungs, p, deadline=time.time() + rungs[1] * 1.3 + 10) is None
    assert plan.first_bracket(base, 2, rungs, p, deadline=time.time() + rungs[0] * 1.3 + 10 + closing) == 0


def test_a_draw_too_slow_for_every_judged_rung_is_skipped_not_sent_unjudged_to_the_clock():
    """On val (45m, seed 0, a09dbb9, an AVX2 machine) an LSTM 3 x 512 too slow for the first rung was
    moved to the clock's bracket and trained 129 steps in a quarter of the study, to the worst value.
    Such a draw is skipped (and a covered one drawn again); one the layout itself puts in the clock's
    bracket, and a queued trial, still run there."""
    from charlm.objective import ENQUEUED, bracket_for
    from charlm.storage import Session

    # what that run's probe measured (its plan, kept on the study): two rungs, 2.1 and 6.3 minutes
    probes = (("gpt", 84.2e9, 1.221), ("gpt", 271.6e9, 3.643), ("gpt", 2.67e9, 0.046), ("rnn", 1048.4e9, 9.816),
              ("rnn", 2.15e9, 0.033), ("ff", 312.6e9, 3.717), ("ff", 1.71e9, 0.032))
    avx2 = plan.Speed(tuple(plan.Probe(*x) for x in probes), eval_chars_per_s=6_618, ngram_chars_per_s=2_161_000,
                      train_chars=892_315, retrain_chars=992_700, test_chars=111_540, val_chars=111_539,
                      vocab_size=65, measured_s=63.5)
    spec = load_sweep(DEFAULT, budget="45m")
    p = plan.make_plan(spec, 45 * 60, avx2)
    rungs, spec = list(p.rungs), plan.apply(spec, p)
    assert len(rungs) == 2
    lstm = spec.trial_config({"model.kind": "rnn", "model.layers": 3, "model.hidden": 512, "data.context": 256}, 1)
    m = p.machine()
    step_s = m.step_seconds("rnn", plan.flops_per_step(lstm, m.vocab_size))
    assert rungs[0] / step_s < p.useful_steps <= rungs[1] / step_s, (rungs, step_s)  # useful at the clock alone
    assert plan.first_bracket(lstm, 0, rungs, p) is None
    assert plan.first_bracket(lstm, 1, rungs, p) == 1  # the layout's own draw for the clock's bracket
    assert plan.first_bracket(spec.base_config(), 0, rungs, p) == 0  # the base is fast enough to be judged
    study = optuna.create_study()
    session = Session(spec, "journal:unused", study, "", 0)
    # trials 0 and 2 fall in the clock's bracket by the layout (promotion.bracket_of), 1 and 3 in the first
    for number, attrs, want in ((0, {}, 1), (1, {}, None), (2, {}, 1), (3, {ENQUEUED: "the base experiment"}, 1)):
        study.enqueue_trial({}, user_attrs=attrs)
        trial = study.ask()
        assert trial.number == number and bracket_for(session, trial, lstm) == want, (number, attrs)


def test_only_the_promotion_to_the_clock_may_use_the_closing_stretch():
    """On val (45m, seed 0, 44fd8da) the last new trials went into later brackets, used the study's
    end, and the best paused trial was never carried to the clock: every other piece of work leaves
    that stretch free, so the study's end can compare it with the trials that finished there."""
    spec = load_sweep(DEFAULT, budget="45m")
    p = plan.make_plan(spec, 45 * 60, speed(1.0))
    spec = plan.apply(spec, p)
    rungs = rung_budgets(spec.pruner.min_seconds, spec.pruner.reduction_factor, p.top_s)
    assert len(rungs) == 3
    closing = plan.closing_stretch(rungs)
    assert closing > (rungs[2] - rungs[1])
    to_clock = (rungs[2] - rungs[1]) * (1 + plan.PREVIEW_SHARE) + plan.PER_TRIAL_S
    # exactly the closing stretch left: the promotion to the clock fits, nothing else starts
    fits = plan.room_for(spec, time.time() + to_clock + 5)
    assert fits(1) and not fits(0) and not fits(-1) and not fits(2)
    # room for a new trial's first rung, or a promotion to the middle rung, and then the closing one
    fits = plan.room_for(spec, time.time() + closing + (rungs[1] - rungs[0]) * 1.2 + 10)
    assert fits(0) and fits(-1) and fits(1)
    fits = plan.room_for(spec, time.time() + closing + rungs[0] * 1.2 + 10)
    assert fits(-1) and fits(1)


def test_a_study_with_no_plan_keeps_the_closing_stretch_before_its_timeout_under_asha_only(tmp_path):
    """On val (bench/search.py seed 0, 5024ae3, three brackets): with no plan, the timeout came
    while the best trial waited at the 80-second rung (1.7082) and the study ended on 1.7218. A
    study with no plan has a deadline from study.timeout_min alone: ASHA keeps the closing stretch
    before it; any other pruner keeps Optuna's meaning of a timeout (no new trial after it)."""
    def written(doc: dict) -> Path:
        path = tmp_path / "unplanned.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    doc = yaml.safe_load(DEFAULT.read_text())
    doc["study"].pop("budget")
    doc["study"]["timeout_min"] = 12
    doc["base"], doc["baseline"] = str(ROOT / doc["base"]), str(ROOT / doc["baseline"])
    doc["pruner"] = {"type": "asha", "min_seconds": 240 / 9, "reduction_factor": 3, "brackets": 1}
    doc["fixed"]["train.max_minutes"] = 4
    spec = load_sweep(written(doc))
    assert spec.plan is None
    rungs = rung_budgets(spec.pruner.min_seconds, 3, 240)
    to_clock = (rungs[2] - rungs[1]) * (1 + plan.PREVIEW_SHARE) + plan.PER_TRIAL_S
    fits = plan.room_for(spec, time.time() + to_clock + 5)
    assert fits(1) and not fits(0) and not fits(-1)  # only the promotion to the clock: no new trial
    assert plan.room_for(spec, time.time() + 3600)(-1)
    doc["pruner"] = {"type": "hyperband"}
    assert plan.room_for(load_sweep(written(doc)), time.time() + 1)(-1)


def test_a_retrain_seed_keeps_what_its_winner_measured_after_its_clock():
    """12m seed 0 on an AVX2 machine (8480722): the winner, an LSTM, took 61 s after its trial's
    clock where the plan, from the base GPT's scoring, kept 36 s a retrain seed; the pipeline ended
    42 s late. The retrain's clock now leaves what the winner's own trial measured, scaled to the
    retrain's passes, and never less than the plan's estimate."""
    from optuna.distributions import FloatDistribution
    from optuna.trial import create_trial

    from charlm.retrain import Clock

    spec = load_sweep(DEFAULT, budget="12m")
    p = plan.make_plan(spec, 12 * 60, speed(5.0))
    spec = plan.apply(spec, p)
    planned = p.reserve["per retrain seed"]
    assert plan.seed_seconds(p, 0.01, None) == planned
    assert plan.seed_seconds(p, 0.01, 1.0) == planned  # stopped by the deadline: no passes were measured
    slow = plan.seed_seconds(p, 0.01, 61.0)
    assert slow > 61.0 * 1.1 > planned  # a retrain scores more than a trial: the test split twice

    def trial(**attrs):
        return create_trial(params={"train.lr": 0.002}, distributions={"train.lr": FloatDistribution(1e-3, 8e-3)},
                            value=1.5, user_attrs=attrs)

    start = time.time()
    base, lstm = Clock(spec, 720, start, trial()), Clock(spec, 720, start, trial(finish_seconds=61.0))
    assert lstm.per_seed == slow and base.per_seed == planned
    assert base.seconds(1) - lstm.seconds(1) == pytest.approx(slow - planned, abs=0.5)
    assert Clock(spec, None, start, trial(finish_seconds=61.0)).seconds(1) == p.retrain_s  # no budget: the plan's clock


def test_bad_budgets_are_one_line():
    for text in ("45x", "", "0m", "-3m", "30s"):
        with pytest.raises(CharlmError, match="--budget"):
            plan.parse_duration(text)
    assert plan.parse_duration("1h30m") == 5400 and plan.parse_duration("12") == 720
    r = cli("sweep", str(SMOKE), "--budget", "45 minutes", "--dry-run")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "45m, 3h" in r.stderr


def test_enqueued_trials_run_first_and_are_tagged(tmp_path):
    doc = yaml.safe_load(SMOKE.read_text())
    doc["base"] = str(ROOT / "experiments" / "gpt.yaml")
    doc["baseline"] = str(ROOT / "experiments" / "ngram.yaml")
    doc["enqueue"] = [{"model.kind": "ff", "train.lr": 0.004, "model.layers": 2}]
    doc["study"]["n_trials"] = 3
    path = tmp_path / "queued.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    r = cli("sweep", str(path), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    study = journal_study(tmp_path, "smoke")
    first, second = study.trials[0], study.trials[1]
    assert first.user_attrs["charlm.enqueued"] == "base"
    # the base experiment's own values where the space holds them (its patience 4 is outside [1, 2])
    assert first.params["model.kind"] == "gpt" and first.params["train.lr"] == 0.0015
    assert second.user_attrs["charlm.enqueued"] == "sweep file #0"
    assert second.params == {**second.params, "model.kind": "ff", "train.lr": 0.004, "model.layers": 2}
    assert "charlm.enqueued" not in study.trials[2].user_attrs
    _, runs = mlflow_runs(tmp_path, "smoke")
    tags = {r.data.tags.get("optuna.trial_number"): r.data.tags.get("charlm.enqueued") for r in runs}
    assert tags["0"] == "base" and tags["1"] == "sweep file #0" and tags["2"] is None
    # a warm start queues the earlier study's best trials, named as such
    doc2 = {**doc, "study": {**doc["study"], "name": "smoke2"}}
    doc2.pop("enqueue")
    path2 = tmp_path / "warm.yaml"
    path2.write_text(yaml.safe_dump(doc2, sort_keys=False))
    r = cli("sweep", str(path2), "--warm-start", "smoke", "--n-trials", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    warm = journal_study(tmp_path, "smoke2")
    assert warm.trials[1].user_attrs["charlm.enqueued"] == f"warm start smoke#{study.best_trial.number}"
    assert cli("sweep", str(path2), "--warm-start", "nosuch", cwd=tmp_path).returncode == 2


def test_the_first_draws_take_each_model_kind_the_queue_left_and_are_judged_as_draws(tmp_path):
    """On val, 45m seed 2 on an AVX2 machine drew six trials and no LSTM (the kind that won every
    study that drew one): ``study.cover`` gives each kind the queued trials left one draw."""
    doc = yaml.safe_load(SMOKE.read_text())
    doc["base"] = str(ROOT / "experiments" / "gpt.yaml")
    doc.pop("baseline")
    doc["study"].update({"n_trials": 4, "cover": "model.kind"})
    doc["space"]["model.kind"] = {"choice": ["ff", "gpt", "rnn"]}
    path = tmp_path / "cover.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    preview = cli("sweep", str(path), "--dry-run", cwd=tmp_path)
    assert preview.returncode == 0, preview.stderr[-2000:]
    assert "trial 1 (a draw with model.kind=ff)" in preview.stdout and "trial 2 (a draw with model.kind=rnn)" in preview.stdout
    r = cli("sweep", str(path), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "queued first: base, a draw with model.kind=ff, a draw with model.kind=rnn" in r.stderr
    trials = journal_study(tmp_path, "smoke").trials
    # the base (a gpt), then the kinds it left, in the space's order; then the sampler alone
    assert [t.params["model.kind"] for t in trials[:3]] == ["gpt", "ff", "rnn"]
    assert [t.user_attrs.get("charlm.cover") for t in trials] == [None, "model.kind=ff", "model.kind=rnn", None]
    assert all("charlm.enqueued" not in t.user_attrs for t in trials[1:])  # drawn: judged in their own bracket
    assert {"model.layers", "train.lr", "train.patience"} <= set(trials[1].params)  # the rest is drawn
    _, runs = mlflow_runs(tmp_path, "smoke")
    tags = {r.data.tags.get("optuna.trial_number"): r.data.tags.get("charlm.cover") for r in runs}
    assert tags["1"] == "model.kind=ff" and tags["2"] == "model.kind=rnn" and tags["0"] is None
    doc["study"]["cover"] = "train.lr"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    bad = cli("sweep", str(path), "--dry-run", cwd=tmp_path)
    assert bad.returncode == 2 and "study.cover" in bad.stderr and "model.kind" in bad.stderr and bad.stderr.count("\n") == 1


def test_a_covered_draw_skipped_as_too_slow_is_drawn_again_with_its_kind_kept(tmp_path, monkeypatch):
    """On val, 12m seed 0 on an AVX2 machine: the one LSTM draw was too slow for any rung and the
    study never trained an LSTM. A skipped covered draw is drawn again with its kind kept, up to
    COVER_TRIES draws; another skipped draw is not."""
    monkeypatch.chdir(tmp_path)
    from optuna.trial import TrialState

    from charlm.objective import COVER_TRIES, skip
    from charlm.space import suggest
    from charlm.storage import storage_url
    from charlm.study import prepare

    doc = yaml.safe_load(SMOKE.read_text())
    doc["base"] = str(ROOT / "experiments" / "gpt.yaml")
    doc.pop("baseline")
    doc["study"].update({"enqueue_base": False, "cover": "model.kind"})
    doc["sampler"]["type"] = "tpe"
    path = tmp_path / "cover.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    spec = load_sweep(path)
    study = prepare(spec, storage_url(spec)).study

    def draw():
        trial = study.ask()
        return trial, spec.trial_config(suggest(trial, spec), trial.number)

    trial, _ = draw()  # the gpt's covered draw, trained as any draw: nothing more is queued
    assert trial.user_attrs["charlm.cover"] == "model.kind=gpt"
    study.tell(trial, 1.0)
    for n in range(1, COVER_TRIES + 1):
        trial, cfg = draw()
        assert cfg.model.kind == "ff" and trial.user_attrs["charlm.cover"] == "model.kind=ff"
        assert trial.user_attrs.get("charlm.cover_try", 1) == n
        assert "model.layers" in trial.params  # the rest of the configuration is drawn afresh
        assert skip(study, trial, cfg) == TrialState.PRUNED
        waiting = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.WAITING]
        assert len(waiting) == (n < COVER_TRIES)  # the last draw allowed queues nothing more
    trial, cfg = draw()  # a draw that is not a covered one is skipped with nothing queued
    assert "charlm.cover" not in trial.user_attrs
    skip(study, trial, cfg)
    assert not [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.WAITING]
    assert len(study.trials) == COVER_TRIES + 2


def test_a_trial_in_flight_at_the_deadline_stops_at_its_next_evaluation_with_its_value(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from optuna.trial import TrialState

    from charlm.objective import run_trial
    from charlm.storage import storage_url
    from charlm.study import prepare

    doc = yaml.safe_load(SMOKE.read_text())
    doc["base"] = str(ROOT / "experiments" / "gpt.yaml")
    doc.pop("baseline")
    doc["study"]["enqueue_base"] = False
    doc["pruner"] = {"type": "none"}
    doc["fixed"].update({"train.max_steps": 1_000_000, "train.validation_interval": 100_000, "train.max_minutes": 10})
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    spec = load_sweep(path)
    session = prepare(spec, storage_url(spec))
    session.stop_at = time.time() + 6.0  # mid-trial: its clock (10 min) and its next evaluation are far off
    trial = session.study.ask()
    t0 = time.time()
    state = run_trial(session, trial)
    assert state == TrialState.COMPLETE and time.time() - t0 < 60
    done = session.study.trials[trial.number]
    assert done.user_attrs["stop_reason"] == "deadline" and 0 < done.user_attrs["steps"] < 100_000
    assert done.value == min(done.intermediate_values.values()) and math.isfinite(done.value)
    _, runs = mlflow_runs(tmp_path, "smoke")
    run = next(r for r in runs if r.data.tags.get("optuna.trial_number") == str(trial.number))
    assert run.data.tags["stop_reason"] == "deadline" and run.info.status == "FINISHED"


def test_best_names_the_retrain_budget_that_binds():
    # "retraining 1000000 steps" was printed for a retrain that a 6-minute clock ends
    from charlm import config
    from charlm.retrain import budget_words

    clocked = config.override(config.Config(), {"train.max_steps": 1_000_000, "train.max_minutes": 6.5}, where="t")
    assert budget_words(clocked) == "6.50 minutes"
    stepped = config.override(config.Config(), {"train.max_steps": 90}, where="t")
    assert budget_words(stepped) == "90 steps"


def test_a_trial_that_ranks_first_pauses_at_its_rung_where_climbing_would_eat_the_closing_stretch(tmp_path, monkeypatch):
    """On val (45m, seed 0, 009925f) the study's last new trial ranked first at its first rung and
    climbed straight on into the stretch kept for the closing promotion: the study ended 3.7 min
    early and its best paused trial was never carried to the clock. ``climb`` asks ``room_for``."""
    monkeypatch.chdir(tmp_path)
    from charlm import promotion
    from charlm.objective import run_trial
    from charlm.storage import storage_url
    from charlm.study import prepare
    from charlm.workers import Heartbeat

    doc = yaml.safe_load(SMOKE.read_text())
    doc["base"] = str(ROOT / "experiments" / "gpt.yaml")
    doc.pop("baseline")
    doc["study"]["enqueue_base"] = False
    doc["pruner"] = {"type": "asha", "min_seconds": 2, "reduction_factor": 3, "brackets": 1}  # rungs 2, 6, 18 s
    doc["fixed"].update({"train.max_steps": 1_000_000, "train.max_minutes": 0.3, "train.sample_chars": 0,
                         "train.validation_interval": 20, "train.schedule": "wsd"})
    path = tmp_path / "climb.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    spec = load_sweep(path)
    session = prepare(spec, storage_url(spec))
    session.spec = plan.apply(spec, plan.make_plan(spec, 45 * 60, speed(1.0)))  # a planned study
    rungs = rung_budgets(session.spec.pruner.min_seconds, session.spec.pruner.reduction_factor, 18)
    assert rungs == pytest.approx([2, 6, 18], rel=0.01)
    storage = session.study._storage
    for _ in range(2):  # two trials paused at rung 0, far behind: the next one ranks first of three
        t = session.study.ask()
        for key, v in {promotion.BRACKET: 0, promotion.rung_key(0): 99.0, promotion.RUNG: 0, promotion.PAUSED: True}.items():
            storage.set_trial_system_attr(t._trial_id, key, v)
    # time for its first rung and then the closing stretch (plan.first_bracket), not for the middle rung too
    session.stop_at = time.time() + rungs[0] * (1 + plan.PREVIEW_SHARE) + plan.PER_TRIAL_S + plan.closing_stretch(rungs) + 2.0
    trial = session.study.ask()
    with Heartbeat(session.study, trial):
        assert run_trial(session, trial) is None  # paused
    mine = session.study.trials[trial.number].system_attrs
    assert mine[promotion.BRACKET] == 0 and mine[promotion.RUNG] == 0 and mine[promotion.PAUSED] is True
    assert promotion.promotable(session.study.trials, 0, trial.number, 3)  # it ranked first: only the clock held it
    assert session.study.trials[trial.number].user_attrs["train_seconds"] < rungs[1] - rungs[0]  # trained rung 0 alone
    _, runs = mlflow_runs(tmp_path, "smoke")
    run = next(r for r in runs if r.data.tags.get("optuna.trial_number") == str(trial.number))
    assert run.data.tags["optuna.state"] == "PAUSED" and run.data.tags["rung"] == "0"
