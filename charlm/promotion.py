"""Promotion with continued training: asynchronous successive halving (ASHA) on the compute axis.

Rungs are training budgets in seconds: the trial's clock (``train.max_minutes``) is the top rung,
and each rung below is ``reduction_factor`` times shorter, the first no shorter than
``pruner.min_seconds``. At a rung's end a trial is
scored from a copy of itself whose learning rate decays to the floor (charlm/loop.py
``Loop.preview``; with ``train.schedule: wsd`` the stable phase makes that a fair preview of a
longer run). The trial goes on at once when that score ranks in the best 1/``reduction_factor``
of the trials that reached the rung so far. Otherwise it pauses: its training state goes to its
MLflow run's artifacts and its worker takes other work, so no worker waits for a rung to fill.
A paused trial is promoted later, by whichever worker asks next, once enough trials reached its
rung for it to rank in the top fraction; it continues from its saved state, in the same MLflow run
and the same Optuna trial. A trial that finishes the top rung is COMPLETE. Once no new trial will
start and none trains, each rung's top fraction rounds up (the best of a rung of two goes on), so
the study carries its best to the top; then the paused trials end PRUNED with their best value.
A worker that dies past a rung loses only the rung it was in: its trial pauses at its last saved
state and goes on elsewhere.

Brackets (``pruner.brackets``, asynchronous Hyperband): a first rung short enough to be cheap is
too short for a slow starter (a GPT trails the feed-forward nets at a first rung under a minute
and leads them at the clock; docs/REPORT.md section 8), and one ladder of rungs cannot hedge that. With B brackets, a
trial of bracket b trains straight to rung b and is ranked from there on, against the trials of
its own bracket only; the last bracket's trials run to the clock unjudged. Each bracket gets a
share of new trials that gives it about the same compute, and trial numbers walk those shares
in a golden-ratio sequence that starts in the last bracket, so the study's first trial reaches the
top budget unjudged: a study always has a finished model early, whatever its deadline.
"""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState

BRACKET = "charlm.bracket"  # the trial's bracket: its first judged rung
RUNG = "charlm.rung"  # the last rung the trial finished (0-based)
PAUSED = "charlm.paused"  # True while it waits for a promotion with no worker
STATE_ARTIFACT = "state/train_state.pt"  # where a paused trial's training state is kept, in its MLflow run


def rung_key(k: int) -> str:
    return f"charlm.rung_value.{k}"


def rung_budgets(min_seconds: float, reduction_factor: int, top_seconds: float) -> list[float]:
    """Training seconds at the end of each rung: the clock divided by the factor once per rung
    below it, down to no less than ``min_seconds`` (540 s by 3 from 20 s: 20, 60, 180, 540)."""
    budgets = [top_seconds]
    while budgets[0] / reduction_factor >= min_seconds * 0.999:
        budgets.insert(0, budgets[0] / reduction_factor)
    return budgets


def bracket_shares(budgets: list[float], reduction_factor: int, brackets: int) -> list[float]:
    """The share of new trials each bracket gets so that all spend about the same compute: bracket
    b's trial trains to rung b, then goes on to each next rung with chance 1/reduction_factor per
    rung climbed (rungs r, 3r and 9r cost 2.33r, 5r and 9r: shares 58%, 27%, 15%)."""
    costs = []
    for b in range(brackets):
        climbs = range(b + 1, len(budgets))
        costs.append(budgets[b] + sum((budgets[k] - budgets[k - 1]) / reduction_factor ** (k - b) for k in climbs))
    inverse = [1 / c for c in costs]
    return [w / sum(inverse) for w in inverse]


def bracket_of(number: int, shares: list[float]) -> int:
    """Trial ``number``'s bracket: the golden-ratio point ``frac(number * 0.618...)`` falls in the
    brackets' shares laid out from the last bracket down, so trial 0 runs unjudged to the clock and
    every run of consecutive trials meets each bracket in about its share."""
    u = (number * (5 ** 0.5 - 1) / 2) % 1.0
    for b in reversed(range(len(shares))):
        u -= shares[b]
        if u < 0:
            return b
    return 0


def promotable(trials: list[FrozenTrial], k: int, number: int, reduction_factor: int, closing: bool = False) -> bool:
    """Whether trial ``number`` ranks in the best 1/reduction_factor of the trials of its bracket
    that reached rung ``k`` (their value there: ``rung_key(k)``; studies minimize). ``closing``: no
    trial will reach the rung any more, so its top fraction rounds up (a rung of 2 still promotes
    its best)."""
    key = rung_key(k)
    bracket = next((t.system_attrs.get(BRACKET, 0) for t in trials if t.number == number), 0)
    ranked = sorted((t.system_attrs[key], t.number) for t in trials
                    if key in t.system_attrs and t.system_attrs.get(BRACKET, 0) == bracket)
    top = -(-len(ranked) // reduction_factor) if closing else len(ranked) // reduction_factor
    return number in [n for _, n in ranked[:top]]


def is_paused(t: FrozenTrial) -> bool:
    return t.state == TrialState.RUNNING and bool(t.system_attrs.get(PAUSED))


def next_promotion(study: optuna.Study, reduction_factor: int, closing: bool = False,
                   fits=lambda rung: True) -> FrozenTrial | None:
    """The paused trial to continue now (highest rung first, then best value), claimed for the
    caller; call under the study's lock so no two workers claim the same trial. ``closing``: no
    new trial will start and none is training, so the rungs are final (see :func:`promotable`).
    ``fits(k)``: whether the rung after rung k can still end before the study's deadline."""
    trials = study.get_trials(deepcopy=False)
    waiting = [t for t in trials if is_paused(t) and fits(t.system_attrs[RUNG])
               and promotable(trials, t.system_attrs[RUNG], t.number, reduction_factor, closing)]
    if not waiting:
        return None
    t = min(waiting, key=lambda t: (-t.system_attrs[RUNG], t.system_attrs[rung_key(t.system_attrs[RUNG])]))
    study._storage.set_trial_system_attr(t._trial_id, PAUSED, False)
    return t


def close_paused(study: optuna.Study) -> list[FrozenTrial]:
    """End every paused trial PRUNED (its value: its best report); the study has nothing left that
    could promote them. Returns them, for their MLflow runs to be told."""
    paused = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if is_paused(t)]
    for t in paused:
        study.tell(t.number, state=TrialState.PRUNED)
    return paused
