"""A whole search planned to a wall-clock budget: ``sweep --budget 45m`` then ``best --budget 45m``.

Optuna's ``timeout`` only stops new trials from starting. A plan fits everything to the deadline:
the probe that measures this machine (:func:`measure`), the baseline, the study (its trial clock,
rungs, brackets, trial count and deadline), the retrain of the winner over seeds, the test passes
and the registry. How it divides the budget (:func:`make_plan`):

- the fixed costs come first: start-up, the probe, the baseline, each retrain seed's test passes
  and n-gram, the registry, and a margin of 1% (what the machine's noise costs);
- what is left is split between the study and the retrain: the trial clock ``top`` (the top
  rung) is also each retrain seed's clock, and the study gets ``STUDY_SHARE`` clocks of wall time
  at every budget: a longer budget buys longer trials and a longer retrain, not more trials (at
  90 minutes a study of more trials found the 45-minute winner again, and its clock still bound
  it: REPORT section 8);
- two retrain seeds from 30 minutes on (the spread is part of the answer), one below;
- ASHA's rungs divide the clock by the reduction factor while the first rung still gives the
  base experiment ``useful`` steps (``USEFUL_WARMUPS`` times its warmup): a rung that ends inside
  the warmup ranks learning rates that have not peaked, not configurations. A trial too slow to
  train that many steps in its bracket's first rung starts in a later bracket
  (:func:`first_bracket`).

A sweep file may still set any planned value by hand (``fixed: train.max_minutes``,
``study.n_trials``, ``pruner.brackets``, ``best.seeds``, ...); the hand-set value wins, the plan says
so and warns where it breaks the budget. The plan is made once per study and kept on it (user
attribute ``charlm.plan``): workers, ``best`` and ``report`` apply the same one, and a resumed study
keeps its clock and rungs (its paused trials' states depend on them); only the deadline moves.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass, field

from charlm import config
from charlm.errors import CharlmError
from charlm.promotion import bracket_shares, rung_budgets

STUDY_SHARE = 4.5  # the study's wall time in trial clocks (the hand-made 45-minute default had 26 min / 6)
USEFUL_WARMUPS = 3  # a first rung gives the base at least this many warmups of steps
MIN_RUNG_S = 20.0  # no rung shorter: a trial's start-up (its MLflow run, the corpus) is seconds
TWO_SEEDS_FROM_S = 30 * 60  # two retrain seeds from this budget on, one below
MARGIN = 0.01  # of the budget, kept back for the machine's noise
START_S = 10.0  # two Python start-ups (sweep, best): imports of torch, MLflow, Optuna
PER_TRIAL_S = 4.0  # a trial's MLflow run, params, plots and Optuna writes, besides its training
CLOSE_S = 15.0  # the study's plots and report, then best's registry, model logging and sample
PREVIEW_SHARE = 0.2  # an ASHA rung-end preview decays over this share of the steps so far (train.decay_fraction)
PLAN_ATTR = "charlm.plan"  # where the study keeps its plan


def parse_duration(text: str, what: str = "--budget") -> float:
    """``45m``, ``3h``, ``1h30m``, ``90s`` or a bare number of minutes -> seconds."""
    s = str(text).strip().lower()
    parts = re.fullmatch(r"((\d+(\.\d+)?)h)?((\d+(\.\d+)?)m)?((\d+(\.\d+)?)s)?", s)
    if s and re.fullmatch(r"\d+(\.\d+)?", s):
        seconds = float(s) * 60
    elif s and parts:
        seconds = sum(float(parts.group(i) or 0) * k for i, k in ((2, 3600), (5, 60), (8, 1)))
    else:
        raise CharlmError(f"{what} '{text}' is not a duration; give one such as 45m, 3h, 1h30m or 90s")
    if not 60 <= seconds <= 7 * 24 * 3600:
        raise CharlmError(f"{what} '{text}' is {seconds:g} s; give a duration from 1m to 7 days")
    return seconds


@dataclass(frozen=True)
class Probe:
    """One configuration timed on this machine: its work per step and its seconds per step."""

    kind: str
    flops_per_step: float
    step_seconds: float


@dataclass(frozen=True)
class Speed:
    """What :func:`measure` found; the plan's only input about the machine."""

    probes: tuple[Probe, ...]
    eval_chars_per_s: float  # full-pass scoring by the base experiment's model
    ngram_chars_per_s: float  # counting the retrain's n-gram
    train_chars: int  # the text's training split (80%) and the retrain's (89%): what the n-grams count
    retrain_chars: int
    test_chars: int
    val_chars: int
    vocab_size: int
    measured_s: float = 0.0  # what measuring took

    def step_seconds(self, kind: str, flops: float) -> float:
        """Seconds per step of a configuration: the least-squares line through the kind's probes (a
        fixed cost per step plus a cost per flop); one probe: in proportion. A kind with no probe:
        the slowest probe's seconds."""
        ps = [p for p in self.probes if p.kind == kind]
        if not ps:
            return max((p.step_seconds for p in self.probes), default=1.0)
        xs, ys = [p.flops_per_step for p in ps], [p.step_seconds for p in ps]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mx) ** 2 for x in xs)
        if len(ps) == 1 or var <= 0:
            return ys[0] * max(flops, 1.0) / max(xs[0], 1.0)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var
        return max(min(ys) * 0.5, my + slope * (flops - mx))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Speed:
        return cls(**{**d, "probes": tuple(Probe(**p) for p in d["probes"])})


