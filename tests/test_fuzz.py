"""Fuzzing what a user types: the shipped experiment and sweep files under seeded random mutations
(types swapped, keys dropped or misspelt, values out of range, nesting broken, text cut short), and
the command line itself (every command's flags, drawn from the parser, with values of the wrong type,
out of range, or naming paths that are missing, folders, binary or empty). Each case goes through the
CLI's own ``main``; every outcome is success or exit 2 with one line ``error: ...``, within 60 s; any
other exception fails the test with the case that caused it. 1,100 cases in all, in ``make test``
(about 10 s: a budgeted dry run plans from a recorded measurement of this machine)."""

from __future__ import annotations

import argparse
import copy
import random
import time
import traceback

import pytest
import yaml

from charlm import __main__ as cli_main
from charlm import interrupts
from helpers import ROOT, SMOKE, cli, reference_speed

N_EXPERIMENTS = 270  # mutations of experiments/*.yaml
N_SWEEPS = 230  # mutations of sweeps/*.yaml
N_ARGS = 600  # command lines
CASE_LIMIT_S = 60  # the longest any one case may take
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
        try:
            code = cli_main.main([str(a) for a in args])
        except SystemExit as e:  # argparse's exit (an argument error, --help), as the process would end
            code = e.code if isinstance(e.code, int) else 1
        return code, capsys.readouterr().err
    return run


def _judge(run_main, args: list, what: str, outcomes: dict, broken: list) -> None:
    """One case: success, or exit 2 with one line ``error: ...``, within CASE_LIMIT_S."""
    t0 = time.monotonic()
    try:
        code, err = run_main(*args)
    except BaseException as e:  # noqa: BLE001 - anything but a clean line is the finding
        broken.append(f"{what}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}")
        return
    took = time.monotonic() - t0
    lines = err.strip().splitlines()
    if took > CASE_LIMIT_S:
        broken.append(f"{what}: took {took:.0f} s")
    elif code == 0:
        outcomes["ok"] += 1
    elif code == 2 and lines and lines[-1].startswith("error: ") and "Traceback" not in err and \
            not any(line.startswith("error: ") for line in lines[:-1]):
        outcomes["refused"] += 1
    else:
        broken.append(f"{what}: exit {code}, stderr {err[-1500:]!r}")


def _fuzz(run_main, tmp_path, command: str, docs: list, n: int, seed: int, prepare=lambda d: d) -> dict:
    rng = random.Random(seed)
    outcomes, broken = {"ok": 0, "refused": 0}, []
    f = tmp_path / f"{command}.yaml"
    for i in range(n):
        text = _case(rng, prepare(rng.choice(docs)))
        f.write_text(text)
        _judge(run_main, [command, f, "--dry-run"], f"case {i}\n{text}", outcomes, broken)
    assert not broken, f"{len(broken)} of {n} mutations escaped as something else than one line:\n" + "\n".join(broken[:3])
    return outcomes


def test_mutated_experiments_are_trained_or_refused_in_one_line(run_main, tmp_path, tiny_text):
    def small_data(doc):  # the shipped data section, on a small text (loading stays fast)
        doc = copy.deepcopy(doc)
        doc.setdefault("data", {})["path"] = str(tiny_text)
        return doc

    out = _fuzz(run_main, tmp_path, "train", _sources()["experiments"], N_EXPERIMENTS, 16, small_data)
    assert out["ok"] > 10 and out["refused"] > 100, out  # the mutations reach both outcomes


def test_mutated_sweeps_are_planned_or_refused_in_one_line(run_main, tmp_path, monkeypatch):
    # a budgeted dry run plans from this machine's measured speed: the recorded one (tests/helpers.py)
    # stands in, so each case plans in milliseconds instead of timing every kind's largest model
    from charlm import plan

    monkeypatch.setattr(plan, "measure", lambda spec: reference_speed())
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


# ----------------------------------------------------------------------------- the command line

WORDS = ["", "x", "-1", "0", "1", "2", "3", "1e9", "-0.5", "0.5", "nan", "inf", "45m", "0m", "3h", "1h30m", "abc",
         "10**12", "99999999999999999999", "\u00e9\u00e8", "--", "-", "model.n_layer=2", "train.lr=", "=1", "a=b=c",
         "train.max_steps=-5", "sqlite:///", "journal:", "postgresql://u:pw@127.0.0.1:1/db", "file:///nope",
         "models:/charlm-none@champion", "ROMEO:", "\n", "cuda", "cpu", "test", "val", "train"]


