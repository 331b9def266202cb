"""A real tiny training run recorded in a real (temporary) MLflow store, read back with MlflowClient."""

import dataclasses
import json
import math
import subprocess

import pytest
from mlflow.tracking import MlflowClient

from charlm import checkpoint, config
from charlm.data import load_corpus
from charlm.tracking import MlflowTracker, NullTracker
from charlm.trainer import train
from helpers import PYTHON

PER_EVAL = ["train_loss", "val_loss", "val_perplexity", "val_bpc", "lr", "tokens_per_sec"]
FINAL = ["best_val_loss", "best_val_bpc", "best_step", "stopped_early", "test_loss", "test_bpc", "train_seconds"]


@pytest.fixture
def recorded_run(tiny_cfg, mlflow_uri, tmp_path):
    with MlflowTracker(tiny_cfg.experiment, tiny_cfg.name) as tracker:
        result = train(tiny_cfg, tracker)
        ckpt = tracker.artifact_uri("model/model.pt")
    return result, MlflowClient(mlflow_uri).get_run(result.run_id), ckpt


def test_run_records_params_metrics_tags_and_artifacts(recorded_run, tiny_cfg, mlflow_uri):
    result, run, _ = recorded_run
    client = MlflowClient(mlflow_uri)
    assert run.info.status == "FINISHED"
    params = run.data.params
    for key, value in config.flatten(tiny_cfg).items():
        assert params[key] == str(value)
    assert params["model_kind"] == "gpt" and int(params["n_params"]) == result.n_params
    assert len(params["data_sha256"]) == 64 and params["git_commit"]

    for key in PER_EVAL:
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [10, 20, 30, 40], key
        assert all(math.isfinite(m.value) for m in history)
    metrics = run.data.metrics
    for key in FINAL:
        assert key in metrics, key
    assert metrics["best_val_loss"] == pytest.approx(result.best_val_loss)
    assert metrics["best_val_bpc"] == pytest.approx(result.best_val_loss / math.log(2))
    assert metrics["stopped_early"] == 0 and "early_stop_step" not in metrics
    assert run.data.tags["stop_reason"] == "max_steps"

    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "model", "sample.txt", "loss_curve.png"} <= names
    assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/model.pt"]
    # the config artifact is the resolved config, loadable as an experiment
    cfg_file = client.download_artifacts(run.info.run_id, "config.yaml")
    assert config.load(cfg_file).train == tiny_cfg.train


