"""Sweep YAML -> a validated :class:`SweepSpec`: the search space as data, not code.

```yaml
study:   {name: smoke, metric: val_loss, direction: minimize, n_trials: 8, timeout_min: 0, storage: null}
sampler: {type: tpe, seed: 0, n_startup_trials: 4}
pruner:  {type: patience, reference: median, min_trials: 2}
base: experiments/gpt.yaml          # the experiment every trial starts from
fixed: {train.max_steps: 200}       # overrides applied to every trial
space:
  model.kind: {choice: [ff, gpt]}
  train.lr: {float: [1.0e-4, 3.0e-3], log: true}
  when:
    "model.kind == gpt": {model.n_layer: {int: [1, 4]}}
    "model.kind == ff": {model.n_embd: 16}   # a plain value: fixed when the condition holds
best: {budget_multiplier: 3, seeds: [0, 1, 2]}
baseline: experiments/ngram.yaml    # logged once beside the trials: the floor to beat
```

Every mistake is a :class:`SweepError` naming the file, the key and what was expected, raised
before any trial starts.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from charlm import config, paths
from charlm.config import ConfigError
from charlm.errors import CharlmError
from charlm.validate import hint, is_int, is_number

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("patience", "median", "successive_halving", "hyperband", "none")
REFERENCES = ("median", "percentile", "best", "self")


class SweepError(CharlmError):
    """A sweep file that cannot be run as written."""


@dataclass(frozen=True)
class StudySpec:
    name: str  # Optuna study name and MLflow experiment name
    metric: str = "val_loss"  # full-pass val loss of the restored best weights
    direction: str = "minimize"
    n_trials: int = 20  # total over every run of the sweep (resume continues to this)
    timeout_min: float = 0.0  # stop starting trials after this many minutes of one call; 0 = none
    storage: str = ""  # any Optuna storage URL; empty = journal file mlruns/optuna/<name>.journal
    heartbeat_timeout_s: float = 60.0  # a running trial whose heartbeat stops this long is failed and re-queued


@dataclass(frozen=True)
class SamplerSpec:
    type: str = "tpe"  # tpe | random | grid
    seed: int = 0  # trial k draws from seed hash(seed, k): reproducible alone, distinct across workers and resumes
    n_startup_trials: int = 8  # tpe: random trials before the model takes over


@dataclass(frozen=True)
class PrunerSpec:
    type: str = "patience"  # patience | median | successive_halving | hyperband | none
    reference: str = "median"  # patience: median | percentile | best | self (peers' value at a step)
    percentile: float = 50.0  # reference=percentile: which percentile of the peers
    min_trials: int = 3  # peers needed at a step before a trial can be judged there
    warmup_steps: int = 0  # no pruning before this step


@dataclass(frozen=True)
class BestSpec:
    budget_multiplier: float = 3.0  # retrain with max_steps (and max_minutes) times this
    seeds: tuple[int, ...] = (0, 1, 2)  # one retrain per seed: mean and spread on test
    # config overrides for the retrain only, e.g. {data.val_fraction: 0.01, model.mix_order: 8}:
    # train on 89% of the text (val kept to 1% for stopping and the mixture weight) and mix
    set: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Param:
    key: str  # a config key, e.g. train.lr
    kind: str  # choice | int | float | fixed (a plain value under a `when`: not searched)
    choices: tuple = ()
    low: float = 0
    high: float = 0
    log: bool = False
    step: float | None = None
    when: tuple[str, tuple] | None = None  # (key, allowed values) of the condition, if any

    def describe(self) -> str:
        if self.kind == "fixed":
            text = f"fixed {self.choices[0]}"
        elif self.kind == "choice":
            text = "choice " + ", ".join(map(str, self.choices))
        else:
            text = f"{self.kind} [{self.low}, {self.high}]" + (" log" if self.log else "") + (
                f" step {self.step}" if self.step else "")
        if self.when:
            text += f"   (when {self.when[0]} in {list(self.when[1])})"
        return text

    def values(self) -> list:
        """Every value (choices, or an int/stepped range); used by grid search and checks."""
        if self.kind in ("choice", "fixed"):
            return list(self.choices)
        if self.kind == "int":
            step = int(self.step or 1)
            return list(range(int(self.low), int(self.high) + 1, step))
        if self.step:
            n = int(round((self.high - self.low) / self.step))
            return [self.low + i * self.step for i in range(n + 1)]
        raise SweepError(f"'{self.key}' is a continuous range; it has no finite list of values")


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

    def base_config(self) -> config.Config:
        cfg = config.load(self.base) if self.base else config.Config()
        cfg = config.override(cfg, self.fixed, where=f"{self.path} (fixed)")
        return dataclasses.replace(cfg, experiment=self.study.name)

    def trial_config(self, values: dict[str, Any], number: int) -> config.Config:
        cfg = config.override(self.base_config(), values, where=f"{self.path} (trial {number})")
        return dataclasses.replace(cfg, name=f"trial-{number:03d}")

    def replay(self, trial) -> config.Config:
        """A finished trial's config; replaying its params restores values fixed under a `when`."""
        import optuna

        return self.trial_config(suggest(optuna.trial.FixedTrial(trial.params, trial.number), self), trial.number)


