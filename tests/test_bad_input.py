"""Bad input, round two: every case gets one line naming the key or file and the fix, exit code 2,
and nothing written to MLflow or Optuna. Most cases call the CLI's own ``main`` in-process (fast);
a few real processes show the exit code, the one line and the absent traceback."""

from __future__ import annotations

import math

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

from charlm import __main__ as cli_main
from charlm import checkpoint, config, interrupts
from charlm.config import ConfigError
from charlm.data import CharVocab
from charlm.models import build_model
from charlm.objective import _tell, trial_state
from charlm.sweepfile import SweepError, load_sweep
from charlm.tracking import NullTracker
from charlm.trainer import StopReason, train
from helpers import ROOT, cli


@pytest.fixture
def run_main(monkeypatch, capsys, tmp_path):
    """``python -m charlm ARGS`` in this process: (exit code, stdout, stderr); cwd is a temp folder."""
    monkeypatch.setattr(interrupts, "install", lambda: None)  # leave pytest's signal handlers alone
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def run(*args: str) -> tuple[int, str, str]:
        code = cli_main.main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err
    return run


def one_line(code: int, err: str, *needles: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def nothing_written(tmp_path) -> None:
    assert not (tmp_path / "mlruns").exists(), "a refused command wrote to MLflow or Optuna"


@pytest.fixture
def exp(tmp_path, tiny_text):
    f = tmp_path / "tiny.yaml"
    f.write_text(f"data: {{path: '{tiny_text}', context: 16}}\nmodel: {{n_layer: 1, n_embd: 32, n_head: 2}}\n")
    return f


# ----------------------------------------------------------------------------- config values


@pytest.mark.parametrize("setting,needle", [
    ("train.eval_chars=1", "Config key 'train.eval_chars' in --set train.eval_chars=1 must be 0 (all of val) "
                           "or an integer >= 2, got 1"),
    ("train.beta1=1.0", "Config key 'train.beta1' in --set train.beta1=1.0 must be a number in [0, 1), got 1.0"),
    ("train.beta2=1", "Config key 'train.beta2' in --set train.beta2=1 must be a number in [0, 1), got 1.0"),
    ("experiment=", "Config key 'experiment' in --set experiment= must be a non-empty MLflow experiment name"),
    ("model.mix_order=18", "Config key 'model.mix_order' in --set model.mix_order=18 must be an integer in "
                           "[0, 10] and at most data.context + 1 (17), got 18"),
    ("train.seed=-1", "Config key 'train.seed'"),
])
def test_values_the_consuming_code_refuses_are_refused_by_validation(run_main, exp, tmp_path, setting, needle):
    one_line(*run_main("train", exp, "--set", setting)[::2], needle)
    nothing_written(tmp_path)


def test_mixture_longer_than_the_context(tmp_path):
    f = tmp_path / "mix.yaml"
    f.write_text("data: {context: 4}\nmodel: {mix_order: 6}\n")
    with pytest.raises(ConfigError, match=r"'model.mix_order' in .*mix.yaml must be an integer in \[0, 10\] and "
                                          r"at most data.context \+ 1 \(5\), got 6"):
        config.load(f)
    assert config.load(f, ["model.mix_order=5"]).model.mix_order == 5


def test_empty_experiment_in_a_file_never_reaches_mlflow(run_main, tmp_path, tiny_text):
    f = tmp_path / "e.yaml"
    f.write_text(f"experiment: ''\ndata: {{path: '{tiny_text}'}}\n")
    one_line(*run_main("train", f)[::2], "Config key 'experiment'", "non-empty")
    nothing_written(tmp_path)


def test_ngram_order_that_overflows_for_the_corpus(run_main, tmp_path):
    text = tmp_path / "wide.txt"
    alphabet = "".join(chr(0x100 + i) for i in range(100))  # 100 distinct characters
    text.write_text(alphabet * 50, encoding="utf-8")
    f = tmp_path / "e.yaml"
    f.write_text(f"data: {{path: '{text}', context: 16}}\nmodel: {{mix_order: 10}}\n")
    one_line(*run_main("train", f)[::2], "'model.mix_order'", "overflow", "expected model.mix_order <= 9")
    nothing_written(tmp_path)


# ----------------------------------------------------------------------------- --set and --dry-run


def test_set_takes_several_values_after_one_flag_and_the_flag_repeated(run_main, exp, tmp_path):
    code, out, err = run_main("train", exp, "--set", "train.lr=1e-3", "model.n_layer=2", "--set",
                              "train.seed=3", "--dry-run")
    assert code == 0, err
    cfg = yaml.safe_load(out)
    assert (cfg["train"]["lr"], cfg["model"]["n_layer"], cfg["train"]["seed"]) == (1e-3, 2, 3)
    assert "nothing trained" in err
    nothing_written(tmp_path)


def test_makefile_set_still_expands_to_repeated_flags():
    import subprocess

    r = subprocess.run(["make", "-n", "train", "VENV=.venv-none", "SET=train.lr=1e-3 model.n_layer=2"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert "--set train.lr=1e-3 --set model.n_layer=2" in r.stdout, r.stdout + r.stderr


def test_train_dry_run_validates_data_and_creates_nothing(tmp_path, tiny_text):
    f = tmp_path / "e.yaml"
    f.write_text(f"data: {{path: '{tiny_text}', context: 16}}\n")
    r = cli("train", str(f), "--dry-run", "--set", "train.max_steps=7", "model.kind=ff", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load(r.stdout)["train"]["max_steps"] == 7
    nothing_written(tmp_path)
    r = cli("train", str(f), "--dry-run", "--set", "data.context=30000", cwd=tmp_path)  # the data is checked
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "too short for data.context=30000" in r.stderr
    assert "Traceback" not in r.stderr
    nothing_written(tmp_path)


# ----------------------------------------------------------------------------- data and --text


def _bad_texts(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"\x00\x01\x02abc" * 100)  # valid UTF-8, still not text
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("x")
    return {"folder": folder, "binary": binary, "empty": empty, "short": short}


@pytest.mark.parametrize("case,needle", [
    ("folder", "is a folder; set data.path to a UTF-8 text file"),
    ("binary", "looks binary (a NUL character at offset 0)"),
    ("empty", "is empty"),
    ("short", "too short for data.context=128"),
])
def test_bad_data_path(run_main, tmp_path, case, needle):
    path = _bad_texts(tmp_path)[case]
    one_line(*run_main("train", "--dry-run", ROOT / "experiments" / "gpt.yaml", "--set", f"data.path={path}")[::2],
             needle)
    nothing_written(tmp_path)


@pytest.fixture
def untrained_model(tmp_path, tiny_text):
    """A checkpoint of an untrained gpt (no training needed to test argument checks)."""
    cfg = config.load(None, [f"data.path={tiny_text}", "data.context=16", "model.n_layer=1", "model.n_embd=16",
                             "model.n_head=1"])
    vocab = CharVocab.from_text(tiny_text.read_text(encoding="utf-8"))
    return checkpoint.save(tmp_path / "ck" / "model.pt", build_model(cfg, len(vocab)), cfg, vocab, {})


@pytest.mark.parametrize("case,needle", [
    ("folder", "is a folder; give --text a UTF-8 text file"),
    ("binary", "looks binary"),
    ("empty", "fewer than 2 characters"),
    ("short", "fewer than 2 characters"),
])
def test_bad_eval_text(run_main, untrained_model, tmp_path, case, needle):
    path = _bad_texts(tmp_path)[case]
    one_line(*run_main("eval", "--model", untrained_model, "--text", path)[::2], needle)


def test_eval_text_shorter_than_the_context_is_scored(run_main, untrained_model, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("To be")  # 5 characters, context 16: every character still gets its preceding ones
    code, out, err = run_main("eval", "--model", untrained_model, "--text", f)
    assert code == 0 and "over 4 characters" in out, err


# ----------------------------------------------------------------------------- sample and checkpoints


@pytest.mark.parametrize("args,needle", [
    (["--top-k", "-1"], "--top-k must be an integer >= 1"),
    (["--top-k", "0"], "--top-k must be an integer >= 1"),
    (["--chars", "-5"], "--chars must be >= 0"),
    (["--temperature", "nan"], "--temperature must be a number >= 0"),
])
def test_bad_sample_arguments(run_main, untrained_model, args, needle):
    one_line(*run_main("sample", "--model", untrained_model, *args)[::2], needle)


@pytest.mark.parametrize("drop", ["config", "vocab", "model"])
def test_checkpoint_in_our_format_without_an_entry(run_main, untrained_model, tmp_path, drop):
    blob = torch.load(untrained_model, weights_only=True)
    del blob[drop]
    f = tmp_path / f"no-{drop}.pt"
    torch.save(blob, f)
    one_line(*run_main("sample", "--model", f)[::2], f"has no usable '{drop}' entry", "missing")


def test_checkpoint_without_config_by_the_real_cli(untrained_model, tmp_path):
    blob = torch.load(untrained_model, weights_only=True)
    del blob["config"]
    f = tmp_path / "no-config.pt"
    torch.save(blob, f)
    r = cli("eval", "--model", str(f), "--split", "val")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no usable 'config' entry" in r.stderr
    assert "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- sweeps


def _sweep(tmp_path, **changes) -> str:
    doc = {"study": {"name": "t", "n_trials": 2}, "base": str(ROOT / "experiments" / "gpt.yaml"),
           "space": {"model.kind": {"choice": ["gpt", "ff"]}, "train.lr": {"float": [1e-4, 1e-2], "log": True}}}
    for k, v in changes.items():
        doc[k] = {**doc.get(k, {}), **v} if isinstance(v, dict) and k != "space" else v
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(doc))
    with pytest.raises(SweepError) as e:
        load_sweep(f)
    msg = str(e.value)
    assert "\n" not in msg and str(f) in msg
    return msg


def test_float_range_on_an_integer_key(tmp_path):
    msg = _sweep(tmp_path, space={"model.n_layer": {"float": [1, 4]}})
    assert "'space.model.n_layer'" in msg and "an int range (or a choice): model.n_layer is an integer key" in msg
    msg = _sweep(tmp_path, space={"model.kind": {"int": [0, 2]}})
    assert "a choice: model.kind holds a str, not a number" in msg


def test_maximize_a_loss(tmp_path):
    msg = _sweep(tmp_path, study={"direction": "maximize"})
    assert "'study.direction'" in msg and "minimize for study.metric val_loss" in msg


@pytest.mark.parametrize("changes,needle", [
    ({"space": {"data.test_fraction": {"float": [0.05, 0.2]}}}, "'data.test_fraction' in {f} (space) would move"),
    ({"space": {"data.val_fraction": {"choice": [0.05, 0.1]}}}, "'data.val_fraction' in {f} (space) would score"),
    ({"space": {"model.kind": {"choice": ["gpt", "ff"]}, "when": {"model.kind == ff": {"data.test_fraction": 0.2}}}},
     "'data.test_fraction' in {f} (space) would move"),
    ({"fixed": {"data.test_fraction": 0.2}}, "'data.test_fraction' in {f} (fixed) would move the test split"),
    ({"best": {"set": {"data.test_fraction": 0.05}}}, "'data.test_fraction' in {f} (best.set) would move"),
    ({"best": {"set": {"data.path": "other.txt"}}}, "'data.path' in {f} (best.set) would move"),
])
def test_the_test_split_cannot_move(tmp_path, changes, needle):
    msg = _sweep(tmp_path, **changes)
    assert needle.format(f=tmp_path / "s.yaml") in msg


def test_the_baseline_is_tested_on_the_same_split(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("data: {test_fraction: 0.2}\n")
    msg = _sweep(tmp_path, base=str(base), baseline=str(ROOT / "experiments" / "ngram.yaml"))
    assert "Baseline experiment" in msg and "data.test_fraction: 0.1, the base experiment 0.2" in msg


def test_split_values_equal_to_the_base_and_val_size_in_best_set_are_allowed(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({
        "study": {"name": "t"}, "base": str(ROOT / "experiments" / "gpt.yaml"),
        "fixed": {"data.test_fraction": 0.1, "data.val_fraction": 0.05},
        "space": {"train.lr": {"float": [1e-4, 1e-2]}}, "best": {"set": {"data.val_fraction": 0.01}}}))
    assert load_sweep(f).best.set == {"data.val_fraction": 0.01}


def test_best_set_must_hold_at_every_corner_of_the_space(tmp_path):
    msg = _sweep(tmp_path, space={"data.context": {"choice": [4, 64]}}, best={"set": {"model.mix_order": 8}})
    assert "(best.set, with space data.context=4)" in msg and "'model.mix_order'" in msg


def test_sweep_and_best_cli_refuse_before_writing(run_main, tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"study": {"name": "t", "direction": "maximize"},
                                 "base": str(ROOT / "experiments" / "gpt.yaml"),
                                 "space": {"model.n_layer": {"int": [1, 2]}}}))
    one_line(*run_main("sweep", f)[::2], "'study.direction'")
    f.write_text(yaml.safe_dump({"study": {"name": "t"}, "base": str(ROOT / "experiments" / "gpt.yaml"),
                                 "space": {"model.n_layer": {"int": [1, 2]}}}))
    one_line(*run_main("best", f, "--seeds", "0", "-1")[::2],
             "Config key 'train.seed' in --seeds must be an integer in [0, 4294967295], got -1")  # the limit in full
    nothing_written(tmp_path)


def test_a_sweep_whose_corpus_cannot_be_found_says_so_before_writing(run_main, tmp_path, monkeypatch):
    # no checkout copy, no mirror, a download that fails with "connection refused": the fault is the
    # missing text, not the Optuna storage the trials would have blamed (their words are a store's)
    from charlm import paths

    monkeypatch.setattr(paths, "REPO_ROOT", tmp_path / "checkout")
    monkeypatch.setenv("CHARLM_DATA_MIRROR", str(tmp_path / "no-mirror"))
    monkeypatch.setenv("CHARLM_DATA_URL", "http://127.0.0.1:9/tinyshakespeare.txt")
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"study": {"name": "t", "n_trials": 1}, "base": str(ROOT / "experiments" / "gpt.yaml"),
                                 "space": {"model.n_layer": {"int": [1, 2]}}}))
    line = one_line(*run_main("sweep", f)[::2], "Cannot find the tiny shakespeare corpus", "CHARLM_DATA_MIRROR")
    assert "Optuna storage" not in line
    nothing_written(tmp_path)