def _paths(tmp_path, tiny_text, untrained_model) -> dict[str, list[str]]:
    """What a positional or a path flag may name: real files of each kind, and what is not one."""
    (tmp_path / "folder").mkdir(exist_ok=True)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.bin").write_bytes(bytes(range(256)) * 4)
    exp = tmp_path / "tiny.yaml"
    exp.write_text(yaml.safe_dump({"data": {"path": str(tiny_text), "context": 16},
                                   "model": {"kind": "gpt", "n_layer": 1, "n_head": 2, "n_embd": 32}}))
    smoke = yaml.safe_load(SMOKE.read_text())
    smoke["base"], smoke["baseline"] = str(exp), str(ROOT / "experiments" / "ngram.yaml")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump(smoke, sort_keys=False))
    bad = [str(tmp_path / "missing.yaml"), str(tmp_path / "folder"), str(tmp_path / "empty.txt"),
           str(tmp_path / "binary.bin"), "/dev/null", "/"]
    return {"experiment": [str(exp), str(ROOT / "experiments" / "ff.yaml"), *bad],
            "sweep": [str(sweep), str(ROOT / "sweeps" / "smoke.yaml"), *bad],
            "model": [str(untrained_model), str(untrained_model.parent), *bad],
            "text": [str(tiny_text), *bad]}


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _value(rng: random.Random, action: argparse.Action, paths: dict) -> list[str]:
    """A value for ``action``: mostly of its kind (a choice, a number, a path), sometimes anything."""
    dest = action.dest
    if rng.random() < 0.1:
        return [rng.choice(WORDS)]
    if action.choices:
        return [str(rng.choice(list(action.choices)))]
    if dest in paths:  # mostly one that works (the first two of each kind), else one that does not
        return [rng.choice(paths[dest][:2] if rng.random() < 0.7 else paths[dest])]
    if action.type is int:
        return [str(rng.choice([-3, 0, 1, 2, 7, 100, 10**9]))]
    if action.type is float:
        return [str(rng.choice([-1.0, 0.0, 0.01, 0.5, 1.0, 2.5, 1e6, float("nan"), float("inf")]))]
    if dest == "set":
        return [rng.choice(["train.max_steps=5", "model.n_layer=2", "train.lr=1e-3", "model.kind=ff", "nosuch.key=1",
                            "train.lr=fast", "model.kind=examples.my_model:MyModel", "data.context=0"])
                for _ in range(rng.randint(1, 3))]
    return [rng.choice(WORDS)]


def command_line(rng: random.Random, parsers: dict, paths: dict) -> list[str]:
    """A random command line: a command, its positional (usually), a few of its flags with values;
    train and sweep always dry (the fuzz checks what is typed, not hours of training)."""
    name = rng.choice([c for c in parsers if c != "dashboard"])  # the dashboard's success is serving forever
    if rng.random() < 0.03:
        return [rng.choice(["--help", "bogus", "", "--version"])]
    parser, args = parsers[name], [name]
    for action in parser._actions:
        if not action.option_strings and action.dest != "help" and rng.random() < 0.9:
            args += _value(rng, action, paths)  # the positional
    flags = [a for a in parser._actions if a.option_strings and a.dest not in ("help", "worker_index", "dry_run")]
    for action in rng.sample(flags, k=min(len(flags), rng.randint(0, 3))):
        args.append(rng.choice(action.option_strings))
        if action.nargs != 0:
            args += _value(rng, action, paths)
    if rng.random() < 0.05:
        args.append(rng.choice(["--no-such-flag", "-x", "--chars=", "extra"]))
    if name in ("train", "sweep"):
        args.append("--dry-run")
    return args


def test_fuzzed_command_lines_succeed_or_are_refused_in_one_line(run_main, tmp_path, tiny_text, monkeypatch):
    from charlm import checkpoint, config
    from charlm.data import CharVocab
    from charlm.models import build_model

    cfg = config.load(None, [f"data.path={tiny_text}", "data.context=16", "model.n_layer=1", "model.n_embd=16",
                             "model.n_head=1"])
    vocab = CharVocab.from_text(tiny_text.read_text(encoding="utf-8"))
    model = checkpoint.save(tmp_path / "ck" / "model.pt", build_model(cfg, len(vocab)), cfg, vocab, {})
    from charlm import plan

    monkeypatch.setattr(plan, "measure", lambda spec: reference_speed())  # as in the sweep fuzz above
    parsers, paths = _actions(cli_main.build_parser()), _paths(tmp_path, tiny_text, model)
    rng = random.Random(7)
    outcomes, broken = {"ok": 0, "refused": 0}, []
    for i in range(N_ARGS):
        args = command_line(rng, parsers, paths)
        _judge(run_main, args, f"case {i}: python -m charlm {' '.join(args)}", outcomes, broken)
    assert not broken, f"{len(broken)} of {N_ARGS} command lines escaped:\n" + "\n".join(broken[:3])
    assert outcomes["ok"] > 30 and outcomes["refused"] > 200, outcomes  # both outcomes reached