_SECTIONS = {"study": StudySpec, "sampler": SamplerSpec, "pruner": PrunerSpec, "best": BestSpec}
_TOP = ("study", "sampler", "pruner", "base", "fixed", "space", "best", "baseline")
_CHOICES = {"study.direction": ("minimize", "maximize"), "study.metric": ("val_loss",),
            "sampler.type": SAMPLERS, "pruner.type": PRUNERS, "pruner.reference": REFERENCES}
_COND = re.compile(r"^\s*([\w.]+)\s*(==|in)\s*(.+?)\s*$")


def _fail(path: str, key: str, expected: str, got: Any = dataclasses.MISSING) -> SweepError:
    tail = "" if got is dataclasses.MISSING else f", got {got!r}"
    return SweepError(f"Sweep key '{key}' in {path} must be {expected}{tail}")


def _unknown(path: str, key: str, known: list[str]) -> SweepError:
    return SweepError(f"Unknown sweep key '{key}' in {path}{hint(key, known, 'expected one of')}")


def _config_key(path: str, key: Any, where: str) -> None:
    """A config key named in a sweep file (in ``fixed``, ``best.set`` or the space) must exist."""
    if key not in config.all_keys() or "." not in str(key):
        raise config.unknown_key(str(key), f"{path} ({where})", SweepError)


def _section(path: str, name: str, raw: Any, cls, required: tuple[str, ...] = ()):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise _fail(path, name, "a mapping", raw)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in fields:
            raise _unknown(path, f"{name}.{k}", [f"{name}.{f}" for f in fields])
    for k in required:
        if k not in raw:
            raise _fail(path, f"{name}.{k}", "given")
    out = {}
    for k, v in raw.items():
        typ = fields[k].type
        key = f"{name}.{k}"
        if typ in ("int",):
            if not is_int(v):
                raise _fail(path, key, "an integer", v)
        elif typ in ("float",):
            if not is_number(v):
                raise _fail(path, key, "a number", v)
            v = float(v)
        elif typ in ("str",):
            if v is None:
                v = ""
            if not isinstance(v, str):
                raise _fail(path, key, "a string", v)
        elif typ == "dict":
            if not isinstance(v, dict):
                raise _fail(path, key, "a mapping of config keys to values", v)
            for ck in v:
                _config_key(path, ck, key)
            v = dict(v)
        elif typ.startswith("tuple"):
            if not isinstance(v, list) or not v or not all(is_int(x) for x in v):
                raise _fail(path, key, "a non-empty list of integers", v)
            v = tuple(v)
        if key in _CHOICES and v not in _CHOICES[key]:
            raise _fail(path, key, "one of " + " | ".join(_CHOICES[key]), v)
        out[k] = v
    return cls(**out)