def test_eval_cli_reproduces_the_logged_full_pass(recorded_run, tiny_cfg, tmp_path):
    result, run, ckpt = recorded_run
    corpus = load_corpus(tiny_cfg.data)
    start, end = corpus.split_bounds("val")
    val_text = tmp_path / "val.txt"
    val_text.write_text(corpus.path.read_text(encoding="utf-8")[start:end], encoding="utf-8")
    r = subprocess.run([PYTHON, "-m", "charlm", "eval", "--model", ckpt, "--text", str(val_text), "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["loss"] == pytest.approx(run.data.metrics["best_val_loss"], abs=1e-4)
    assert out["chars"] == end - start - 1
    assert out["bpc"] == pytest.approx(out["loss"] / math.log(2))


def test_checkpoint_carries_vocab_and_config(recorded_run, tiny_cfg):
    result, _, ckpt = recorded_run
    loaded = checkpoint.load(ckpt)
    assert loaded.cfg == tiny_cfg
    assert loaded.vocab == load_corpus(tiny_cfg.data).vocab
    assert loaded.meta["step"] == result.best_step


def test_early_stop_is_logged(tiny_cfg, mlflow_uri):
    cfg = dataclasses.replace(tiny_cfg, train=dataclasses.replace(
        tiny_cfg.train, patience=1, min_relative_improvement=0.9))
    with MlflowTracker(cfg.experiment, "early") as tracker:
        result = train(cfg, tracker)
    run = MlflowClient(mlflow_uri).get_run(result.run_id)
    assert run.data.tags["stop_reason"] == "early_stop"
    assert run.data.metrics["early_stop_step"] == 20 and run.data.metrics["stopped_early"] == 1


@pytest.mark.parametrize("schedule, steps", [("wsd", 30), ("cosine", 20)])
def test_a_wsd_run_out_of_patience_at_its_peak_decays_before_it_stops(tiny_cfg, tmp_path, schedule, steps):
    """Patience runs out at step 20. At wsd's peak learning rate the run first decays to the floor
    over decay_fraction (0.5) of its 20 steps, then stops; a resume from the state saved when
    patience ran out finishes that decay. Any other schedule stops at once."""
    cfg = config.override(tiny_cfg, {"train.schedule": schedule, "train.max_steps": 1000, "train.max_minutes": 10.0,
                                     "train.patience": 1, "train.min_relative_improvement": 0.9,
                                     "train.decay_fraction": 0.5, "train.min_lr_ratio": 0.1}, where="test")
    tracker = NullTracker(tmp_path)
    res = train(cfg, tracker)
    lrs = dict(tracker.metrics["lr"])
    assert res.stop_reason == "early_stop" and res.early_stop_step == 20 and res.steps == steps
    if schedule == "wsd":
        assert lrs[20] == cfg.train.lr and lrs[30] == pytest.approx(cfg.train.lr * 0.1)
        assert sorted(lrs) == [10, 20, 30]  # no rung or pruner evaluation in between, one at the decay's end
        pruned = train(cfg, NullTracker(tmp_path / "p"), on_eval=lambda e: "pruned" if e.step >= 20 else None)
        assert (pruned.stop_reason, pruned.steps) == ("early_stop", 30)  # the pruner cannot cut the decay short

        def interrupt(event):
            if event.step == 20:
                raise KeyboardInterrupt

        state = tmp_path / "state.pt"
        with pytest.raises(KeyboardInterrupt):
            train(cfg, NullTracker(tmp_path / "a"), state_path=state, on_eval=interrupt)
        resumed = train(cfg, NullTracker(tmp_path / "b"), state_path=state)
        assert (resumed.stop_reason, resumed.early_stop_step, resumed.steps) == ("early_stop", 20, 30)


def test_failed_run_is_marked_failed(tiny_cfg, mlflow_uri):
    def boom(event):
        raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError):
        with MlflowTracker(tiny_cfg.experiment, "boom") as tracker:
            train(tiny_cfg, tracker, on_eval=boom)
    run = MlflowClient(mlflow_uri).get_run(tracker.run_id)
    assert run.info.status == "FAILED" and "hook failed" in run.data.tags["error"]


def test_time_budget_and_hook_stop(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, train=dataclasses.replace(tiny_cfg.train, max_minutes=1e-6, max_steps=1000))
    res = train(cfg, NullTracker())
    assert res.stop_reason == "max_minutes" and res.steps == 1 and math.isfinite(res.test_loss)
    seen = []
    res = train(tiny_cfg, NullTracker(), on_eval=lambda e: seen.append(e.step) or ("pruned" if e.step == 20 else None))
    assert res.stop_reason == "pruned" and res.steps == 20 and seen == [10, 20]


def test_same_seed_same_result(tiny_cfg):
    a = train(tiny_cfg, NullTracker())
    b = train(tiny_cfg, NullTracker())
    assert a.best_val_loss == pytest.approx(b.best_val_loss, abs=1e-6)
    c = train(dataclasses.replace(tiny_cfg, train=dataclasses.replace(tiny_cfg.train, seed=1)), NullTracker())
    assert c.best_val_loss != pytest.approx(a.best_val_loss, abs=1e-6)


def test_ff_trains_and_beats_unigram(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model, kind="ff"),
                              train=dataclasses.replace(tiny_cfg.train, max_steps=150, validation_interval=50))
    res = train(cfg, NullTracker())
    assert res.best_val_loss < 3.0  # unigram entropy of this text is about 3.3 nats


