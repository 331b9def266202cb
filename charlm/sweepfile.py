"""Sweep YAML -> a validated :class:`SweepSpec` (sections: study, sampler, pruner, base, fixed,
space, best, baseline; ``sweeps/smoke.yaml`` is the shortest example, docs/reference/sweep-file.md lists
each). Every mistake is a :class:`SweepError` naming the file, the key and what was expected,
raised before any trial starts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from charlm import config, paths
from charlm.config import ConfigError, is_int, is_number
from charlm.promotion import rung_budgets
from charlm.space import Param, SweepError, check_corners, config_key, fail, parse_space, suggest, sweep_kinds, unknown

SAMPLERS = ("tpe", "random", "grid")
GRID_MAX = 100_000  # values of one key a grid lists; more is a typo, and would fill the memory
PRUNERS = ("patience", "median", "successive_halving", "hyperband", "asha", "none")
REFERENCES = ("median", "percentile", "best", "self")


@dataclass(frozen=True)
class StudySpec:
    name: str  # Optuna study name and MLflow experiment name
    metric: str = "val_loss"  # full-pass val loss of the restored best weights
    direction: str = "minimize"
    n_trials: int = 20  # total over every run of the sweep (resume continues to this)
    timeout_min: float = 0.0  # stop starting trials after this many minutes of one call (ASHA: in time to carry its best on); 0 = none
    storage: str = ""  # any Optuna storage URL; empty = journal file mlruns/optuna/<name>.journal
    heartbeat_timeout_s: float = 60.0  # a running trial whose heartbeat stops this long is failed and re-queued
    budget: str = ""  # a wall-clock budget for sweep + best (45m, 3h): planned by charlm/plan.py; "" = no plan
    enqueue_base: bool = True  # the base experiment's own values are the study's first trial
    cover: str = ""  # a choice key of the space (model.kind): the first draws take each of its values once


@dataclass(frozen=True)
class SamplerSpec:
    type: str = "tpe"  # tpe | random | grid
    seed: int = 0  # trial k draws from seed hash(seed, k): reproducible alone, distinct across workers and resumes
    n_startup_trials: int = 8  # tpe: random trials before the model takes over


@dataclass(frozen=True)
class PrunerSpec:
    type: str = "patience"  # patience | median | successive_halving | hyperband | asha | none
    reference: str = "median"  # patience: median | percentile | best | self (peers' value at a step)
    percentile: float = 50.0  # reference=percentile: which percentile of the peers
    min_trials: int = 3  # peers needed at a step before a trial can be judged there
    warmup_seconds: float = 0.0  # no pruning before this many training seconds (the compute axis)
    min_seconds: float = 0.0  # asha: the shortest rung may be no shorter (rungs: the clock / factor**k)
    reduction_factor: int = 3  # asha: each rung is this many times longer; its best 1/this go on
    brackets: int = 1  # asha: 1 = one ladder of rungs; B = asynchronous Hyperband, bracket b judged from rung b on


@dataclass(frozen=True)
class BestSpec:
    budget_multiplier: float = 3.0  # retrain with max_steps (and max_minutes) times this
    seeds: tuple[int, ...] = (0, 1, 2)  # one retrain per seed: mean and spread on test
    # config overrides for the retrain only, e.g. {data.val_fraction: 0.01, model.mix_order: 8}:
    # train on 89% of the text (val kept to 1% for stopping and the mixture weight) and mix
    set: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SweepSpec:
    path: str
    study: StudySpec
    sampler: SamplerSpec
    pruner: PrunerSpec
    base: str  # experiment YAML every trial starts from ("" = the defaults)
    fixed: dict = field(default_factory=dict)
    space: tuple[Param, ...] = ()
    best: BestSpec = field(default_factory=BestSpec)
    baseline: str = ""  # an experiment logged once beside the trials (e.g. the n-gram floor)
    enqueue: tuple[dict, ...] = ()  # configurations (space keys -> values) tried before any draw
    hand: frozenset = frozenset()  # the planned keys this file sets by hand (charlm/plan.py): they win
    plan: Any = None  # the study's Plan (charlm/plan.py) once made or read from the study
    text: str = ""  # --text: the user's own text for base, baseline, trials and retrain alike

    def _with_text(self, cfg: config.Config, where: str) -> config.Config:
        return config.override(cfg, {"data.path": self.text}, where=where) if self.text else cfg

    @functools.cached_property
    def _experiment(self) -> config.Config:
        """The base experiment as its file says (on --text's text), read once: corners, probes and
        trials all start from it."""
        return self._with_text(config.load(self.base) if self.base else config.Config(), "--text")

    def config_for(self, values: dict[str, Any], where: str) -> config.Config:
        """The base experiment with ``fixed`` and ``values`` applied together, so a model key in
        ``fixed`` reaches whichever kind ``values`` picks (a kind keeps only its own keys)."""
        cfg = config.override(self._experiment, {**self.fixed, **values}, where=where)
        return dataclasses.replace(cfg, experiment=self.study.name)

    def base_config(self) -> config.Config:
        return self.config_for({}, where=f"{self.path} (fixed)")

    def with_best_set(self, cfg: config.Config, note: str = "") -> config.Config:
        """``cfg`` as `best` retrains it: ``best.set`` on top (``note`` says which config, in errors)."""
        return config.override(cfg, self.best.set, where=f"{self.path} (best.set{note})")

    def retrain_base(self) -> config.Config:
        """The base experiment as `best` would retrain it: what the plan prices a retrain seed by."""
        return self.with_best_set(self.base_config())

    def baseline_config(self) -> config.Config:
        cfg = self._with_text(config.load(self.baseline), "--text")
        return config.override(cfg, {"experiment": self.study.name}, where=self.baseline)

    def trial_config(self, values: dict[str, Any], number: int) -> config.Config:
        cfg = self.config_for(values, where=f"{self.path} (trial {number})")
        return dataclasses.replace(cfg, name=f"trial-{number:03d}")

    def replay(self, trial) -> config.Config:
        """A finished trial's config; replaying its params restores values fixed under a `when`."""
        import optuna

        return self.trial_config(suggest(optuna.trial.FixedTrial(trial.params, trial.number), self), trial.number)


_SECTIONS = {"study": StudySpec, "sampler": SamplerSpec, "pruner": PrunerSpec, "best": BestSpec}
_TOP = ("study", "sampler", "pruner", "base", "fixed", "space", "best", "baseline", "enqueue")
PLANNED = ("study.n_trials", "study.timeout_min", "sampler.n_startup_trials", "pruner.min_seconds",
           "pruner.brackets", "best.seeds", "best.budget_multiplier")  # and fixed train.max_minutes
_CHOICES = {"study.direction": ("minimize", "maximize"), "study.metric": ("val_loss",),
            "sampler.type": SAMPLERS, "pruner.type": PRUNERS, "pruner.reference": REFERENCES}


def _section(path: str, name: str, raw: Any, cls, required: tuple[str, ...] = (), kinds: tuple[str, ...] = ()):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise fail(path, name, "a mapping", raw)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in fields:
            raise unknown(path, f"{name}.{k}", [f"{name}.{f}" for f in fields])
    for k in required:
        if k not in raw:
            raise fail(path, f"{name}.{k}", "given")
    out = {}
    for k, v in raw.items():
        typ = fields[k].type
        key = f"{name}.{k}"
        if typ == "bool":
            if not isinstance(v, bool):
                raise fail(path, key, "true or false", v)
        elif typ in ("int",):
            if not is_int(v):
                raise fail(path, key, "an integer", v)
        elif typ in ("float",):
            if not is_number(v):
                raise fail(path, key, "a number", v)
            v = float(v)
        elif typ in ("str",):
            if v is None:
                v = ""
            if not isinstance(v, str):
                raise fail(path, key, "a string", v)
        elif typ == "dict":
            if not isinstance(v, dict):
                raise fail(path, key, "a mapping of config keys to values", v)
            for ck in v:
                config_key(path, ck, key, kinds or config.BUILTIN_KINDS)
            v = dict(v)
        elif typ.startswith("tuple"):
            if not isinstance(v, list) or not v or not all(is_int(x) for x in v):
                raise fail(path, key, "a non-empty list of integers", v)
            v = tuple(v)
        if key in _CHOICES and v not in _CHOICES[key]:
            raise fail(path, key, "one of " + " | ".join(_CHOICES[key]), v)
        out[k] = v
    return cls(**out)


def load_sweep(path: str | Path, n_trials: int | None = None, storage: str | None = None,
               budget: str | None = None, text: str | None = None, seed: int | None = None) -> SweepSpec:
    """``budget``, ``text``, ``seed``: the CLI's --budget, --text and --seed, over the file's values."""
    path = str(path)
    try:
        doc = config.read_yaml(path)
    except ConfigError as e:
        raise SweepError(str(e).replace("Config file", "Sweep file").replace(
            "e.g. experiments/gpt.yaml", "e.g. sweeps/smoke.yaml").replace(
            "expected sections such as 'model:' and 'train:'", "expected sections such as 'study:' and 'space:'")) from None
    if not isinstance(doc, dict):
        raise SweepError(f"Sweep file {path} must be a mapping with sections {', '.join(_TOP)}")
    for k in doc:
        if k not in _TOP:
            raise unknown(path, str(k), list(_TOP))
    study = _study(path, doc, n_trials, storage)
    if budget is not None:
        study = dataclasses.replace(study, budget=budget)
    if study.budget:
        from charlm.plan import parse_duration

        parse_duration(study.budget, "--budget" if budget is not None else f"study.budget in {path}")
    text_path = _text_path(text) if text else ""
    if text_path:  # one study per text: its own test split, its own MLflow experiment and registered model
        study = dataclasses.replace(study, name=f"{study.name}-{_slug(Path(text_path).stem)}")
    sampler = _section(path, "sampler", doc.get("sampler"), SamplerSpec)
    if seed is not None:
        sampler = dataclasses.replace(sampler, seed=seed)
    pruner = _section(path, "pruner", doc.get("pruner"), PrunerSpec)
    if not 0 <= pruner.percentile <= 100:
        raise fail(path, "pruner.percentile", "a number in [0, 100]", pruner.percentile)
    if pruner.min_trials < 1:
        raise fail(path, "pruner.min_trials", "an integer >= 1", pruner.min_trials)
    if not 0 <= pruner.warmup_seconds < math.inf:
        raise fail(path, "pruner.warmup_seconds", "a number of seconds >= 0", pruner.warmup_seconds)
    base = _experiment_path(path, "base", doc.get("base"))
    try:
        kinds = sweep_kinds(path, doc, config.load(base) if base else config.Config())
    except ConfigError as e:
        raise SweepError(str(e)) from None
    best = _section(path, "best", doc.get("best"), BestSpec, kinds=kinds)
    if best.budget_multiplier <= 0:
        raise fail(path, "best.budget_multiplier", "a number > 0", best.budget_multiplier)
    baseline = _experiment_path(path, "baseline", doc.get("baseline"))
    if baseline:
        try:
            config.load(baseline)
        except ConfigError as e:
            raise SweepError(str(e)) from None
    fixed = doc.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise fail(path, "fixed", "a mapping of config keys to values", fixed)
    for k in fixed:
        config_key(path, k, "fixed", kinds)
    space = parse_space(path, doc.get("space"), fixed, kinds)
    if sampler.type == "grid":
        _grid_ready(path, space)
    _cover_ready(path, study.cover, space)
    hand = {f"{name}.{k}" for name in _SECTIONS for k in (doc.get(name) or {})} & set(PLANNED)
    hand |= {"train.max_minutes"} & set(fixed)
    if n_trials is not None:
        hand.add("study.n_trials")
    spec = SweepSpec(path=path, study=study, sampler=sampler, pruner=pruner, base=base,
                     fixed=dict(fixed), space=space, best=best, baseline=baseline,
                     hand=frozenset(hand), text=text_path)
    spec = dataclasses.replace(spec, enqueue=_enqueue(spec, doc.get("enqueue")))
    _split_stays(spec)
    if not study.budget:  # planned: the plan sets the clock and the rungs (charlm/plan.py)
        _rungs_fit(spec)
    check_corners(spec)
    return spec


def _cover_ready(path: str, key: str, space: tuple[Param, ...]) -> None:
    """``study.cover`` names a choice the space always draws (no ``when``), or nothing."""
    if not key:
        return
    choices = [p.key for p in space if p.kind == "choice" and p.when is None]
    if key not in choices:
        raise fail(path, "study.cover", f"a choice key of the space outside any 'when' ({', '.join(choices) or 'none'})",
                   key)


def _text_path(text: str) -> str:
    from charlm.data import text_file

    return str(text_file(text, "--text / TEXT=", "to model").resolve())


def _slug(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.") or "text"


def _enqueue(spec: SweepSpec, raw: Any) -> tuple[dict, ...]:
    """``enqueue:`` a list of configurations, each a mapping of space keys to values, tried first."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(x, dict) for x in raw):
        raise fail(spec.path, "enqueue", "a list of mappings of space keys to values", raw)
    keys = {p.key for p in spec.space}
    out = []
    for i, values in enumerate(raw):
        for k in values:
            if k not in keys:
                raise unknown(spec.path, f"enqueue[{i}].{k}", sorted(keys))
        try:
            spec.config_for(values, where=f"{spec.path} (enqueue[{i}])")
        except ConfigError as e:
            raise SweepError(str(e)) from None
        out.append(dict(values))
    return tuple(out)


def _rungs_fit(spec: SweepSpec) -> None:
    """ASHA's rungs are seconds of the trial's clock: a clock, and a first rung shorter than it."""
    p, path = spec.pruner, spec.path
    if p.type != "asha":
        return
    if p.reduction_factor < 2:
        raise fail(path, "pruner.reduction_factor", "an integer >= 2", p.reduction_factor)
    if any(q.key == "train.max_minutes" for q in spec.space):
        raise fail(path, "space.train.max_minutes", "left out of the space: asha's top rung is the clock, the same "
                   "for every trial", "a range")
    top = spec.base_config().train.max_minutes * 60
    if not 0 < p.min_seconds < top:
        raise fail(path, "pruner.min_seconds", f"a number of seconds > 0 and below the trials' clock ({top:g} s, "
                   "train.max_minutes in fixed or the base experiment)", p.min_seconds)
    rungs = len(rung_budgets(p.min_seconds, p.reduction_factor, top))
    if not 1 <= p.brackets <= rungs:
        raise fail(path, "pruner.brackets", f"an integer from 1 to the number of rungs ({rungs} here: the clock "
                   f"{top:g} s divided by {p.reduction_factor} down to min_seconds {p.min_seconds:g})", p.brackets)


SPLIT_KEYS = ("data.path", "data.test_fraction")  # what decides the test split


def _split_stays(spec: SweepSpec) -> None:
    """The base experiment's data section fixes the test split: trials, the retrain and the
    baseline are all tested on it, or their figures could not be compared. The val split is the
    sweep's objective, so trials share it too (``fixed`` and ``best.set`` may change its size)."""
    path = spec.path
    try:
        data = (config.load(spec.base) if spec.base else config.Config()).data
    except ConfigError as e:
        raise SweepError(str(e)) from None
    if spec.text:  # --text moves every split alike: base, baseline, trials and retrain read one text
        data = dataclasses.replace(data, path=spec.text)
    for p in spec.space:
        if p.key in SPLIT_KEYS:
            raise SweepError(f"'{p.key}' in {path} (space) would move the test split between trials; the base "
                             "experiment's data section fixes it: remove it from the space")
        if p.key == "data.val_fraction":
            raise SweepError(f"'data.val_fraction' in {path} (space) would score each trial on another val "
                             "split, so their values could not be compared: set it in fixed instead")
    for where, values in (("fixed", spec.fixed), ("best.set", spec.best.set)):
        for key in SPLIT_KEYS:
            base_value = getattr(data, key.split(".")[1])
            if key in values and values[key] != base_value:
                raise SweepError(f"'{key}' in {path} ({where}) would move the test split ({key}: "
                                 f"{base_value!r} in the base experiment); change it there, or remove it here")
    if spec.baseline and not spec.text:
        other = config.load(spec.baseline).data
        for key in SPLIT_KEYS:
            name = key.split(".")[1]
            if getattr(other, name) != getattr(data, name):
                raise SweepError(f"Baseline experiment {spec.baseline} named in {path} is tested on another split "
                                 f"({key}: {getattr(other, name)!r}, the base experiment {getattr(data, name)!r}); "
                                 "give it the base experiment's value")


def _study(path: str, doc: dict, n_trials: int | None, storage: str | None) -> StudySpec:
    if "study" not in doc:
        raise fail(path, "study", "given (at least study.name)")
    study = _section(path, "study", doc.get("study"), StudySpec, required=("name",))
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", study.name):
        raise fail(path, "study.name", "letters, digits, '_', '.', '-'", study.name)
    if n_trials is not None:
        study = dataclasses.replace(study, n_trials=n_trials)
    if paths.has_password(study.storage):
        raise SweepError(f"study.storage in {path} holds a password; sweep files are shared and committed. "
                         "Put it in PGPASSWORD or a .pgpass file (PGPASSFILE) and write postgresql://user@host/db")
    if storage:
        if paths.has_password(storage):
            raise SweepError("--storage holds a password, which the process list and shell history would show; "
                             "put it in PGPASSWORD or a .pgpass file (PGPASSFILE) and pass postgresql://user@host/db")
        study = dataclasses.replace(study, storage=storage)
    if study.direction != "minimize":  # every metric there is is a loss
        raise fail(path, "study.direction", f"minimize for study.metric {study.metric} (a loss: lower is better)",
                   study.direction)
    if study.n_trials < 1:
        raise fail(path, "study.n_trials", "an integer >= 1", study.n_trials)
    if study.timeout_min < 0:
        raise fail(path, "study.timeout_min", "a number >= 0", study.timeout_min)
    if study.heartbeat_timeout_s <= 0:
        raise fail(path, "study.heartbeat_timeout_s", "a number > 0", study.heartbeat_timeout_s)
    return study


def _grid_ready(path: str, space: tuple[Param, ...]) -> None:
    if any(p.when for p in space):
        raise fail(path, "sampler.type", "tpe or random for a space with 'when' conditions (grid needs a flat space)",
                   "grid")
    for p in space:
        if p.kind == "float" and not p.step:
            raise fail(path, f"space.{p.key}", "a choice or a stepped range for grid search", p.describe())
        if p.count() > GRID_MAX:
            raise fail(path, f"space.{p.key}", f"at most {GRID_MAX:,} values for grid search (or sampler tpe/random)",
                       p.describe())


def _experiment_path(path: str, key: str, value: Any) -> str:
    """An experiment named in a sweep: as written (from the cwd), else beside the sweep file, else
    from the folder above it, so sweeps/x.yaml naming experiments/y.yaml works from anywhere."""
    if not value:
        return ""
    if not isinstance(value, str):
        raise fail(path, key, "a path to an experiment YAML", value)
    here = Path(path).resolve().parent
    found = next((c for c in (Path(value), here / value, here.parent / value) if c.is_file()), None)
    if found is None:
        raise SweepError(f"{key.capitalize()} experiment '{value}' named in {path} not found (give a path from "
                         f"the repository root, e.g. experiments/gpt.yaml)")
    return str(found)