def _param(path: str, key: str, raw: Any, when=None) -> Param:
    where = f"space.{key}"
    _config_key(path, key, "space")
    if not isinstance(raw, dict):
        raise _fail(path, where, "a mapping like {choice: [...]}, {int: [low, high]} or {float: [low, high]}", raw)
    kinds = [k for k in ("choice", "int", "float") if k in raw]
    extra = set(raw) - {"choice", "int", "float", "log", "step"}
    if extra:
        raise _unknown(path, f"{where}.{sorted(extra)[0]}", [f"{where}.{k}" for k in ("choice", "int", "float", "log", "step")])
    if len(kinds) != 1:
        raise _fail(path, where, "exactly one of choice, int or float", raw)
    kind = kinds[0]
    if kind == "choice":
        choices = raw["choice"]
        if not isinstance(choices, list) or not choices:
            raise _fail(path, f"{where}.choice", "a non-empty list", choices)
        if len(set(map(repr, choices))) != len(choices):
            raise _fail(path, f"{where}.choice", "a list without duplicates", choices)
        if "log" in raw or "step" in raw:
            raise _fail(path, where, "a choice without log/step", raw)
        return Param(key, "choice", choices=tuple(choices), when=when)
    bounds = raw[kind]
    num = (int,) if kind == "int" else (int, float)
    if (not isinstance(bounds, list) or len(bounds) != 2
            or not all(isinstance(b, num) and not isinstance(b, bool) for b in bounds)):
        raise _fail(path, f"{where}.{kind}", f"[low, high] of {'integers' if kind == 'int' else 'numbers'}", bounds)
    low, high = bounds
    if low > high:
        raise _fail(path, f"{where}.{kind}", "[low, high] with low <= high", bounds)
    log = raw.get("log", False)
    if not isinstance(log, bool):
        raise _fail(path, f"{where}.log", "true or false", log)
    if log and low <= 0:
        raise _fail(path, f"{where}.{kind}", "positive bounds when log: true", bounds)
    step = raw.get("step")
    if step is not None:
        if not isinstance(step, num) or isinstance(step, bool) or step <= 0:
            raise _fail(path, f"{where}.step", "a positive number", step)
        if log:
            raise _fail(path, where, "either log or step, not both", raw)
    return Param(key, kind, low=low, high=high, log=log, step=step, when=when)


def _condition(path: str, text: str, params: dict[str, Param]) -> tuple[str, tuple]:
    m = _COND.match(str(text))
    if not m:
        raise _fail(path, f"space.when.{text}", "a condition like \"model.kind == gpt\" or \"model.kind in [gpt, ff]\"")
    key, op, raw = m.groups()
    if key not in params or params[key].when is not None:
        raise SweepError(
            f"Condition '{text}' in {path} is on '{key}', which is not an unconditional parameter of "
            f"the space; expected one of {', '.join(k for k, p in params.items() if p.when is None) or '(none)'}"
        )
    import yaml

    value = yaml.safe_load(raw)
    values = tuple(value) if op == "in" and isinstance(value, list) else (value,)
    allowed = params[key].values() if params[key].kind != "float" or params[key].step else None
    if allowed is not None:
        for v in values:
            if v not in allowed:
                raise SweepError(f"Condition '{text}' in {path} tests {key} for {v!r}, which the space never "
                                 f"proposes; expected one of {allowed}")
    return key, values


