"""The search space as data: parameters parsed from a sweep file's ``space:`` (with ``when``
conditions), checked at their corners before any trial, and asked of an Optuna trial.

Every mistake is a :class:`SweepError` naming the file, the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from charlm import config
from charlm.config import ConfigError, hint
from charlm.errors import CharlmError

if TYPE_CHECKING:
    from charlm.sweepfile import SweepSpec

_COND = re.compile(r"^\s*([\w.]+)\s*(==|in)\s*(.+?)\s*$")


class SweepError(CharlmError):
    """A sweep file that cannot be run as written."""


def fail(path: str, key: str, expected: str, got: Any = dataclasses.MISSING) -> SweepError:
    tail = "" if got is dataclasses.MISSING else f", got {got!r}"
    return SweepError(f"Sweep key '{key}' in {path} must be {expected}{tail}")


def unknown(path: str, key: str, known: list[str]) -> SweepError:
    return SweepError(f"Unknown sweep key '{key}' in {path}{hint(key, known, 'expected one of')}")


def sweep_kinds(path: str, doc: dict, base: config.Config) -> tuple[str, ...]:
    """The model kinds a sweep file can train (the base's, ``fixed``'s, the space's choices) beside
    the built-in ones: their own keys are the model keys the file may name."""
    fixed, space = doc.get("fixed") or {}, doc.get("space") or {}
    named = [base.model.kind, fixed.get("model.kind") if isinstance(fixed, dict) else None]
    raw = space.get("model.kind") if isinstance(space, dict) else None
    if isinstance(raw, dict) and isinstance(raw.get("choice"), list):
        named += raw["choice"]
    kinds = tuple(dict.fromkeys(k for k in named if isinstance(k, str) and k not in config.BUILTIN_KINDS))
    for kind in kinds:
        try:
            config.kind_config(kind)
        except ConfigError as e:
            raise SweepError(f"{e} (named in {path})") from None
    return (*config.BUILTIN_KINDS, *kinds)


def config_key(path: str, key: Any, where: str, kinds: tuple[str, ...] = config.BUILTIN_KINDS) -> None:
    """A config key named in a sweep file (in ``fixed``, ``best.set`` or the space) must exist."""
    if key not in config.all_keys(kinds) or "." not in str(key):
        raise config.unknown_key(str(key), f"{path} ({where})", SweepError, kinds)


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

    def count(self) -> int:
        """How many values :meth:`values` would list, without listing them (a range may hold 10^12)."""
        if self.kind in ("choice", "fixed"):
            return len(self.choices)
        if self.kind == "int":
            return len(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step:
            return int(round((self.high - self.low) / self.step)) + 1
        raise SweepError(f"'{self.key}' is a continuous range; it has no finite list of values")

    def few_values(self, most: int = 64) -> list:
        """:meth:`values` when there are at most ``most``, else the two ends: what checks try."""
        if self.count() <= most:
            return self.values()
        if self.kind in ("choice", "fixed"):
            return [self.choices[0], self.choices[-1]]
        return [self.low, self.low + (self.count() - 1) * (self.step or 1)]

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


def _param(path: str, key: str, raw: Any, when=None, model_kinds: tuple[str, ...] = config.BUILTIN_KINDS) -> Param:
    where = f"space.{key}"
    config_key(path, key, "space", model_kinds)
    if not isinstance(raw, dict):
        raise fail(path, where, "a mapping like {choice: [...]}, {int: [low, high]} or {float: [low, high]}", raw)
    kinds = [k for k in ("choice", "int", "float") if k in raw]
    extra = set(raw) - {"choice", "int", "float", "log", "step"}
    if extra:
        raise unknown(path, f"{where}.{sorted(extra)[0]}", [f"{where}.{k}" for k in ("choice", "int", "float", "log", "step")])
    if len(kinds) != 1:
        raise fail(path, where, "exactly one of choice, int or float", raw)
    kind = kinds[0]
    typ = config.key_type(key, model_kinds)
    if kind != "choice" and typ not in (int, float):
        raise fail(path, where, f"a choice: {key} holds a {typ.__name__}, not a number", raw)
    if kind == "float" and typ is int:  # Optuna would propose 2.5 and every trial would fail
        raise fail(path, where, f"an int range (or a choice): {key} is an integer key", raw)
    if kind == "choice":
        choices = raw["choice"]
        if not isinstance(choices, list) or not choices:
            raise fail(path, f"{where}.choice", "a non-empty list", choices)
        if len(set(map(repr, choices))) != len(choices):
            raise fail(path, f"{where}.choice", "a list without duplicates", choices)
        if "log" in raw or "step" in raw:
            raise fail(path, where, "a choice without log/step", raw)
        return Param(key, "choice", choices=tuple(choices), when=when)
    bounds = raw[kind]
    num = (int,) if kind == "int" else (int, float)
    if (not isinstance(bounds, list) or len(bounds) != 2
            or not all(isinstance(b, num) and not isinstance(b, bool) for b in bounds)):
        raise fail(path, f"{where}.{kind}", f"[low, high] of {'integers' if kind == 'int' else 'numbers'}", bounds)
    low, high = bounds
    if low > high:
        raise fail(path, f"{where}.{kind}", "[low, high] with low <= high", bounds)
    log = raw.get("log", False)
    if not isinstance(log, bool):
        raise fail(path, f"{where}.log", "true or false", log)
    if log and low <= 0:
        raise fail(path, f"{where}.{kind}", "positive bounds when log: true", bounds)
    step = raw.get("step")
    if step is not None:
        if not isinstance(step, num) or isinstance(step, bool) or step <= 0:
            raise fail(path, f"{where}.step", "a positive number", step)
        if log:
            raise fail(path, where, "either log or step, not both", raw)
    return Param(key, kind, low=low, high=high, log=log, step=step, when=when)


def _condition(path: str, text: str, params: dict[str, Param]) -> tuple[str, tuple]:
    m = _COND.match(str(text))
    if not m:
        raise fail(path, f"space.when.{text}", "a condition like \"model.kind == gpt\" or \"model.kind in [gpt, ff]\"")
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


def parse_space(path: str, raw_space: Any, fixed: dict, kinds: tuple[str, ...] = config.BUILTIN_KINDS) -> tuple[Param, ...]:
    """The ``space:`` mapping -> parameters, unconditional ones first."""
    if not isinstance(raw_space, dict) or not raw_space:
        raise fail(path, "space", "a non-empty mapping of config keys to parameter specs", raw_space)
    params: dict[str, Param] = {}
    for k, v in raw_space.items():
        if k == "when":
            continue
        if k in fixed:
            raise SweepError(f"'{k}' in {path} is both fixed and searched; keep it in one place")
        params[k] = _param(path, str(k), v, model_kinds=kinds)
    when = raw_space.get("when") or {}
    if not isinstance(when, dict):
        raise fail(path, "space.when", "a mapping of conditions to parameter specs", when)
    conditional: list[Param] = []
    for cond, sub in when.items():
        ckey, cvals = _condition(path, cond, params)
        if not isinstance(sub, dict) or not sub:
            raise fail(path, f"space.when.{cond}", "a non-empty mapping of config keys to parameter specs", sub)
        for k, v in sub.items():
            conditional.append(_conditional(path, str(k), v, cond, (ckey, cvals), params, fixed, conditional, kinds))
    return tuple(params.values()) + tuple(conditional)


def _conditional(path: str, k: str, v: Any, cond: str, when: tuple, params: dict, fixed: dict,
                 seen: list[Param], kinds: tuple[str, ...]) -> Param:
    if isinstance(v, dict):
        p = _param(path, k, v, when=when, model_kinds=kinds)
    else:  # a plain value: fixed for the trials that meet the condition
        _param(path, k, {"choice": [v]}, model_kinds=kinds)  # same key checks as a searched parameter
        p = Param(k, "fixed", choices=(v,), when=when)
    if k in params:
        raise SweepError(f"'{k}' in {path} is searched both unconditionally and under '{cond}'; keep it in one place")
    if k in fixed and p.kind != "fixed":  # a plain value under a condition may override `fixed`
        raise SweepError(f"'{k}' in {path} is both fixed and searched under '{cond}'; keep it in one place")
    for q in seen:
        if q.key == k and q.when == p.when:
            raise SweepError(f"'{k}' appears twice under '{cond}' in {path}")
        if (q.key == k and "fixed" not in (q.kind, p.kind)
                and dataclasses.replace(q, when=None) != dataclasses.replace(p, when=None)):
            raise SweepError(f"'{k}' in {path} has different ranges under different conditions; "
                             "Optuna needs one distribution per parameter name")
    return p


def check_corners(spec: SweepSpec) -> None:
    """Build the config at the corners of every branch, so range errors (context 0, heads that
    do not divide the width) surface now, naming the sweep file, not in trial 17."""
    try:
        base = spec.base_config()
        spec.with_best_set(base)
    except ConfigError as e:
        raise SweepError(str(e)) from None
    branches: list[tuple[str, tuple] | None] = [None] + sorted(
        {p.when for p in spec.space if p.when}, key=repr)
    for branch in branches:
        active = [p for p in spec.space if p.when is None or p.when == branch]
        for p in active:
            if branch and p.key == branch[0]:  # in a branch, its condition's key takes the branch's values only
                corners = list(branch[1])
            else:
                corners = [p.low, p.high] if p.kind == "float" and not p.step else p.few_values()
            for v in corners:
                values = {q.key: _low(q) for q in active}
                if branch:
                    values[branch[0]] = branch[1][0]
                values[p.key] = v
                _try(spec, values, p.key)
        # every (n_head, n_embd) pair the branch can propose must divide
        where = f"{spec.path} (space)"
        gpt = config.kind_config("gpt")()  # a base of another kind holds no heads: the gpt defaults
        heads = _candidates(active, base, "model.n_head", where, gpt.n_head)
        widths = _candidates(active, base, "model.n_embd", where, gpt.n_embd)
        kind = _candidates(active, base, "model.kind", where) if not branch or branch[0] != "model.kind" else list(branch[1])
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


def _candidates(active: list[Param], base: config.Config, key: str, where: str, default: Any = None) -> list:
    """The values ``key`` can take in a branch, as the config reads them ('192' is 192)."""
    for p in active:
        if p.key == key:
            try:
                values = p.few_values(4096)
            except SweepError:
                values = [p.low, p.high]
            try:
                return [config.coerce(key, v, where) for v in values]
            except ConfigError as e:
                raise SweepError(str(e)) from None
    return [config.flatten(base).get(key, default)]


def _try(spec: SweepSpec, values: dict, key: str) -> None:
    """The corner's trial config, and the retrain's (``best.set`` on top of it), must both validate."""
    try:
        cfg = spec.config_for(values, where=f"{spec.path} (space.{key})")
        spec.with_best_set(cfg, note=f", with space {key}={values[key]!r}")
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
            n *= p.count()
        except SweepError:
            return math.inf
    return n