def test_ctrl_c_ends_the_run_killed_and_keeps_the_best_checkpoint(tiny_text, tmp_path):
    import os
    import signal
    import time

    exp = tmp_path / "long.yaml"
    exp.write_text(f"experiment: ctrlc\ndata: {{path: '{tiny_text}', context: 16}}\n"
                   "model: {n_layer: 1, n_embd: 32, n_head: 2}\n"
                   "train: {max_steps: 100000, validation_interval: 20, eval_chars: 500, threads: 1,\n"
                   "        compile: 'false'}\n")  # Ctrl-C is the subject: no compile on a GPU machine's clock
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    # as from a terminal: a shell that starts jobs in the background makes them ignore SIGINT
    proc = subprocess.Popen([PYTHON, "-m", "charlm", "train", str(exp)], cwd=tmp_path,
                            env={**os.environ, "MLFLOW_TRACKING_URI": uri},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    client, run_id = MlflowClient(uri), None
    deadline = time.time() + 120
    while run_id is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        if not (tmp_path / "mlruns" / "mlflow.db").exists():
            continue
        found = client.get_experiment_by_name("ctrlc")
        runs = client.search_runs([found.experiment_id]) if found else []
        if runs and "val_loss" in runs[0].data.metrics:  # at least one evaluation, so a best checkpoint
            run_id = runs[0].info.run_id
    assert run_id, f"training never reached an evaluation: {proc.poll()} {proc.stderr.read() if proc.poll() else ''}"
    proc.send_signal(signal.SIGINT)
    t0 = time.time()
    assert proc.wait(timeout=30) == 130
    assert time.time() - t0 < 10
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["stop_reason"] == "interrupted"
    assert [a.path for a in client.list_artifacts(run_id, "model")] == ["model/model.pt"]
    assert checkpoint.load(client.download_artifacts(run_id, "model/model.pt")).meta["step"] >= 20


def test_divergence_stops_the_run(tiny_cfg):
    for lr in (10.0, 1e6):  # one drifts to ~10 nats, the other to NaN
        cfg = dataclasses.replace(tiny_cfg, train=dataclasses.replace(tiny_cfg.train, lr=lr, warmup_steps=0))
        res = train(cfg, NullTracker())
        assert res.stop_reason == "diverged" and res.steps <= 10, lr


@pytest.mark.parametrize("sync", [True, False], ids=["cpu-every-step", "cuda-at-evaluations"])
def test_a_loss_that_is_not_finite_stops_the_run_at_once_or_at_the_next_evaluation(tiny_cfg, sync):
    """On CPU each step's loss is read at once; on CUDA the sum stays on the device (no per-step
    sync) and a NaN is caught at the next evaluation. Either way the run ends DIVERGED, and a run
    never keeps weights from after the divergence as its best."""
    from charlm.loop import Loop, LossMeter, StopReason
    from charlm.trainer import resume, setup

    t = dataclasses.replace(tiny_cfg.train, lr=1e6, warmup_steps=0, validation_interval=10)
    run = setup(dataclasses.replace(tiny_cfg, train=t), NullTracker(), None)
    loop = Loop(run, resume(run, None), None, None)
    loop.losses = LossMeter(sync=sync)  # what the device decides; the CUDA branch tested here on CPU
    assert loop.until_stop(progress=False) is StopReason.DIVERGED
    if sync:
        assert loop.state.step < t.validation_interval and not loop.state.history
    else:
        assert loop.state.step == t.validation_interval
        assert not math.isfinite(loop.state.history[-1]["train_loss"])
    assert loop.state.best_state is None  # no evaluation was ever good enough to keep


@pytest.mark.slow  # compiling even a tiny model takes tens of seconds on 2 cores
def test_compiled_training_reaches_the_loss_of_eager_training(tiny_cfg):
    """train.compile=true on CPU: the same run, the step through torch.compile, lands within
    noise of the eager run, and the compile time is logged."""
    t = dataclasses.replace(tiny_cfg.train, max_steps=60)
    runs = {}
    for setting in ("false", "true"):
        tracker = NullTracker()
        cfg = dataclasses.replace(tiny_cfg, train=dataclasses.replace(t, compile=setting))
        runs[setting] = (train(cfg, tracker), tracker)
    eager, (compiled, tracker) = runs["false"][0], runs["true"]
    assert tracker.params["compiled"] == "True" and runs["false"][1].params["compiled"] == "False"
    assert tracker.metrics["compile_seconds"][0][1] > 0
    assert compiled.steps == eager.steps == 60
    assert abs(compiled.best_val_loss - eager.best_val_loss) < 0.05


def test_interrupted_run_resumes_from_its_saved_state_to_the_same_result(tiny_cfg, tmp_path):
    """With state_path, a run stopped at step 20 and started again carries on from step 20
    (weights, optimizer moments, batch order, patience) and ends exactly where an
    uninterrupted run ends; the finished run removes its state file."""
    straight = train(tiny_cfg, NullTracker())
    state = tmp_path / "state.pt"

    def interrupt(event):
        if event.step == 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg, NullTracker(), on_eval=interrupt, state_path=state)
    assert state.is_file()
    tracker = NullTracker()
    resumed = train(tiny_cfg, tracker, state_path=state)
    assert tracker.tags["resumed_from_step"] == "20"
    assert [s for s, _ in tracker.metrics["val_loss"]] == [10, 20, 30, 40]  # the curve is whole
    assert resumed.steps == straight.steps == 40
    assert resumed.best_val_loss == pytest.approx(straight.best_val_loss, abs=1e-6)
    assert resumed.test_loss == pytest.approx(straight.test_loss, abs=1e-6)
    assert not state.exists()
    # a state file from another config is not used: the run starts over
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg, NullTracker(), on_eval=interrupt, state_path=state)
    other = config.override(tiny_cfg, {"train.lr": 1e-3}, where="test")
    tracker = NullTracker()
    train(other, tracker, state_path=state)
    assert "resumed_from_step" not in tracker.tags


