"""Every config key's validation bounds are exactly what the code consuming it accepts.

From the one table (charlm/bounds.py), and each built-in model kind's own keys (their Config's field
metadata), each numeric key gets its boundary values (the bound, just inside, just outside).
Validation must accept exactly the in-bound ones, and the consuming code (model, optimizer,
training steps, an evaluation, the final full passes, a sample) must run on every in-bound one
without raising, for each model kind the key matters to. A key added to the config without a
bound, a choice list or a text rule fails ``test_every_key_has_a_rule``.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import charlm.trainer as train_mod
from charlm import checkpoint, config
from charlm.bounds import BOUNDS, TEXTS, Bound
from charlm.config import ConfigError, is_int
from charlm.data import load_corpus
from charlm.models import BUILTIN, kind_class
from charlm.tracking import NullTracker


def _model_bounds() -> dict[str, tuple[Bound, tuple[str, ...]]]:
    """model.<key> -> (its bound, the built-in kinds that declare it): one bound per key name."""
    out: dict[str, tuple[Bound, tuple[str, ...]]] = {}
    for kind in BUILTIN:
        for f in dataclasses.fields(kind_class(kind).Config):
            if "bound" in f.metadata:
                bound, kinds = out.get(f"model.{f.name}", (f.metadata["bound"], ()))
                assert bound == f.metadata["bound"], f"model.{f.name} is bounded differently by two kinds"
                out[f"model.{f.name}"] = (bound, (*kinds, kind))
    return out


MODEL_BOUNDS = _model_bounds()
KINDS_OF = {  # which model kinds consume a shared key (default: the two trained ones)
    **{k: ("gpt", "ff", "ngram") for k in (
        "data.context", "data.val_fraction", "data.test_fraction", "train.seed", "train.threads",
        "train.eval_chars", "train.eval_batch_size", "train.sample_chars")},
}
# A neutral base: every check across keys holds (n_head=1 divides any width, no mixture, an n-gram of
# order 9 fits 64-bit ids), tiny and fast.
BASE = ["data.context=8", "model.n_layer=1", "model.n_head=1", "model.n_embd=8", "model.hidden=16",
        "model.layers=1", "train.batch_size=2", "train.max_steps=2", "train.validation_interval=1",
        "train.warmup_steps=1", "train.eval_chars=0", "train.eval_batch_size=64", "train.sample_chars=3",
        "train.precision=fp32", "train.threads=1", "train.device=cpu"]


def test_every_key_has_a_rule():
    own = {}
    for kind in BUILTIN:
        own.update({f"model.{f.name}": f for f in dataclasses.fields(kind_class(kind).Config)})
    for key in config.all_keys():
        typ = config.key_type(key)
        if key == "model.kind":
            continue  # a name the registry resolves (charlm/models/__init__.py), tested in test_models
        if key in own:
            meta = own[key].metadata
            rules = ["bound" in meta, "choices" in meta, typ is bool]
            where = "the field metadata of its kind's Config (charlm/models/)"
        else:
            rules = [key in BOUNDS, key in config.CHOICES, key in TEXTS, typ is bool]
            where = "charlm/bounds.py or config.CHOICES"
        assert sum(rules) == 1, f"{key} needs exactly one rule (a bound, a choice list or a text rule) in {where}"
        assert rules[0] == (typ in (int, float)), f"{key}: bounds are for numeric keys"
    assert set(BOUNDS) | set(config.CHOICES) | set(TEXTS) <= set(config.all_keys())


def inside(b: Bound, v: float, flat: dict) -> bool:
    """Membership worked out from the table's numbers, independently of ``Bound.admits``."""
    if v in b.also:
        return True
    low, high = b.limits(flat)
    above = low is None or v > low or (v == low and not b.low_open)
    below = high is None or v < high or (v == high and not b.high_open)
    return above and below


def boundary_values(b: Bound, integer: bool, flat: dict) -> list:
    eps = 1 if integer else 1e-3
    edges = [e for e in b.limits(flat) if e is not None] + list(b.also)
    values = sorted({e + d for e in edges for d in (-eps, 0, eps)})
    return [int(v) if integer else float(v) for v in values]


@pytest.fixture(scope="module")
def small_text(tiny_text, tmp_path_factory):
    path = tmp_path_factory.mktemp("bounds") / "small.txt"
    path.write_text(tiny_text.read_text(encoding="utf-8")[:3000], encoding="utf-8")
    return path


@pytest.fixture
def fast_train(monkeypatch, tmp_path):
    """``train`` as the CLI runs it, minus what no bound touches (plots, git, fsync)."""
    monkeypatch.setattr(train_mod, "loss_curve", lambda history, best, early, path: path)
    monkeypatch.setattr(train_mod, "git_commit", lambda: "test")
    monkeypatch.setattr(checkpoint.os, "fsync", lambda fd: None)
    threads = torch.get_num_threads()
    corpora: dict = {}

    def run(cfg: config.Config):
        key = (cfg.data.path, cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.context)
        if key not in corpora:
            corpora[key] = load_corpus(cfg.data)
        return train_mod.train(cfg, NullTracker(tmp_path / "run"), corpus=corpora[key], progress=False)
    yield run
    torch.set_num_threads(threads)


@pytest.mark.parametrize("key", sorted({**BOUNDS, **MODEL_BOUNDS}))
def test_bounds_match_what_the_consuming_code_accepts(key, small_text, fast_train):
    bound, kinds = MODEL_BOUNDS[key] if key in MODEL_BOUNDS else (BOUNDS[key], KINDS_OF.get(key, ("gpt", "ff")))
    checked = 0
    for kind in kinds:
        bases = [config.load(None, [f"data.path={small_text}", *BASE, f"model.kind={kind}"])]
        if bound.high_key:  # a bound tied to another key: check it at other values of that key too
            bases += [config.override(bases[0], {bound.high_key: n}, where="test") for n in (4, 12)]
        for base in bases:
            flat = config.flatten(base)
            for v in boundary_values(bound, is_int(flat[key]), flat):
                try:
                    cfg = config.override(base, {key: v}, where="test")
                except ConfigError as e:
                    assert not inside(bound, v, flat), f"{key}={v!r} is inside the bound but refused for {kind}: {e}"
                    assert f"'{key}'" in str(e) and "\n" not in str(e)
                    continue
                assert inside(bound, v, flat), f"{key}={v!r} is outside the bound but accepted for {kind}"
                if kind == "ngram" and cfg.model.mix_order:
                    continue  # refused across keys (a mixture needs a neural model); tested in test_bad_input
                result = fast_train(cfg)  # raises if the consuming code refuses the value
                assert result.steps >= 1 or kind == "ngram"
                assert math.isfinite(result.best_val_loss), (key, v, kind)
                checked += 1
    assert checked >= 2, f"{key}: fewer than two in-bound values exercised"
