"""The one home of defaults: frozen dataclasses, loaded strictly from YAML plus ``--set`` overrides.

``load("experiments/gpt.yaml", ["train.lr=1e-3"])`` returns a frozen :class:`Config`. Anything a
user can get wrong (an unknown or misspelt key, a wrong type, a value out of range) raises
:class:`ConfigError` whose message is one line naming the file, the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from charlm.bounds import BOUNDS, TEXTS
from charlm.errors import CharlmError, first_line


class ConfigError(CharlmError):
    """A config file or override that cannot be used as written."""


@dataclass(frozen=True)
class DataConfig:
    path: str = ""  # a UTF-8 text file; empty = tiny shakespeare (checkout -> mirror -> download)
    context: int = 128  # characters a model may look back on; both models share the name
    val_fraction: float = 0.1  # contiguous slice after train (80-90%); nanoGPT's val split is our test split
    test_fraction: float = 0.1  # contiguous slice at the end, touched only by final evaluation


@dataclass(frozen=True)
class ModelConfig:
    """``kind`` and what every kind shares; the kind's own hyperparameters (``model.<key>``) are its
    ``Config`` dataclass (charlm/models/base.py), held in ``params`` and read as ``cfg.model.<key>``."""

    kind: str = "gpt"  # gpt | ff | ngram | rnn, or a plugin's import path module:Class (charlm/models/__init__.py)
    mix_order: int = 0  # > 0: interpolate with a Kneser-Ney n-gram of this order, gate fitted on val
    params: Any = None  # the kind's Config instance; None = its defaults

    def __post_init__(self):
        own = kind_config(self.kind)
        if self.params is None:
            object.__setattr__(self, "params", own())
        elif not isinstance(self.params, own):  # dataclasses.replace(model, kind=...): keys of both kinds carry
            carried = {k: getattr(self.params, k) for k in _fields(own) if k in _fields(type(self.params))}
            object.__setattr__(self, "params", own(**carried))

    def __getattr__(self, name: str) -> Any:  # cfg.model.n_layer: the kind's own key
        try:
            params = object.__getattribute__(self, "params")
        except AttributeError:
            raise AttributeError(name) from None
        if name in _fields(type(params)):
            return getattr(params, name)
        raise AttributeError(f"model kind {self.kind!r} has no key {name!r}")


def kind_config(kind: str) -> type:
    """The ``Config`` dataclass of a model kind (importing the kind's module; a plugin's too)."""
    from charlm.models import kind_class

    return kind_class(kind).Config


CLOCK_ONLY_STEPS = 100_000  # a step cap at least this high is a placeholder under a clock: no run here gets near it


@dataclass(frozen=True)
class TrainConfig:
    device: str = "auto"  # auto | cpu | cuda; auto takes a GPU when torch sees one
    precision: str = "auto"  # auto | fp32 | bf16; auto = bf16 autocast where the hardware has it
    compile: str = "auto"  # auto | true | false: torch.compile the training step; auto = on CUDA, for runs long enough to repay it
    compile_mode: str = "auto"  # auto | default | reduce-overhead (CUDA graphs); auto = reduce-overhead on CUDA (docs: how-to/gpu.md)
    threads: int = 0  # torch intra-op threads; 0 = torch's default (the physical cores)
    seed: int = 0  # one seed drives init, batch order and dropout
    batch_size: int = 32  # sequences per step
    lr: float = 2e-3  # peak AdamW learning rate; small char models take a high one
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio at max_steps
    schedule: str = "cosine"  # cosine | linear | constant | wsd (warmup-stable-decay), after warmup
    decay_fraction: float = 0.2  # wsd: the last fraction of the budget decays linearly to the floor
    warmup_steps: int = 100  # linear warmup from 0; avoids early blow-ups with Adam
    weight_decay: float = 0.1  # applied to matrices only, never to biases or norms
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.99  # AdamW second-moment decay; 0.99 suits short runs on small batches
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    max_steps: int = 2000  # optimizer steps budget
    max_minutes: float = 0.0  # wall-clock budget for the training loop; 0 = none
    validation_interval: int = 100  # steps between evaluations (the patience rule's step axis)
    patience: int = 5  # evaluations without relative improvement before stopping; 0 = never
    min_relative_improvement: float = 0.0  # improve means loss < reference * (1 - this); reference: the last improving loss
    eval_chars: int = 16384  # intermediate evals score this fixed prefix of val; 0 = all of val
    eval_stride: int = 0  # gpt full-pass window stride; 0 = context // 2
    eval_batch_size: int = 32  # windows per forward pass when evaluating
    sample_chars: int = 500  # length of the text sample saved with each run
    system_metrics: bool = True  # CPU, memory, disk, network every 2 s on MLflow runs (system/*); ~1% of a trial (docs/results.md)

    @property
    def clock_only(self) -> bool:
        """The clock is the budget: ``max_steps`` is a cap set out of reach (sweeps/default.yaml's
        1,000,000), so a run's progress is told in minutes, not as a share of the cap."""
        return self.max_minutes > 0 and self.max_steps >= CLOCK_ONLY_STEPS


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    experiment: str = "charlm"  # MLflow experiment the run is filed under
    name: str = ""  # MLflow run name; empty = derived from the file name


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}
SHARED_MODEL_KEYS = ("kind", "mix_order")  # the model keys of every kind; the rest are the kind's own
BUILTIN_KINDS = ("gpt", "ff", "ngram", "rnn")  # charlm/models/__init__.py BUILTIN
CHOICES = {
    "train.device": ("auto", "cpu", "cuda"),
    "train.precision": ("auto", "fp32", "bf16"),
    "train.compile": ("auto", "true", "false"),
    "train.compile_mode": ("auto", "default", "reduce-overhead"),
    "train.schedule": ("cosine", "linear", "constant", "wsd"),
}