def load_sweep(path: str | Path, n_trials: int | None = None, storage: str | None = None) -> SweepSpec:
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
            raise _unknown(path, str(k), list(_TOP))
    if "study" not in doc:
        raise _fail(path, "study", "given (at least study.name)")
    study = _section(path, "study", doc.get("study"), StudySpec, required=("name",))
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", study.name):
        raise _fail(path, "study.name", "letters, digits, '_', '.', '-'", study.name)
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
    if study.n_trials < 1:
        raise _fail(path, "study.n_trials", "an integer >= 1", study.n_trials)
    if study.timeout_min < 0:
        raise _fail(path, "study.timeout_min", "a number >= 0", study.timeout_min)
    if study.heartbeat_timeout_s <= 0:
        raise _fail(path, "study.heartbeat_timeout_s", "a number > 0", study.heartbeat_timeout_s)
    sampler = _section(path, "sampler", doc.get("sampler"), SamplerSpec)
    pruner = _section(path, "pruner", doc.get("pruner"), PrunerSpec)
    if not 0 <= pruner.percentile <= 100:
        raise _fail(path, "pruner.percentile", "a number in [0, 100]", pruner.percentile)
    if pruner.min_trials < 1:
        raise _fail(path, "pruner.min_trials", "an integer >= 1", pruner.min_trials)
    best = _section(path, "best", doc.get("best"), BestSpec)
    if best.budget_multiplier <= 0:
        raise _fail(path, "best.budget_multiplier", "a number > 0", best.budget_multiplier)

    base = _experiment_path(path, "base", doc.get("base"))
    baseline = _experiment_path(path, "baseline", doc.get("baseline"))
    if baseline:
        try:
            config.load(baseline)
        except ConfigError as e:
            raise SweepError(str(e)) from None

    fixed = doc.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise _fail(path, "fixed", "a mapping of config keys to values", fixed)
    for k in fixed:
        _config_key(path, k, "fixed")

    raw_space = doc.get("space")
    if not isinstance(raw_space, dict) or not raw_space:
        raise _fail(path, "space", "a non-empty mapping of config keys to parameter specs", raw_space)
    params: dict[str, Param] = {}
    for k, v in raw_space.items():
        if k == "when":
            continue
        if k in fixed:
            raise SweepError(f"'{k}' in {path} is both fixed and searched; keep it in one place")
        params[k] = _param(path, str(k), v)
    when = raw_space.get("when") or {}
    if not isinstance(when, dict):
        raise _fail(path, "space.when", "a mapping of conditions to parameter specs", when)
    conditional: list[Param] = []
    for cond, sub in when.items():
        ckey, cvals = _condition(path, cond, params)
        if not isinstance(sub, dict) or not sub:
            raise _fail(path, f"space.when.{cond}", "a non-empty mapping of config keys to parameter specs", sub)
        for k, v in sub.items():
            if isinstance(v, dict):
                p = _param(path, str(k), v, when=(ckey, cvals))
            else:  # a plain value: fixed for the trials that meet the condition
                _param(path, str(k), {"choice": [v]})  # same key checks as a searched parameter
                p = Param(str(k), "fixed", choices=(v,), when=(ckey, cvals))
            if k in params:
                raise SweepError(f"'{k}' in {path} is searched both unconditionally and under '{cond}'; "
                                 "keep it in one place")
            if k in fixed and p.kind != "fixed":  # a plain value under a condition may override `fixed`
                raise SweepError(f"'{k}' in {path} is both fixed and searched under '{cond}'; keep it in one place")
            for q in conditional:
                if q.key == k and q.when == p.when:
                    raise SweepError(f"'{k}' appears twice under '{cond}' in {path}")
                if (q.key == k and "fixed" not in (q.kind, p.kind)
                        and dataclasses.replace(q, when=None) != dataclasses.replace(p, when=None)):
                    raise SweepError(f"'{k}' in {path} has different ranges under different conditions; "
                                     "Optuna needs one distribution per parameter name")
            conditional.append(p)
    space = tuple(params.values()) + tuple(conditional)
    if sampler.type == "grid":
        if conditional:
            raise _fail(path, "sampler.type", "tpe or random for a space with 'when' conditions (grid needs a flat space)", "grid")
        for p in space:
            if p.kind == "float" and not p.step:
                raise _fail(path, f"space.{p.key}", "a choice or a stepped range for grid search", p.describe())
    spec = SweepSpec(path=path, study=study, sampler=sampler, pruner=pruner, base=base,
                     fixed=dict(fixed), space=space, best=best, baseline=baseline)
    _check_configs(spec)
    return spec