@pytest.mark.parametrize("keeps_state", [False, True], ids=["plain-run", "with-resume-state"])
def test_a_run_with_a_resume_state_writes_its_checkpoint_once_and_a_plain_run_at_each_new_best(tiny_cfg, tmp_path,
                                                                                                keeps_state):
    """A run with a state_path (a sweep's trial, a `best` seed) saves its state at each evaluation,
    best weights included, and no checkpoint until it logs one: on a GPU each write is seconds of a
    trial's clock. A plain run writes its checkpoint at each new best, so a kill leaves the best so
    far. Either way the checkpoint it ends with holds its best weights."""
    tracker = NullTracker()
    ckpt = tracker.workdir / "model" / checkpoint.FILENAME
    seen = []
    result = train(tiny_cfg, tracker, on_eval=lambda event: seen.append(ckpt.is_file()),
                   state_path=tmp_path / "state.pt" if keeps_state else None)
    assert seen == [not keeps_state] * 4
    kept = checkpoint.load(ckpt)
    assert (kept.meta["step"], kept.meta["val_loss"]) == (result.best_step, result.best_val_loss)


def test_a_state_saved_at_a_new_best_holds_the_weights_once_and_always_restores_the_best(tiny_cfg, tmp_path):
    """The state written at every evaluation leaves out the best weights when they are the model's
    (a new best at that evaluation), so it writes a quarter less; saved after the model moved past
    its best, it keeps them apart. Restored, both give back the model and the best as they were."""
    import torch

    from charlm.loop import TrainState
    from charlm.trainer import resume, setup

    def weights(model):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def same(a, b):  # on the CPU: a state is loaded there, a CUDA run's model holds its weights on the GPU
        return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)

    run = setup(tiny_cfg, NullTracker(), None)
    state, path = resume(run, None), tmp_path / "state.pt"
    state.step = 10
    state.stop.update(10, 2.0)  # a new best: the weights now are the best
    state.best_state = best = weights(run.model)
    state.save(path, run)
    at_best = path.stat().st_size
    assert torch.load(path, weights_only=True)["loop"]["best_state"] is None
    restored = setup(tiny_cfg, NullTracker(), None)
    assert same(TrainState.load(path, restored).best_state, best) and same(weights(restored.model), best)

    with torch.no_grad():  # trained on past its best: a worse evaluation
        for p in run.model.parameters():
            p.add_(0.5)
    state.step = 20
    state.stop.update(20, 3.0)
    state.save(path, run)
    assert path.stat().st_size > at_best * 1.1  # the best is written apart now
    restored = setup(tiny_cfg, NullTracker(), None)
    loaded = TrainState.load(path, restored)
    assert same(loaded.best_state, best) and same(weights(restored.model), weights(run.model))
    assert not same(best, weights(run.model))


