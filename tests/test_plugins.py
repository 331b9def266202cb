"""A model of the user's own, outside charlm (``examples/my_model.py``), named from YAML or the command
line as ``model.kind: examples.my_model:MyModel``: its own keys checked like charlm's, in MLflow's
params and in a sweep's space; its checkpoint loadable, and one line where its module is gone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from charlm import checkpoint, config
from helpers import ROOT, cli, free_port, mlflow_client, wait_for_http

PLUGIN = "examples.my_model:MyModel"
TINY = ["data.context=16", "model.channels=16", "train.batch_size=8", "train.max_steps=20",
        "train.validation_interval=10", "train.warmup_steps=2", "train.eval_chars=2000", "train.sample_chars=20",
        "train.device=cpu", "train.precision=fp32"]
IMPORTABLE = {**os.environ, "PYTHONPATH": str(ROOT)}  # as from the checkout's root, or the plugin installed


def test_a_plugin_trains_from_the_command_line_and_its_own_keys_reach_mlflow_and_the_checkpoint(tmp_path):
    r = cli("train", str(ROOT / "experiments" / "gpt.yaml"), "--set", f"model.kind={PLUGIN}", "model.depth=2",
            *TINY, "--out", "kept", cwd=tmp_path, env=IMPORTABLE)
    assert r.returncode == 0, r.stderr[-2000:]
    client = mlflow_client(tmp_path)
    run = client.search_runs([client.get_experiment_by_name("charlm").experiment_id])[0]
    assert run.data.params["model.kind"] == PLUGIN and run.data.params["model.depth"] == "2"
    assert "model.n_layer" not in run.data.params  # another kind's key is not this run's
    saved = torch.load(tmp_path / "kept" / "model.pt", weights_only=True)["config"]["model"]  # plain data, no pickle
    assert saved["kind"] == PLUGIN and saved["depth"] == 2 and "n_layer" not in saved
    r = cli("eval", "--model", "kept", "--split", "val", "--json", cwd=tmp_path, env=IMPORTABLE)
    assert r.returncode == 0 and json.loads(r.stdout)["chars"] > 1000, r.stderr
    r = cli("sample", "--model", "kept", "--prompt", "ROMEO:", "--chars", "30", cwd=tmp_path, env=IMPORTABLE)
    assert r.returncode == 0 and len(r.stdout) == len("ROMEO:") + 30 + 1, r.stderr
    # where the plugin's module cannot be imported: one line naming it, exit 2
    gone = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = cli("eval", "--model", "kept", "--split", "val", cwd=tmp_path, env=gone)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "module 'examples.my_model' does not import" in r.stderr


@pytest.mark.parametrize("override,words", [
    ("model.dept=2", "Unknown config key 'model.dept' in --set model.dept=2; did you mean 'model.depth'?"),
    ("model.kernel=1", "Config key 'model.kernel' in --set model.kernel=1 must be an integer in [2, 9], got 1"),
    ("model.kind=examples.nope:MyModel", "module 'examples.nope' does not import (ModuleNotFoundError"),
    ("model.kind=examples.my_model:MyConfig", "is not a CharModel: subclass charlm.models.base.CharModel"),
    ("model.kind=examples.my_model:Nothing", "module 'examples.my_model' has no 'Nothing'"),
])
def test_plugin_mistakes_are_one_line_before_anything_runs(tmp_path, override, words):
    r = cli("train", str(ROOT / "experiments" / "gpt.yaml"), "--set", f"model.kind={PLUGIN}", override, "--dry-run",
            cwd=tmp_path, env=IMPORTABLE)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and words in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "mlruns").exists()


def test_a_sweep_searches_a_plugin_key_and_refuses_a_misspelt_one(tmp_path, monkeypatch):
    from charlm.space import SweepError
    from charlm.sweepfile import load_sweep

    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))
    spec = load_sweep(ROOT / "examples" / "my_model.yaml")
    assert [p.key for p in spec.space][0] == "model.depth"
    cfg = spec.trial_config({"model.depth": 3, "train.lr": 0.003}, 0)
    assert cfg.model.kind == PLUGIN and cfg.model.depth == 3 and cfg.model.channels == 32
    # beside the built-in kinds, the plugin's keys under its own condition
    both = tmp_path / "both.yaml"
    both.write_text((ROOT / "sweeps" / "smoke.yaml").read_text().replace(
        "model.kind: {choice: [gpt, ff]}", f"model.kind: {{choice: [gpt, '{PLUGIN}']}}").replace(
        '"model.kind == ff": {model.layers: {int: [1, 2]}, model.n_embd: 16}',
        f'"model.kind == {PLUGIN}": {{model.depth: {{int: [1, 2]}}, model.channels: 16}}'))
    spec = load_sweep(both)
    cfg = spec.trial_config({"model.kind": PLUGIN, "model.depth": 2, "train.lr": 0.003, "train.patience": 1,
                             "train.min_relative_improvement": 0.0, "model.channels": 16}, 1)
    assert cfg.model.depth == 2 and cfg.model.channels == 16
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "examples" / "my_model.yaml").read_text().replace("model.depth:", "model.dpth:"))
    with pytest.raises(SweepError, match="Unknown config key 'model.dpth'.*did you mean 'model.depth'"):
        load_sweep(bad)


def test_old_checkpoints_with_one_flat_model_section_still_load(tmp_path):
    """Before kinds had their own Config, a checkpoint's model section held every kind's keys."""
    from charlm.data import CharVocab
    from charlm.models import build_model

    cfg = config.load(None, ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "data.context=8"])
    vocab = CharVocab(list("abcdefgh\n"))
    torch.manual_seed(0)
    model = build_model(cfg, len(vocab))
    checkpoint.save(tmp_path / "model.pt", model, cfg, vocab, {})
    blob = torch.load(tmp_path / "model.pt", weights_only=True)
    blob["config"]["model"] = {"kind": "gpt", "n_embd": 16, "n_layer": 1, "n_head": 2, "hidden": 512, "layers": 2,
                               "dropout": 0.0, "bias": False, "tie_weights": True, "mix_order": 0}
    torch.save(blob, tmp_path / "old.pt")
    old = checkpoint.load(tmp_path / "old.pt")
    assert old.cfg == cfg
    idx = torch.randint(len(vocab), (1, 8))
    assert torch.equal(old.model.eval()(idx)[0], model.eval()(idx)[0])


@pytest.mark.slow
def test_the_example_sweeps_retrains_and_serves_a_plugin_model(tmp_path):
    """examples/sweep_my_model.py from a fresh folder (the Python API), then eval, sample and make serve."""
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    env = {**IMPORTABLE, "MLFLOW_TRACKING_URI": uri}
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "sweep_my_model.py")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "best trial" in r.stdout and "retrained: test" in r.stdout
    best = tmp_path / "mlruns" / "best" / "my-model"
    assert yaml.safe_load((best / "config.yaml").read_text())["model"]["kind"] == PLUGIN
    r = cli("eval", "--model", str(best), "--split", "test", "--json", cwd=tmp_path, env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["loss"] < 4.2, r.stderr
    port = free_port()
    venv = Path(sys.executable).parent.parent
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(["make", "-s", "-C", str(ROOT), "serve", f"VENV={venv}", "-o", f"{venv}/.installed",
                               f"PORT={port}", "SERVE_MODEL=models:/charlm-my-model@champion"],
                              env={k: v for k, v in env.items() if k != "PYTHONPATH"},  # the model carries its code
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", server, 180, lambda: (tmp_path / "serve.log").read_text()[-3000:])
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"dataframe_records": [{"prompt": "ROMEO:"}],
                                                      "params": {"chars": 30}}).encode())
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.status == 200 and len(json.loads(resp.read())["predictions"][0]) == 30
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()
        time.sleep(1)