@functools.cache
def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def model_fields(kinds: Iterable[str] = BUILTIN_KINDS) -> dict[str, dataclasses.Field]:
    """The own keys of these model kinds (by name; a key two kinds share holds one type in both)."""
    out: dict[str, dataclasses.Field] = {}
    for kind in kinds:
        out.update({k: f for k, f in _fields(kind_config(kind)).items() if k not in out})
    return out


def all_keys(kinds: Iterable[str] = BUILTIN_KINDS) -> list[str]:
    """Every dotted key a user may set, e.g. ``train.lr``; model keys of these kinds."""
    keys = []
    for name in _fields(Config):
        if name == "model":
            keys += [f"model.{k}" for k in (*SHARED_MODEL_KEYS, *model_fields(kinds))]
        elif name in SECTIONS:
            keys += [f"{name}.{k}" for k in _fields(SECTIONS[name])]
        else:
            keys.append(name)
    return keys


def key_type(key: str, kinds: Iterable[str] = BUILTIN_KINDS) -> type:
    """``int``, ``float``, ``str`` or ``bool``: the type a dotted key holds."""
    head, _, tail = key.partition(".")
    if head == "model" and tail not in SHARED_MODEL_KEYS:
        return _type_of(model_fields(kinds)[tail])
    return _type_of(_fields(SECTIONS[head])[tail] if tail else _fields(Config)[head])


def unknown_key(key: str, where: str, error: type[CharlmError] = ConfigError,
                kinds: Iterable[str] = BUILTIN_KINDS) -> CharlmError:
    return error(f"Unknown config key '{key}' in {where}{hint(key, all_keys(kinds), 'known keys')}")


# The checks sweep files share (charlm/space.py, charlm/sweepfile.py)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def hint(key: str, known: Iterable[str], listing: str = "") -> str:
    """``"; did you mean 'train.lr'?"`` for a near miss, else ``"; <listing>: a, b, c"`` (or nothing)."""
    known = list(known)
    near = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
    if near:
        return f"; did you mean '{near[0]}'?"
    return f"; {listing}: {', '.join(known)}" if listing else ""