def test_charlms_own_error_is_not_read_as_a_store_failing_unless_a_store_caused_it():
    from charlm.data import DataError
    from charlm.tracking import outside

    assert not outside(DataError("Cannot find the corpus; download failed (name or service not known)"))
    try:
        try:
            open("/nonexistent/text.txt")
        except OSError:
            raise DataError("Cannot read /nonexistent/text.txt") from None
    except DataError as e:
        assert outside(e)  # what caused it, a disk's error, still counts
    assert outside(RuntimeError("connection refused"))


# ----------------------------------------------------------------------------- divergence


def test_a_trial_that_diverges_after_a_good_evaluation_completes_with_its_best_value(tiny_cfg, monkeypatch):
    import charlm.trainer as train_mod

    runs = []
    setup = train_mod.setup
    monkeypatch.setattr(train_mod, "setup", lambda *a: runs.append(setup(*a)) or runs[-1])

    def blow_up(ev):  # after the first (good) evaluation, wreck the weights: the next one diverges
        if ev.step == 10:
            with torch.no_grad():
                for p in runs[0].model.parameters():
                    p.mul_(1e4)

    tracker = NullTracker()
    result = train(tiny_cfg, tracker, on_eval=blow_up, progress=False)
    assert result.stop_reason is StopReason.DIVERGED and tracker.tags["stop_reason"] == "diverged"
    assert result.best_step == 10 and math.isfinite(result.best_val_loss) and result.checkpoint is not None
    assert trial_state(result) is TrialState.COMPLETE
    study = optuna.create_study()
    _tell(study, study.ask(), result, trial_state(result))
    assert study.trials[0].state is TrialState.COMPLETE and study.trials[0].value == result.slice_val_loss
    assert study.trials[0].user_attrs["stop_reason"] == "diverged"