def _experiment_path(path: str, key: str, value: Any) -> str:
    """An experiment named in a sweep: as written (from the cwd), else beside the sweep file, else
    from the folder above it, so sweeps/x.yaml naming experiments/y.yaml works from anywhere."""
    if not value:
        return ""
    if not isinstance(value, str):
        raise _fail(path, key, "a path to an experiment YAML", value)
    here = Path(path).resolve().parent
    found = next((c for c in (Path(value), here / value, here.parent / value) if c.is_file()), None)
    if found is None:
        raise SweepError(f"{key.capitalize()} experiment '{value}' named in {path} not found (give a path from "
                         f"the repository root, e.g. experiments/gpt.yaml)")
    return str(found)


def _check_configs(spec: SweepSpec) -> None:
    """Build the config at the corners of every branch, so range errors (context 0, heads that
    do not divide the width) surface now, naming the sweep file, not in trial 17."""
    try:
        base = spec.base_config()
        config.override(base, spec.best.set, where=f"{spec.path} (best.set)")
    except ConfigError as e:
        raise SweepError(str(e)) from None
    branches: list[tuple[str, tuple] | None] = [None] + sorted(
        {p.when for p in spec.space if p.when}, key=repr)
    for branch in branches:
        active = [p for p in spec.space if p.when is None or p.when == branch]
        for p in active:
            if p.kind == "float" and not p.step:
                corner_values = [p.low, p.high]
            else:
                vals = p.values()
                corner_values = vals if len(vals) <= 64 else [vals[0], vals[-1]]
            for v in corner_values:
                values = {q.key: _low(q) for q in active}
                if branch:
                    values[branch[0]] = branch[1][0]
                values[p.key] = v
                _try(spec, base, values, p.key)
        # every (n_head, n_embd) pair the branch can propose must divide
        heads = _candidates(active, base, "model.n_head")
        widths = _candidates(active, base, "model.n_embd")
        kind = _candidates(active, base, "model.kind") if not branch or branch[0] != "model.kind" else list(branch[1])
        if "gpt" in kind:
            for h, w in itertools.product(heads, widths):
                if w % h:
                    where = f" (when {branch[0]} in {list(branch[1])})" if branch else ""
                    raise SweepError(
                        f"Sweep space in {spec.path} can propose model.n_head={h} with model.n_embd={w}{where}; "
                        "expected heads that divide every width"
                    )


def _low(p: Param):
    return p.choices[0] if p.kind in ("choice", "fixed") else p.low


def _candidates(active: list[Param], base: config.Config, key: str) -> list:
    for p in active:
        if p.key == key:
            try:
                return p.values()
            except SweepError:
                return [p.low, p.high]
    return [config.flatten(base)[key]]


def _try(spec: SweepSpec, base: config.Config, values: dict, key: str) -> None:
    try:
        config.override(base, values, where=f"{spec.path} (space.{key})")
    except ConfigError as e:
        raise SweepError(str(e)) from None


def suggest(trial, spec: SweepSpec) -> dict[str, Any]:
    """Ask ``trial`` for every active parameter; conditions follow the values already drawn."""
    values: dict[str, Any] = {}
    for p in spec.space:
        if p.when is not None and values.get(p.when[0]) not in p.when[1]:
            continue
        if p.kind == "fixed":
            values[p.key] = p.choices[0]
        elif p.kind == "choice":
            values[p.key] = trial.suggest_categorical(p.key, list(p.choices))
        elif p.kind == "int":
            values[p.key] = trial.suggest_int(p.key, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            values[p.key] = trial.suggest_float(p.key, float(p.low), float(p.high), step=p.step, log=p.log)
    return values


def grid_space(spec: SweepSpec) -> dict[str, list]:
    return {p.key: p.values() for p in spec.space if p.kind != "fixed"}


def space_size(spec: SweepSpec) -> float:
    """Number of distinct points (inf when any range is continuous)."""
    n = 1.0
    for p in spec.space:
        try:
            n *= len(p.values())
        except SweepError:
            return math.inf
    return n