@dataclass(frozen=True)
class Plan:
    """A study and its retrain fitted to ``budget_s`` from ``started_at`` (epoch seconds)."""

    budget_s: float
    started_at: float
    top_s: float  # the trial clock: the top rung, and the retrain's clock per seed
    rungs: tuple[float, ...]  # ASHA rung ends, training seconds (empty: another pruner)
    brackets: int
    study_s: float  # the study's deadline, from started_at
    n_trials: int
    n_startup_trials: int
    retrain_s: float  # per seed
    seeds: tuple[int, ...]
    useful_steps: int
    reserve: dict = field(default_factory=dict)  # fixed costs, seconds, by name
    hand: tuple[str, ...] = ()  # the planned values the sweep file set by hand: 'key: hand (plan p)'
    warnings: tuple[str, ...] = ()
    mix_order: int = 0  # the retrain's n-gram order, lowered where the text's alphabet needs it
    speed: dict = field(default_factory=dict)  # Speed.to_dict(): how the machine measured

    @property
    def ends_at(self) -> float:
        return self.started_at + self.budget_s

    @property
    def study_deadline(self) -> float:
        return self.started_at + self.study_s

    def machine(self) -> Speed:
        return Speed.from_dict(self.speed)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        d = json.loads(text)
        for k in ("rungs", "seeds", "hand", "warnings"):
            d[k] = tuple(d[k])
        return cls(**d)

    def params(self) -> dict[str, str]:
        """The plan as MLflow params of the study's parent run."""
        return {"plan.budget_min": f"{self.budget_s / 60:g}", "plan.trial_clock_s": f"{self.top_s:.0f}",
                "plan.rungs_s": "/".join(f"{r:.0f}" for r in self.rungs) or "-",
                "plan.brackets": str(self.brackets), "plan.study_min": f"{self.study_s / 60:.1f}",
                "plan.n_trials": str(self.n_trials), "plan.retrain_s": f"{self.retrain_s:.0f}",
                "plan.seeds": ",".join(map(str, self.seeds)), "plan.useful_steps": str(self.useful_steps),
                "plan.hand_set": "; ".join(self.hand)[:500] or "-"}

    def describe(self) -> str:
        m = lambda s: f"{s / 60:.1f} min" if s >= 120 else f"{s:.0f} s"  # noqa: E731
        lines = [f"plan for {m(self.budget_s)} (ends {time.strftime('%H:%M:%S', time.localtime(self.ends_at))}):",
                 f"  study    {m(self.study_s - self.reserve.get('before_study', 0.0))} of trials "
                 f"(deadline {time.strftime('%H:%M:%S', time.localtime(self.study_deadline))}), "
                 f"up to {self.n_trials} trials, trial clock {m(self.top_s)}"]
        if self.rungs:
            lines.append(f"  rungs    {' / '.join(m(r) for r in self.rungs)} in {self.brackets} bracket(s); a first "
                         f"rung gives the base at least {self.useful_steps} steps")
        lines.append(f"  retrain  {m(self.retrain_s)} x seeds {list(self.seeds)}"
                     + (f", mixed with a {self.mix_order}-gram" if self.mix_order else ""))
        lines.append("  reserved " + ", ".join(f"{k} {v:.0f} s" for k, v in self.reserve.items()))
        probes = self.machine().probes
        if probes:
            lines.append("  measured " + ", ".join(f"{p.kind} {p.step_seconds * 1000:.0f} ms/step at "
                                                 f"{p.flops_per_step / 1e9:.2f} GFLOP" for p in probes)
                         + f"; scoring {self.machine().eval_chars_per_s / 1000:.0f}k chars/s")
        lines += [f"  hand-set {h}" for h in self.hand]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


