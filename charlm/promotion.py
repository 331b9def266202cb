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
"""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, TrialState

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


def promotable(trials: list[FrozenTrial], k: int, number: int, reduction_factor: int, closing: bool = False) -> bool:
    """Whether trial ``number`` ranks in the best 1/reduction_factor of the trials that reached rung
    ``k`` (their value there: ``rung_key(k)``; studies minimize). ``closing``: no trial will reach
    the rung any more, so its top fraction rounds up (a rung of 2 still promotes its best)."""
    key = rung_key(k)
    ranked = sorted((t.system_attrs[key], t.number) for t in trials if key in t.system_attrs)
    top = -(-len(ranked) // reduction_factor) if closing else len(ranked) // reduction_factor
    return number in [n for _, n in ranked[:top]]


def is_paused(t: FrozenTrial) -> bool:
    return t.state == TrialState.RUNNING and bool(t.system_attrs.get(PAUSED))


def next_promotion(study: optuna.Study, reduction_factor: int, closing: bool = False) -> FrozenTrial | None:
    """The paused trial to continue now (highest rung first, then best value), claimed for the
    caller; call under the study's lock so no two workers claim the same trial. ``closing``: no
    new trial will start and none is training, so the rungs are final (see :func:`promotable`)."""
    trials = study.get_trials(deepcopy=False)
    waiting = [t for t in trials if is_paused(t)
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
