"""Fuzzing the shipped experiment and sweep files: seeded random mutations (types swapped, keys
dropped or misspelt, values out of range, nesting broken, text cut short) go through the CLI's own
``main`` with ``train --dry-run`` / ``sweep --dry-run``. Every outcome is success or exit 2 with one
line ``error: ...``; any other exception fails the test with the mutated file that caused it."""

from __future__ import annotations

import copy
import random
import traceback

import pytest
import yaml

from charlm import __main__ as cli_main
from charlm import interrupts
from helpers import ROOT, cli

N_EXPERIMENTS = 270  # mutations of experiments/*.yaml
N_SWEEPS = 230  # mutations of sweeps/*.yaml
POOL = [None, "", "text", "gpt", 0, -1, 1, 3, 2.5, -0.5, 1e30, 10**12, float("inf"), float("nan"), True, False,
        [], [1, "a"], [0.1, 0.2], {}, {"x": 1}, {"choice": []}, {"int": [1]}, {"float": [1.0, 0.1]}, "1e-3",
        "experiments/none.yaml"]


def _nodes(doc, path=()):
    """Every (path, value) below ``doc``, sections included."""
    out = []
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        out.append((path + (k,), v))
        out += _nodes(v, path + (k,))
    return out


def _parent(doc, path):
    for k in path[:-1]:
        doc = doc[k]
    return doc


def _misspell(rng: random.Random, key) -> str:
    key = str(key)
    i = rng.randrange(len(key) + 1)
    return rng.choice([key[:i] + key[i + 1:], key[:i] + rng.choice("aekx_.") + key[i:], key.upper(), key + "s"])


def mutate(rng: random.Random, doc):
    nodes = _nodes(doc)
    if not nodes:
        return rng.choice(POOL)
    path, value = rng.choice(nodes)
    parent, last = _parent(doc, path), path[-1]
    op = rng.choice(["swap", "drop", "misspell", "range", "lift", "wrap"])
    if op == "swap":
        parent[last] = copy.deepcopy(rng.choice(POOL))
    elif op == "drop":
        del parent[last]
    elif op == "misspell" and isinstance(parent, dict):
        parent[_misspell(rng, last)] = parent.pop(last)
    elif op == "range" and isinstance(value, (int, float)) and not isinstance(value, bool):
        parent[last] = rng.choice([-value, value * 1000, 0, -1, value + 0.5, 10**12, value - 1])
    elif op == "lift" and isinstance(value, dict) and value and isinstance(doc, dict):
        k = rng.choice(list(value))
        doc[k] = value.pop(k)  # a key one level too high
    elif op == "wrap":
        parent[last] = rng.choice([[value], {"value": value}, str(value)])
    return doc


def _sources() -> dict[str, list]:
    """The shipped files as data; experiments and sweeps point at absolute copies of what they name."""
    exps = {p.name: yaml.safe_load(p.read_text()) for p in sorted((ROOT / "experiments").glob("*.yaml"))}
    sweeps = {}
    for p in sorted((ROOT / "sweeps").glob("*.yaml")):
        doc = yaml.safe_load(p.read_text())
        for k in ("base", "baseline"):
            if k in doc:
                doc[k] = str(ROOT / doc[k])
        sweeps[p.name] = doc
    return {"experiments": list(exps.values()), "sweeps": list(sweeps.values())}


def _case(rng: random.Random, doc) -> str:
    doc = copy.deepcopy(doc)
    for _ in range(rng.randint(1, 3)):
        doc = mutate(rng, doc)
    text = yaml.safe_dump(doc, sort_keys=False)
    if rng.random() < 0.08:  # a file cut short or a stray character: YAML syntax errors
        i = rng.randrange(len(text) + 1)
        text = text[:i] + rng.choice(["", ": [", "\t", "{"])
    return text


@pytest.fixture
def run_main(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(interrupts, "install", lambda: None)
    monkeypatch.chdir(tmp_path)

    def run(*args) -> tuple[int, str]:
        code = cli_main.main([str(a) for a in args])
        return code, capsys.readouterr().err
    return run


def _fuzz(run_main, tmp_path, command: str, docs: list, n: int, seed: int, prepare=lambda d: d) -> dict:
    rng = random.Random(seed)
    outcomes, broken = {"ok": 0, "refused": 0}, []
    f = tmp_path / f"{command}.yaml"
    for i in range(n):
        text = _case(rng, prepare(rng.choice(docs)))
        f.write_text(text)
        try:
            code, err = run_main(command, f, "--dry-run")
        except BaseException as e:  # noqa: BLE001 - anything but a clean line is the finding
            broken.append(f"case {i}: {type(e).__name__}: {e}\n{text}\n{traceback.format_exc(limit=-3)}")
            continue
        lines = err.strip().splitlines()
        if code == 0:
            outcomes["ok"] += 1
        elif code == 2 and len(lines) == 1 and lines[0].startswith("error: "):
            outcomes["refused"] += 1
        else:
            broken.append(f"case {i}: exit {code}, stderr {err!r}\n{text}")
    assert not broken, f"{len(broken)} of {n} mutations escaped as something else than one line:\n" + "\n".join(broken[:3])
    return outcomes


def test_mutated_experiments_are_trained_or_refused_in_one_line(run_main, tmp_path, tiny_text):
    def small_data(doc):  # the shipped data section, on a small text (loading stays fast)
        doc = copy.deepcopy(doc)
        doc.setdefault("data", {})["path"] = str(tiny_text)
        return doc

    out = _fuzz(run_main, tmp_path, "train", _sources()["experiments"], N_EXPERIMENTS, 16, small_data)
    assert out["ok"] > 10 and out["refused"] > 100, out  # the mutations reach both outcomes


def test_mutated_sweeps_are_planned_or_refused_in_one_line(run_main, tmp_path):
    out = _fuzz(run_main, tmp_path, "sweep", _sources()["sweeps"], N_SWEEPS, 16)
    assert out["ok"] > 10 and out["refused"] > 100, out
    assert not (tmp_path / "mlruns").exists()  # a dry run writes nothing, refused or not


def test_mutated_files_by_the_real_cli(tmp_path):
    """The same, in real processes: exit 2, one line, no traceback."""
    exp = tmp_path / "exp.yaml"
    exp.write_text("model: {kind: gpt, n_layer: 4, n_head: 3, n_embd: 256}\n")
    sweep = tmp_path / "sweep.yaml"
    doc = next(d for d in _sources()["sweeps"] if d["study"]["name"] == "smoke")
    doc["space"]["train.patience"] = {"float": [1, 2]}
    sweep.write_text(yaml.safe_dump(doc))
    for args, needle in ((["train", str(exp), "--dry-run"], "'model.n_head'"),
                         (["sweep", str(sweep), "--dry-run"], "train.patience is an integer key")):
        r = cli(*args, cwd=tmp_path)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and not (tmp_path / "mlruns").exists()
