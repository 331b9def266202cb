"""How a study searches: the sampler that proposes trials and the pruner that stops them early.

The patience pruner is the trainer's own patience rule (charlm/stopping.py) with the reference
taken from other trials at the same compute. Trials share a clock budget, so the compute axis is
training seconds (the clock the budget spends, evaluations included): every intermediate value is
reported at ``compute_step(elapsed)``, whole milliseconds, and every pruner compares trials there.
At equal optimizer steps a small fast model would be judged against a large slow one that had
used several times its seconds (docs/REPORT.md measures the spread of seconds per step).
"""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import optuna
from optuna.trial import TrialState

from charlm.space import grid_space
from charlm.stopping import Patience
from charlm.sweepfile import SweepSpec


def trial_seed(seed: int, number: int) -> int:
    """The seed of trial ``number``'s draws: a hash of the sweep's seed and the trial number."""
    digest = hashlib.sha256(f"charlm-sampler:{seed}:{number}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class PerTrialSeedSampler(optuna.samplers.BaseSampler):
    """A sampler whose random stream is reseeded for every trial from (seed, trial number).

    Trial numbers are unique within a study and handed out by its storage, so no two trials draw
    from the same stream: not two processes on two hosts started at once (both would otherwise be
    "worker 0" with the same seed), not a resumed study (which would otherwise replay the first
    call's stream). A study run from a fresh storage by one worker draws the same parameters for
    the same seed every time. TPE still learns from every finished trial; only its draws are seeded.
    """

    def __init__(self, seed: int, factory):
        self._seed, self._factory = seed, factory
        self._inner = factory(trial_seed(seed, -1))

    def before_trial(self, study, trial) -> None:
        self._inner = self._factory(trial_seed(self._seed, trial.number))
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


def make_sampler(spec: SweepSpec) -> optuna.samplers.BaseSampler:
    s = spec.sampler
    if s.type == "grid":  # no random stream: each worker takes a grid point no trial has taken
        return optuna.samplers.GridSampler(grid_space(spec), seed=s.seed)

    def factory(seed: int) -> optuna.samplers.BaseSampler:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # multivariate/group TPE are flagged experimental
            if s.type == "random":
                return optuna.samplers.RandomSampler(seed=seed)
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=s.n_startup_trials,
                                              multivariate=True, group=True, constant_liar=True)

    return PerTrialSeedSampler(s.seed, factory)


def compute_step(elapsed: float, last: int | None = None) -> int:
    """Where an evaluation sits on the compute axis: training milliseconds, strictly after ``last``."""
    ms = int(round(elapsed * 1000))
    return ms if last is None else max(ms, last + 1)


def reference_value(values: list[float], how: str, percentile: float, direction: str) -> float:
    if how == "median":
        return float(np.median(values))
    if how == "best":
        return min(values) if direction == "minimize" else max(values)
    q = percentile if direction == "minimize" else 100 - percentile
    return float(np.percentile(values, q))


class PatiencePruner(optuna.pruners.BasePruner):
    """The trainer's patience rule with the reference taken from other trials at the same compute.

    Each trial reports its best value so far at every evaluation, at its compute step (training
    milliseconds, :func:`compute_step`). At a step, the peers are the finished trials (and, if they
    got that far, pruned ones) that reported at or before it; their value there is their best so
    far. With at least ``min_trials`` peers, the trial's value is judged against ``reference`` of
    theirs with the trial's own ``patience`` and ``min_relative_improvement`` (user attributes set
    by the objective). ``reference: self`` judges the trial against itself, which is exactly the
    trainer's early stop.
    """

    def __init__(self, reference: str = "median", percentile: float = 50.0, min_trials: int = 3,
                 warmup_seconds: float = 0.0):
        self.reference = reference
        self.percentile = percentile
        self.min_trials = min_trials
        self.warmup_steps = compute_step(warmup_seconds)
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


def hyperband_resources(max_minutes: float) -> tuple[int, int | str]:
    """Hyperband's (min, max) resource on the compute axis. With a clock, every full trial reaches
    the clock's milliseconds; the first rung is 1/27 of it (four rungs at Optuna's factor 3).
    Without one, Optuna takes the top from the trials themselves ("auto": the last step reported
    by the first completed trials) and the first rung is one second."""
    if max_minutes > 0:
        top = compute_step(max_minutes * 60)
        return max(1, top // 27), top
    return 1000, "auto"


def make_pruner(spec: SweepSpec, max_minutes: float = 0.0) -> optuna.pruners.BasePruner:
    p = spec.pruner
    if p.type == "patience":
        return PatiencePruner(p.reference, p.percentile, p.min_trials, p.warmup_seconds)
    if p.type == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.min_trials, n_warmup_steps=compute_step(p.warmup_seconds))
    if p.type == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=hyperband_resources(max_minutes)[0])
    if p.type == "hyperband":
        low, top = hyperband_resources(max_minutes)
        return optuna.pruners.HyperbandPruner(min_resource=low, max_resource=top)
    return optuna.pruners.NopPruner()  # none, or asha: promotion is the workers' (charlm/promotion.py)