def test_a_trial_that_diverges_before_any_good_evaluation_fails(tiny_cfg):
    cfg = config.override(tiny_cfg, {"train.lr": 1e6, "train.warmup_steps": 0}, where="test")
    result = train(cfg, NullTracker(), progress=False)
    assert result.stop_reason is StopReason.DIVERGED and result.checkpoint is None
    assert math.isnan(result.best_val_loss) and trial_state(result) is TrialState.FAIL


def test_a_baseline_that_fails_leaves_no_study_run_running(tmp_path):
    """The baseline's 6-gram overflows 64-bit ids over a 1,500-character alphabet: one line, exit 2,
    and the study's parent run, already created, ends FAILED rather than RUNNING for ever."""
    from helpers import SMOKE, mlflow_client

    text = tmp_path / "wide.txt"
    alphabet = "".join(chr(0x4E00 + i) for i in range(1500))
    text.write_text((alphabet + "\n") * 12, encoding="utf-8")
    r = cli("sweep", str(SMOKE), "--text", str(text), cwd=tmp_path)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.startswith("error: ") and "overflows 64-bit ids" in last, r.stderr
    assert "Traceback" not in r.stderr
    client = mlflow_client(tmp_path)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and all(x.info.status != "RUNNING" for x in runs), [(x.info.run_name, x.info.status) for x in runs]