# --- measuring the machine ---------------------------------------------------------------------


def _shape_values(spec, branch, pick) -> dict:
    """One corner of a kind's branch: ``pick`` (max or min) of every key that sets a step's size."""
    sized = ("model.", "data.context", "train.batch_size")
    values = {}
    for p in spec.space:
        if not p.key.startswith(sized) or p.key == "model.kind" or (p.when is not None and p.when != branch):
            continue
        if p.key in ("model.dropout", "model.mix_order", "model.bias", "model.tie_weights"):
            continue
        options = list(p.choices) if p.kind in ("choice", "fixed") else [p.low, p.high]
        numeric = [v for v in options if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if numeric:
            values[p.key] = pick(numeric)
    return values


def probe_configs(spec) -> list[config.Config]:
    """The base experiment, and the largest and smallest configuration of each kind in the space."""
    base = spec.base_config()
    kinds = next((list(p.choices) for p in spec.space if p.key == "model.kind"), [base.model.kind])
    out = [base]
    for kind in kinds:
        branch = next((p.when for p in spec.space if p.when and p.when[0] == "model.kind" and kind in p.when[1]), None)
        for pick in (max, min):
            values = {"model.kind": kind, **_shape_values(spec, branch, pick)}
            try:
                out.append(spec.config_for(values, where=f"{spec.path} (probe)"))
            except config.ConfigError:
                continue
    seen, unique = set(), []
    for c in out:
        key = (c.model, c.data.context, c.train.batch_size)
        if c.model.kind != "ngram" and key not in seen:
            seen.add(key)
            unique.append(c)
    return unique


def flops_per_step(cfg: config.Config, vocab_size: int) -> float:
    from charlm.models import build_model

    model = build_model(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, mix_order=0)), vocab_size)
    return float(model.flops_per_token(cfg.data.context)) * cfg.data.context * cfg.train.batch_size


def _run_for(cfg: config.Config, corpus):
    """The trainer's Run of ``cfg`` (its network alone), recorded nowhere."""
    from charlm.tracking import NullTracker
    from charlm.trainer import setup

    return setup(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, mix_order=0)), NullTracker(), corpus)