def _coerce(key: str, value: Any, typ: type, where: str) -> Any:
    """Check one value against its field's type; ints are accepted where floats are expected."""
    ok = False
    if typ in (int, float) and isinstance(value, str) and _looks_numeric(value):
        # YAML 1.1 reads "1e-3" as a string; users mean the number
        value = float(value) if typ is float or not value.strip().lstrip("+-").isdigit() else int(value)
    if typ is bool:
        ok = isinstance(value, bool)
    elif typ is int:
        ok = is_int(value)
    elif typ is float:
        ok = is_number(value)
        if ok:
            value = float(value)
    elif typ is str:
        if isinstance(value, bool):  # YAML reads true/false as booleans; a str key lists them as words
            value = str(value).lower()
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(
            f"Config key '{key}' in {where} must be {typ.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def coerce(key: str, value: Any, where: str) -> Any:
    """``value`` as config key ``key`` reads it (a numeric string is a number), or ConfigError."""
    return _coerce(key, value, key_type(key), where)


_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _type_of(f: dataclasses.Field) -> type:
    return _TYPES[f.type] if isinstance(f.type, str) else f.type


def _kind(flat: Mapping[str, Any], where: Mapping[str, str]) -> str:
    kind = _coerce("model.kind", flat.get("model.kind", ModelConfig.kind), str, where.get("model.kind", "config"))
    _check(kind in BUILTIN_KINDS or ":" in kind, "model.kind", where,
           f"a built-in kind ({' | '.join(BUILTIN_KINDS)}) or a plugin's import path module:Class", kind)
    try:
        kind_config(kind)
    except ConfigError as e:
        raise ConfigError(f"Config key 'model.kind' in {where.get('model.kind', 'config')}: {e}") from None
    return kind


def flat_to_config(flat: Mapping[str, Any], where: Mapping[str, str]) -> Config:
    """Build a validated Config from dotted keys; ``where[key]`` says where each key came from.
    A model key of another built-in kind is ignored (files set ff and gpt keys side by side)."""
    sections: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    top: dict[str, Any] = {}
    kind = _kind(flat, where)
    own, params = _fields(kind_config(kind)), {}
    for key, value in flat.items():
        src = where.get(key, "config")
        head, _, tail = key.partition(".")
        if head == "model" and tail not in SHARED_MODEL_KEYS:
            if tail in own:
                params[tail] = _coerce(key, value, _type_of(own[tail]), src)
            elif tail not in model_fields():
                raise unknown_key(key, src, kinds=(*BUILTIN_KINDS, kind))
        elif head in SECTIONS:
            fields = _fields(SECTIONS[head])
            if not tail or tail not in fields or tail == "params":
                raise unknown_key(key, src, kinds=(*BUILTIN_KINDS, kind))
            sections[head][tail] = _coerce(key, value, _type_of(fields[tail]), src)
        else:
            fields = _fields(Config)
            if tail or head not in fields or head in SECTIONS:
                raise unknown_key(key, src, kinds=(*BUILTIN_KINDS, kind))
            top[head] = _coerce(key, value, _type_of(fields[head]), src)
    sections["model"].update(kind=kind, params=kind_config(kind)(**params))
    cfg = Config(**{s: cls(**sections[s]) for s, cls in SECTIONS.items()}, **top)
    validate(cfg, where)
    return cfg


def _check(cond: bool, key: str, where: Mapping[str, str], expected: str, value: Any) -> None:
    if not cond:
        src = where.get(key, "the defaults")
        raise ConfigError(f"Config key '{key}' in {src} must be {expected}, got {value!r}")


def validate(cfg: Config, where: Mapping[str, str] | None = None) -> None:
    """Range and consistency checks that types alone cannot express (ranges: charlm/bounds.py, or
    a model kind's field metadata)."""
    w = where or {}
    flat = flatten(cfg)
    for key, choices in CHOICES.items():
        _check(flat[key] in choices, key, w, "one of " + " | ".join(choices), flat[key])
    for key, bound in BOUNDS.items():
        if key in flat:
            _check(bound.admits(flat[key], flat), key, w, bound.describe(is_int(flat[key]), flat), flat[key])
    for name, f in _fields(type(cfg.model.params)).items():
        key, value = f"model.{name}", flat[f"model.{name}"]
        if "choices" in f.metadata:
            _check(value in f.metadata["choices"], key, w, "one of " + " | ".join(f.metadata["choices"]), value)
        if "bound" in f.metadata:
            _check(f.metadata["bound"].admits(value, flat), key, w, f.metadata["bound"].describe(is_int(value), flat), value)
    from charlm.models.base import KindConfig

    if isinstance(cfg.model.params, KindConfig):
        for name, expected, value in cfg.model.params.problems():
            _check(False, f"model.{name}", w, expected, value)
    _check(bool(cfg.experiment.strip()), "experiment", w, TEXTS["experiment"], cfg.experiment)
    _check(
        not (cfg.model.mix_order and cfg.model.kind == "ngram"), "model.mix_order", w,
        "0 (off) when model.kind is ngram (a mixture needs a neural model)", cfg.model.mix_order,
    )


def override(cfg: Config, values: Mapping[str, Any], where: str) -> Config:
    """A new Config with dotted ``values`` applied; ``cfg`` itself is never modified."""
    flat = flatten(cfg)
    flat.update(values)
    return flat_to_config(flat, {k: where for k in values})


def flatten(cfg: Config) -> dict[str, Any]:
    """``{"data.context": 128, ..., "experiment": "charlm"}`` in declaration order; the model's keys
    are its kind, its own keys, then mix_order."""
    out: dict[str, Any] = {}
    for name in _fields(Config):  # getattr, not asdict: sweeps validate thousands of configs
        value = getattr(cfg, name)
        if name == "model":
            params = value.params
            out["model.kind"] = value.kind
            out.update({f"model.{k}": getattr(params, k) for k in _fields(type(params))})
            out["model.mix_order"] = value.mix_order
        elif name in SECTIONS:
            out.update({f"{name}.{k}": getattr(value, k) for k in _fields(SECTIONS[name])})
        else:
            out[name] = value
    return out


def to_dict(cfg: Config) -> dict[str, Any]:
    """Nested plain-data form, for YAML artifacts and checkpoints (the model's keys flat in its section)."""
    out: dict[str, Any] = {}
    for key, value in flatten(cfg).items():
        head, _, tail = key.partition(".")
        if tail:
            out.setdefault(head, {})[tail] = list(value) if isinstance(value, tuple) else value
        else:
            out[head] = value
    return out


def from_dict(d: Mapping[str, Any], where: str = "checkpoint") -> Config:
    flat = _flatten_mapping(d, where)
    return flat_to_config(flat, {k: where for k in flat})


def _flatten_mapping(d: Any, where: str, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where} must hold a mapping of config sections, got {type(d).__name__}")
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if not prefix and k in SECTIONS:
            if v is None:
                continue
            if not isinstance(v, Mapping):
                raise ConfigError(f"Config section '{key}' in {where} must be a mapping, got {v!r}")
            out.update(_flatten_mapping(v, where, prefix=f"{key}."))
        else:
            out[key] = v
    return out


def read_yaml(path: str | Path) -> Any:
    """Safe-load a YAML file, turning every failure into a one-line ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"Config file not found: {path} (give a path to a YAML file, e.g. experiments/gpt.yaml)")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"Cannot read config file {path}: {e}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or first_line(e)
        raise ConfigError(f"YAML syntax error in {path}{line}: {problem}") from None
    if doc is None:
        raise ConfigError(f"Config file {path} is empty; expected sections such as 'model:' and 'train:'")
    return doc


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=1e-3"`` -> ``("train.lr", 0.001)``; the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"Bad --set '{text}': expected KEY=VALUE, e.g. --set train.lr=1e-3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return s.strip().lower() not in {"nan", "inf", "-inf", "+inf", "infinity"}


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- ``--set`` overrides, strictly validated."""
    flat: dict[str, Any] = {}
    where: dict[str, str] = {}
    if path is not None:
        doc = read_yaml(path)
        items = _flatten_mapping(doc, str(path))
        for k, v in items.items():
            flat[k] = v
            where[k] = str(path)
    for text in overrides:
        k, v = parse_override(text)
        flat[k] = v
        where[k] = f"--set {text}"
    cfg = flat_to_config(flat, where)
    if not cfg.name and path is not None:
        cfg = dataclasses.replace(cfg, name=Path(path).stem)
    return cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