def test_a_promoted_rung_that_finds_no_new_best_still_logs_the_best_model(tiny_cfg, tmp_path, mlflow_uri,
                                                                             monkeypatch):
    """A promoted trial goes on in a new process, whose scratch folder has no checkpoint yet; when
    its rung ends before any new best (on a GPU, a compile can take most of a short rung), the best
    weights it restored are written and logged, not a missing file (found on an H200)."""
    import torch

    from charlm import loop

    cfg = config.override(tiny_cfg, {"train.max_steps": 1000}, where="test")
    state = tmp_path / "state.pt"
    first = train(cfg, NullTracker(), state_path=state, until=0.0, progress=False)  # rung 0: one step
    assert first.stop_reason is loop.StopReason.RUNG_END and first.best_step == 1
    step = loop.Loop.step

    def worse_step(self, lr):  # the promoted rung's one step leaves the model worse than its best
        done = step(self, lr)
        with torch.no_grad():
            for p in self.run.model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)).to(p.device) * 0.3)
        return done

    monkeypatch.setattr(loop.Loop, "step", worse_step)
    with MlflowTracker(cfg.experiment, "promoted") as tracker:
        second = train(cfg, tracker, state_path=state, until=0.0, continued=True, progress=False)
    assert second.stop_reason is loop.StopReason.RUNG_END and second.steps == 2 and second.best_step == 1
    client = MlflowClient(mlflow_uri)
    kept = checkpoint.load(client.download_artifacts(tracker.run_id, "model/model.pt"))
    assert kept.meta["step"] == 1


def test_ctrl_c_after_a_resume_before_any_new_best_ends_killed_with_the_restored_best(tiny_cfg, tmp_path,
                                                                                       mlflow_uri, monkeypatch):
    """`make best` resumes a seed, and Ctrl-C comes before its first new evaluation: the checkpoint
    of this run does not exist yet, so the restored best weights are written and logged; the run
    ends KILLED (not FAILED with a traceback)."""
    from charlm import loop

    state = tmp_path / "state.pt"

    def interrupt(event):
        if event.step == 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg, NullTracker(), on_eval=interrupt, state_path=state, progress=False)

    def ctrl_c(self, lr):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop.Loop, "step", ctrl_c)  # the first step after resuming is interrupted
    with pytest.raises(KeyboardInterrupt), MlflowTracker(tiny_cfg.experiment, "resumed") as tracker:
        train(tiny_cfg, tracker, state_path=state, progress=False)
    client = MlflowClient(mlflow_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "KILLED" and run.data.tags["stop_reason"] == "interrupted"
    assert run.data.tags["resumed_from_step"] == "20"
    assert [a.path for a in client.list_artifacts(tracker.run_id, "model")] == ["model/model.pt"]
    kept = checkpoint.load(client.download_artifacts(tracker.run_id, "model/model.pt"))
    assert kept.meta["step"] in (10, 20) and state.is_file()  # the state stays for the next resume
