"""The end of the MLflow lifecycle, on a real store: lineage of every training run, the best model
registered as ``charlm-<study>`` with a ``champion`` alias that only val loss moves, and that
model served over HTTP by ``make serve``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow.pyfunc
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import charlm
from charlm import checkpoint, serving
from charlm.data import load_corpus
from charlm.tracking import MlflowTracker
from charlm.trainer import train
from helpers import PYTHON, ROOT, SMOKE, cli, free_port, wait_for_http


@pytest.fixture
def trained(tiny_cfg, mlflow_uri):
    """One tiny training run in a fresh store; its checkpoint copied out of the run."""
    with MlflowTracker(tiny_cfg.experiment, tiny_cfg.name) as tracker:
        result = train(tiny_cfg, tracker)
        ckpt = Path(tracker.artifact_uri("model/model.pt"))
    return result, ckpt, mlflow_uri


def test_training_run_records_its_dataset_and_source(trained, tiny_cfg):
    result, _, uri = trained
    run = MlflowClient(uri).get_run(result.run_id)
    corpus = load_corpus(tiny_cfg.data)
    [inp] = run.inputs.dataset_inputs
    assert inp.dataset.digest == corpus.sha256[:36] and inp.dataset.name == corpus.path.name
    assert json.loads(inp.dataset.source) == {"uri": corpus.path.resolve().as_uri()}
    assert json.loads(inp.dataset.profile)["sha256"] == corpus.sha256 == run.data.params["data_sha256"]
    assert {t.key: t.value for t in inp.tags} == {"mlflow.data.context": "training"}
    tags = run.data.tags
    assert tags["mlflow.user"] and tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"] == "charlm"
    assert tags["mlflow.source.git.commit"] == run.data.params["git_commit"]


def test_champion_alias_moves_only_when_val_loss_improves(trained):
    result, ckpt, uri = trained
    with MlflowTracker("tests", "best-x") as parent:
        first = serving.log_and_register(parent.run_id, ckpt, "tiny", 2.0, {"trial": 3, "test_loss": 2.1}, uri)
    assert (first.version, first.champion, first.previous) == ("1", True, None)
    client = MlflowClient(uri)
    v1 = client.get_model_version_by_alias("charlm-tiny", "champion")
    assert str(v1.version) == "1" and v1.run_id == parent.run_id
    assert {k: v1.tags[k] for k in ("study", "trial", "test_loss", "val_loss")} == {
        "study": "tiny", "trial": "3", "test_loss": "2.1", "val_loss": "2.0"}
    # worse, then equal, val loss: a new version, the alias stays; a lower one takes it (test never decides)
    worse = serving.register(client, "charlm-tiny", v1.source, parent.run_id, 2.5, {"test_loss": 0.1}, uri)
    same = serving.register(client, "charlm-tiny", v1.source, parent.run_id, 2.0, {}, uri)
    assert (worse.version, worse.champion, same.champion) == ("2", False, False)
    assert str(client.get_model_version_by_alias("charlm-tiny", "champion").version) == "1"
    assert "stays on version 1" in worse.describe()
    better = serving.register(client, "charlm-tiny", v1.source, parent.run_id, 1.9, {}, uri)
    assert (better.version, better.champion, better.previous, better.previous_val_loss) == ("4", True, "1", 2.0)
    assert str(client.get_model_version_by_alias("charlm-tiny", "champion").version) == "4"


def test_the_served_model_is_defined_without_a_warning():
    """`make best` and `mlflow models serve` import charlm.serving first thing; MLflow's advice to add
    type hints to predict (this model checks its input itself) must not open their output."""
    r = subprocess.run([PYTHON, "-W", "default", "-c", "import charlm.serving"], capture_output=True, text=True)
    # a warning's line starts with the file that raised it; other packages' own import-time warnings
    # (a GPU machine's numpy or requests, say) are theirs to fix, not this model's
    ours = tuple(str(Path(package.__file__).parent) for package in (mlflow, charlm))
    assert r.returncode == 0 and not [line for line in r.stderr.splitlines() if line.startswith(ours)], r.stderr


def test_registered_model_generates_scores_and_refuses_bad_input(trained):
    _, ckpt, uri = trained
    with MlflowTracker("tests", "best-x") as parent:
        serving.log_and_register(parent.run_id, ckpt, "tiny", 2.0, {}, uri)
    model = mlflow.pyfunc.load_model("models:/charlm-tiny@champion")
    vocab = checkpoint.load(ckpt).vocab
    out = model.predict({"prompt": ["ROMEO:", ""]}, params={"chars": 37, "seed": 1})
    assert [len(t) for t in out] == [37, 37] and all(set(t) <= set(vocab.chars) for t in out)
    again = model.predict({"prompt": ["ROMEO:"]}, params={"chars": 37, "seed": 1})
    assert again[0] == out[0]  # the seed makes it repeatable
    [nats] = model.predict({"prompt": ["First Citizen:\nSpeak, speak."]}, params={"mode": "score"})
    assert 0 < nats < 6
    for data, params, words in [({"prompt": ["x"], "chars": [3]}, {}, "unknown input field"),
                                ({"prompt": ["x"]}, {"chars": -1}, "'chars' must be >= 0"),
                                ({"prompt": ["x\u03a9"]}, {}, "not in the model's vocabulary")]:
        with pytest.raises(MlflowException) as e:
            model.predict(data, params=params)
        assert e.value.get_http_status_code() == 400 and words in e.value.json_kwargs["reason"]


# ----------------------------------------------------------------------------- end to end


def _post(port: int, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _cli(*args, cwd, env):
    r = cli(*args, cwd=cwd, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_sweep_best_register_then_make_serve_answers(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    _cli("sweep", str(SMOKE), "--workers", "2", cwd=tmp_path, env=env)
    r = _cli("best", str(SMOKE), "--seeds", "0", cwd=tmp_path, env=env)
    assert "registered models:/charlm-smoke/1: now @champion" in r.stdout
    client = MlflowClient(uri)
    champion = client.get_model_version_by_alias("charlm-smoke", "champion")
    best_run = client.get_run(champion.run_id)
    assert best_run.data.tags["best"] == "true" and champion.tags["seed"] == "0"
    assert float(champion.tags["val_loss"]) == pytest.approx(
        json.loads((tmp_path / "mlruns/best/smoke/metrics.json").read_text())["runs"][0]["val_loss"])
    vocab = checkpoint.load(tmp_path / "mlruns/best/smoke/model.pt").vocab
    os.environ["MLFLOW_TRACKING_URI"] = uri  # models:/ below resolves in this store
    try:
        text = mlflow.pyfunc.load_model("models:/charlm-smoke@champion").predict(
            {"prompt": ["ROMEO:"]}, params={"chars": 64})[0]
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    assert len(text) == 64 and set(text) <= set(vocab.chars)
    # best again (its seed kept): the same val loss does not beat the champion
    r = _cli("best", str(SMOKE), "--seeds", "0", cwd=tmp_path, env=env)
    assert "registered models:/charlm-smoke/2: @champion stays on version 1" in r.stdout

    port = free_port()
    venv = Path(sys.executable).parent.parent
    # -o: the test runs from an installed environment; never reinstall it from here
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(["make", "-s", "-C", str(ROOT), "serve", f"VENV={venv}", "-o", f"{venv}/.installed",
                               f"PORT={port}", "SERVE_MODEL=models:/charlm-smoke@champion"], env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", server, 180, lambda: (tmp_path / "serve.log").read_text()[-3000:])
        status, body = _post(port, {"dataframe_records": [{"prompt": "ROMEO:"}], "params": {"chars": 80}})
        assert status == 200 and len(body["predictions"][0]) == 80 and set(body["predictions"][0]) <= set(vocab.chars)
        for request, words in [
            ({"dataframe_records": [{"prompt": "ROMEO:", "chars": 5}]}, "unknown input field"),
            ({"dataframe_records": [{"prompt": "ROMEO:"}], "params": {"chars": -5}}, "'chars' must be >= 0"),
            ({"dataframe_records": [{"prompt": "ROMEO \u00e9"}]}, "not in the model's vocabulary"),
        ]:
            status, body = _post(port, request)
            assert 400 <= status < 500, (request, status, body)
            assert words in body["reason"] and "\n" not in body["reason"]
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()
    deadline = time.time() + 30  # uvicorn, make's grandchild, finishes its shutdown last
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
            time.sleep(0.5)
        except OSError:
            break
    else:
        pytest.fail(f"the scoring server still answers on port {port} after make serve was stopped")


def test_system_metrics_are_sampled_on_the_run_and_the_switch_turns_them_off(tiny_cfg, mlflow_uri):
    import dataclasses

    from charlm.tracking import NullTracker

    with MlflowTracker("tests", "sys") as tracker:
        tracker.start_system_metrics(interval=0.2)
        time.sleep(1.0)
    metrics = MlflowClient(mlflow_uri).get_run(tracker.run_id).data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(metrics)
    off = dataclasses.replace(tiny_cfg, train=dataclasses.replace(tiny_cfg.train, system_metrics=False))
    for cfg, expected in ((tiny_cfg, 2.0), (off, None)):
        null = NullTracker()
        train(cfg, null)
        assert null.system_metrics == expected and len(null.datasets) == 1