def _time_steps(cfg: config.Config, corpus, seconds: float = 1.5):
    """Seconds per optimizer step of ``cfg`` on this machine, after one warm-up step: the median of
    the trainer's own steps (charlm/trainer.py ``setup``, charlm/loop.py ``Loop.step``). Also returns
    the run, whose model the probe scores with."""
    from charlm.loop import Loop, TrainState
    from charlm.stopping import Patience

    run = _run_for(cfg, corpus)
    loop = Loop(run, TrainState(Patience(0)), None, None)
    times = []
    t_end = time.perf_counter() + seconds
    for i in range(12):
        t0 = time.perf_counter()
        loop.step(cfg.train.lr)
        if run.device == "cuda":
            import torch

            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
        if len(times) >= 2 and time.perf_counter() >= t_end:
            break
    times.sort()
    return times[len(times) // 2], run


_MEASURED: dict[tuple, Speed] = {}  # this process's measurements, by what they timed: a machine is measured once


def measure(spec) -> Speed:
    """Time the base experiment and each kind's largest and smallest configuration for a few
    steps, the base's full-pass scoring, and the retrain's n-gram counting (seconds in all). A
    process that plans the same configurations again (a script's second study, the fuzz test's
    dry runs) reuses the first measurement."""
    base, retrain = spec.base_config(), spec.retrain_base()
    probed = probe_configs(spec)
    key = (config.dump_yaml(retrain), *(config.dump_yaml(c) for c in probed))
    if key not in _MEASURED:
        _MEASURED[key] = _measure(base, retrain, probed)
    return _MEASURED[key]


def _measure(base: config.Config, retrain: config.Config, probed: list[config.Config]) -> Speed:
    from charlm.data import load_corpus
    from charlm.models.ngram import NGram

    t0 = time.perf_counter()
    corpus = load_corpus(base.data)
    retrain_corpus = load_corpus(retrain.data)
    probes, scorer = [], None
    for cfg in probed:  # the base first: its run scores below
        seconds, run = _time_steps(cfg, corpus)
        probes.append(Probe(cfg.model.kind, flops_per_step(cfg, len(corpus.vocab)), seconds))
        scorer = scorer or run
    scorer = scorer or _run_for(base, corpus)  # a base with nothing to train (an n-gram) still scores
    ids = corpus.val[:20_000]
    te = time.perf_counter()
    scorer.score(ids, scorer.amp)
    eval_rate = len(ids) / max(time.perf_counter() - te, 1e-6)
    order = _max_mix_order(len(corpus.vocab), max(retrain.model.mix_order, 6))
    counted = corpus.train[:200_000]
    tn = time.perf_counter()
    NGram(NGram.Config(), len(corpus.vocab), order - 1).fit(counted)
    ngram_rate = len(counted) / max(time.perf_counter() - tn, 1e-6)
    return Speed(tuple(probes), eval_rate, ngram_rate, len(corpus.train), len(retrain_corpus.train),
                 len(corpus.test), len(corpus.val), len(corpus.vocab), time.perf_counter() - t0)


# --- the plan ----------------------------------------------------------------------------------


def _max_mix_order(vocab_size: int, wanted: int) -> int:
    """The highest n-gram order at most ``wanted`` whose ids fit 64 bits over this alphabet."""
    order = wanted
    while order > 1 and vocab_size ** order >= 2 ** 63:
        order -= 1
    return order


def make_plan(spec, budget_s: float, speed: Speed, started_at: float | None = None) -> Plan:
    """Fit the study and the retrain to ``budget_s`` on a machine that measured ``speed``."""
    hand = spec.hand
    base, retrain_cfg = spec.base_config(), spec.retrain_base()
    mix_order = _max_mix_order(speed.vocab_size, retrain_cfg.model.mix_order) if retrain_cfg.model.mix_order else 0
    warnings = []
    if mix_order and mix_order != retrain_cfg.model.mix_order:
        warnings.append(f"the text's {speed.vocab_size} characters allow an n-gram of order {mix_order} at most "
                        f"(64-bit ids); the retrain mixes with that instead of {retrain_cfg.model.mix_order}")

    eval_s = lambda chars: chars / max(speed.eval_chars_per_s, 1.0)  # noqa: E731
    ngram_s = lambda chars: chars / max(speed.ngram_chars_per_s, 1.0)  # noqa: E731
    baseline_s = 0.0
    if spec.baseline:  # an n-gram counted on the training split, scored on val and test
        baseline_s = ngram_s(speed.train_chars) + eval_s(speed.val_chars + speed.test_chars) + PER_TRIAL_S
    per_seed = _seed_cost(speed, eval_s(retrain_scored_chars(speed, retrain_cfg.data.val_fraction)), mix_order)
    reserve = {"start-up": START_S, "probe": speed.measured_s, "baseline": baseline_s, "margin": MARGIN * budget_s,
               "close": CLOSE_S}
    reserve["before_study"] = START_S / 2 + speed.measured_s + baseline_s
    fixed = sum(v for k, v in reserve.items() if k != "before_study")

    seeds = spec.best.seeds if "best.seeds" in hand else ((0, 1) if budget_s >= TWO_SEEDS_FROM_S else (0,))
    per_trial_full = PER_TRIAL_S + eval_s(speed.val_chars + speed.test_chars)
    left = budget_s - fixed - len(seeds) * per_seed
    top = max(MIN_RUNG_S, left / (len(seeds) + STUDY_SHARE))
    plan_top = top
    if "train.max_minutes" in hand:
        top = spec.fixed["train.max_minutes"] * 60
    retrain = top * spec.best.budget_multiplier if "best.budget_multiplier" in hand else top
    study_end = budget_s - reserve["close"] - reserve["margin"] - len(seeds) * (retrain + per_seed) - START_S / 2

    useful = USEFUL_WARMUPS * max(1, base.train.warmup_steps)
    base_step = speed.step_seconds(base.model.kind, flops_per_step(base, speed.vocab_size)) if speed.probes else 0.0
    rungs: tuple[float, ...] = ()
    brackets = spec.pruner.brackets
    p = spec.pruner
    if p.type == "asha":
        first_min = max(MIN_RUNG_S, useful * base_step * (1 + PREVIEW_SHARE))
        if "pruner.min_seconds" in hand:
            first_min = p.min_seconds
        rungs = tuple(rung_budgets(min(first_min, top * 0.999), p.reduction_factor, top))
        if "pruner.brackets" not in hand:
            brackets = len(rungs)
        elif brackets > len(rungs):
            warnings.append(f"pruner.brackets {brackets} is more than the {len(rungs)} rung(s) this budget allows; "
                            f"{len(rungs)} used")
            brackets = len(rungs)
        shares = bracket_shares(list(rungs), p.reduction_factor, brackets)
        costs = []
        for b in range(brackets):
            climbs = range(b + 1, len(rungs))
            costs.append(rungs[b] * (1 + PREVIEW_SHARE) + sum(
                (rungs[k] - rungs[k - 1]) * (1 + PREVIEW_SHARE) / p.reduction_factor ** (k - b) for k in climbs))
        trial_s = sum(s * c for s, c in zip(shares, costs)) + per_trial_full
    else:
        trial_s = top + per_trial_full
    study_run = max(0.0, study_end - reserve["before_study"])
    est = max(1, int(study_run / trial_s))
    n_trials = spec.study.n_trials if "study.n_trials" in hand else max(4, 2 * est)
    n_startup = spec.sampler.n_startup_trials if "sampler.n_startup_trials" in hand else max(3, est // 3)
    if "study.timeout_min" in hand and spec.study.timeout_min:
        hand_end = reserve["before_study"] + spec.study.timeout_min * 60
        if hand_end > study_end:
            warnings.append(f"study.timeout_min {spec.study.timeout_min:g} runs the study {hand_end - study_end:.0f} s "
                            "past the plan's deadline: the retrain gets that much less time")
        study_end = hand_end

    hand_notes = []
    for key, planned, value in (("train.max_minutes", f"{plan_top / 60:.2f}", f"{top / 60:g}"),
                                ("study.n_trials", str(max(4, 2 * est)), str(n_trials)),
                                ("sampler.n_startup_trials", str(max(3, est // 3)), str(n_startup)),
                                ("best.seeds", str([0, 1] if budget_s >= TWO_SEEDS_FROM_S else [0]), str(list(seeds))),
                                ("best.budget_multiplier", "1", f"{spec.best.budget_multiplier:g}"),
                                ("pruner.min_seconds", f"{rungs[0]:.0f}" if rungs else "-", f"{p.min_seconds:g}"),
                                ("pruner.brackets", str(len(rungs)) if rungs else "-", str(brackets)),
                                ("study.timeout_min", f"{(study_end - reserve['before_study']) / 60:.1f}",
                                 f"{spec.study.timeout_min:g}")):
        if key in hand:
            hand_notes.append(f"{key}: {value} from {spec.path} (the plan: {planned})")
    if study_end - reserve["before_study"] < (rungs[0] if rungs else top):
        warnings.append(f"the budget leaves the study {max(0.0, study_end - reserve['before_study']):.0f} s, less "
                        f"than one trial's first rung ({rungs[0] if rungs else top:.0f} s): give a longer budget"
                        + (" or lower the hand-set values" if hand_notes else ""))
    total = study_end + len(seeds) * (retrain + per_seed) + reserve["close"] + START_S / 2
    if total > budget_s * (1 + MARGIN):
        warnings.append(f"the hand-set values need {total / 60:.1f} min, past the budget of {budget_s / 60:.1f}")
    reserve["per retrain seed"] = per_seed
    reserve = {k: round(v, 1) for k, v in reserve.items()}
    return Plan(budget_s=budget_s, started_at=time.time() if started_at is None else started_at, top_s=top,
                rungs=rungs, brackets=brackets, study_s=study_end, n_trials=n_trials, n_startup_trials=n_startup,
                retrain_s=retrain, seeds=tuple(seeds), useful_steps=useful, reserve=reserve,
                hand=tuple(hand_notes), warnings=tuple(warnings), mix_order=mix_order, speed=speed.to_dict())


def retrain_scored_chars(speed: Speed, val_fraction: float) -> int:
    """The characters one retrain seed scores after its clock: the test split twice (the network
    alone, then mixed) and its own val split three times (the gate's fit, the mixed pass, the full
    val), that split ``val_fraction`` of the text the retrain's 89% comes from."""
    return 2 * speed.test_chars + 3 * max(1, int(speed.retrain_chars / 0.89 * val_fraction))


def seed_seconds(plan: Plan, val_fraction: float, finish_s: float | None) -> float:
    """One retrain seed's seconds besides its clock, once the winner is known: what the winner's own
    trial took after its clock (``finish_s``: its full passes over val and test, its sample, its
    model and plots logged), scaled to the characters a retrain scores, with the n-gram counted
    and the run's writes; the plan's estimate (the base experiment's scoring speed) where that is
    longer. On a 2-core AVX2 machine, 12m seed 0 at 8480722: the winner, an LSTM 1 x 1024, scored
    at 5.1k characters a second against the base GPT's 8k, sampled slower, and its retrain seed
    took 82 s besides its clock where the plan had kept 36: the pipeline ended 42 s past its budget."""
    planned = plan.reserve.get("per retrain seed", 0.0)
    if not finish_s:
        return planned
    speed = plan.machine()
    scale = retrain_scored_chars(speed, val_fraction) / max(1, speed.val_chars + speed.test_chars)
    return max(planned, _seed_cost(speed, finish_s * scale, plan.mix_order))


def _seed_cost(speed: Speed, scoring_s: float, mix_order: int) -> float:
    """A retrain seed's cost besides its clock: its run's writes, ``scoring_s`` of passes, and the
    n-gram counted on its text where it mixes with one."""
    return PER_TRIAL_S + scoring_s + (speed.retrain_chars / max(speed.ngram_chars_per_s, 1.0) if mix_order else 0.0)


def apply(spec, plan: Plan):
    """``spec`` with the plan's values where the sweep file left them to it."""
    hand = spec.hand
    study, sampler, pruner, best = spec.study, spec.sampler, spec.pruner, spec.best
    fixed = dict(spec.fixed)
    if "study.n_trials" not in hand:
        study = dataclasses.replace(study, n_trials=plan.n_trials)
    if "sampler.n_startup_trials" not in hand:
        sampler = dataclasses.replace(sampler, n_startup_trials=plan.n_startup_trials)
    if "train.max_minutes" not in hand:
        fixed["train.max_minutes"] = plan.top_s / 60
    if pruner.type == "asha" and plan.rungs:
        pruner = dataclasses.replace(pruner, min_seconds=plan.rungs[0] * 0.999, brackets=plan.brackets)
    best_set = dict(best.set)
    if plan.mix_order and best_set.get("model.mix_order", plan.mix_order) != plan.mix_order:
        best_set["model.mix_order"] = plan.mix_order
    best = dataclasses.replace(best, seeds=plan.seeds, set=best_set)
    return dataclasses.replace(spec, study=study, sampler=sampler, pruner=pruner, best=best, fixed=fixed, plan=plan)


def closing_stretch(rungs: list[float]) -> float:
    """The wall time that carries a trial paused at the last rung below the clock on to the clock:
    the stretch itself, its rung-end preview and the trial's own costs. Every other piece of work
    (a new trial in any bracket, a promotion below that rung) must end this long before the study's
    deadline, so its end always has room for the **closing promotion**. On val, a 45-minute study
    (seed 0, 44fd8da) reserved it for bracket 0's new trials only: its last new trials went into
    later brackets, the study ended 4 minutes early, and a drawn LSTM paused at 1.3646 after 2.2
    minutes (the base: 1.3560 at 6.7) was never carried on."""
    return (rungs[-1] - rungs[-2]) * (1 + PREVIEW_SHARE) + PER_TRIAL_S if len(rungs) > 1 else 0.0


def room_for(spec, deadline: float | None):
    """``fits(k)``: whether the rung after rung ``k`` (-1: a new trial's shortest first stretch) can
    end before the study's deadline, its rung-end preview and the trial's own costs included. Only
    the promotion to the clock may use the study's :func:`closing_stretch`: a promotion to a lower
    rung, whether a worker picks up a paused trial or a trial climbs on from the rung it just
    reached, leaves it free, as a new trial does (:func:`first_bracket`). A study with no plan has
    a deadline only from ``study.timeout_min``; there ASHA keeps the closing stretch before it too,
    and every other pruner keeps Optuna's meaning (no new trial after the timeout). On val,
    bench/search.py seed 0 at 5024ae3 (three brackets, no room kept): the timeout came while the
    study's best trial waited at the 80-second rung (1.7082), and it ended on 1.7218."""
    if deadline is None or (spec.plan is None and spec.pruner.type != "asha"):
        return lambda k: True
    top = spec.base_config().train.max_minutes * 60
    p = spec.pruner
    rungs = rung_budgets(p.min_seconds, p.reduction_factor, top) if p.type == "asha" else [top]

    def fits(k: int) -> bool:
        if k + 1 >= len(rungs):
            return False
        length = rungs[k + 1] - (rungs[k] if k >= 0 else 0.0)
        return ends_in_time(length, rungs, deadline, to_clock=k + 1 == len(rungs) - 1)

    return fits


def ends_in_time(length: float, rungs: list[float], deadline: float, to_clock: bool = False) -> bool:
    """Whether ``length`` seconds of training that start now end before ``deadline``, with their
    rung-end preview and the trial's own costs, and leave the :func:`closing_stretch` free unless
    they are the promotion to the clock (the one piece of work that may use it)."""
    reserve = 0.0 if to_clock else closing_stretch(rungs)
    return time.time() + length * (1 + PREVIEW_SHARE) + PER_TRIAL_S + reserve <= deadline


def first_bracket(cfg: config.Config, bracket: int, rungs: list[float], plan: Plan | None,
                  deadline: float | None = None) -> int | None:
    """The bracket a new trial starts in: its draw's ``bracket``, or a later one where its first
    rung would give it fewer than ``plan.useful_steps`` steps, but never moved into the bracket
    whose first rung is the clock (there it would run unjudged to the clock); an earlier one where
    the study's deadline leaves no time for its first rung and then the closing stretch
    (:func:`closing_stretch`). None: no bracket fits (the trial is skipped; a covered draw is drawn
    again). On val (45m, seed 0, a09dbb9, an AVX2 machine): an LSTM 3 x 512 on 256 characters, too
    slow for the 2.1-minute rung, was moved to the clock's bracket; it trained 129 steps in 6.3
    minutes to 2.2077, last of the study's three trials, and took a quarter of its time."""
    if plan is None:
        return bracket
    speed = plan.machine()
    step_s = speed.step_seconds(cfg.model.kind, flops_per_step(cfg, speed.vocab_size)) if speed.probes else 0.0
    useful = [b for b in range(len(rungs)) if step_s == 0 or rungs[b] / step_s >= plan.useful_steps]
    if not useful:
        return None
    b = max(bracket, useful[0])
    if b > bracket and b == len(rungs) - 1:  # too slow for every judged rung: not worth a whole clock
        return None
    if deadline is not None:
        fits = [k for k in useful if k <= b and ends_in_time(rungs[k], rungs, deadline)]
        return fits[-1] if fits else None
    return b


def for_study(spec, study):
    """``spec`` with the plan its study keeps, if it has one (workers, ``best``, ``report``)."""
    text = study.user_attrs.get(PLAN_ATTR)
    return apply(spec, Plan.from_json(text)) if text else spec