def test_a_full_store_met_in_an_autoflush_is_named_as_full_not_as_sqlalchemy_words(tmp_path):
    """SQLAlchemy's autoflush puts "(raised as a result of Query-invoked autoflush ...)" before the
    driver's words; the one line must quote the driver's ("database or disk is full"). A real SQLite
    file capped at its current pages, a real ORM session, wrapped as MLflow's session maker wraps it."""
    import sqlalchemy as sa
    from mlflow.exceptions import MlflowException
    from sqlalchemy.orm import Session, declarative_base

    from charlm.tracking import unavailable

    Base = declarative_base()

    class Row(Base):
        __tablename__ = "rows"
        id = sa.Column(sa.Integer, primary_key=True)
        text = sa.Column(sa.Text)

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'full.db'}")
    Base.metadata.create_all(engine)
    sa.event.listen(engine, "connect", lambda conn, _: conn.execute("PRAGMA max_page_count = 3"))
    engine.dispose()  # the cap holds on every new connection
    with Session(engine) as session, pytest.raises(sa.exc.OperationalError) as raised:
        session.add(Row(text="x" * 100_000))
        session.query(Row).count()  # the autoflush meets the cap
    assert "autoflush" in str(raised.value).splitlines()[0]
    try:
        raise MlflowException(message=raised.value) from raised.value
    except MlflowException as e:
        line = str(unavailable("sqlite:///mlruns/mlflow.db", "logging metrics", e))
    assert "database or disk is full" in line and "autoflush" not in line, line
    assert "df -h mlruns" in line and "curl" not in line, line  # the fix for a file: its disk, not a server's health
