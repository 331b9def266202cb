import dataclasses
import subprocess

import pytest

from charlm import config
from charlm.config import ConfigError
from helpers import PYTHON, ROOT


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_every_experiment_loads_and_validates(path):
    cfg = config.load(path)
    assert cfg.name == path.stem
    config.validate(cfg)


def test_defaults_are_frozen_and_overrides_apply():
    cfg = config.load(None, ["train.lr=1e-3", "model.kind=ff", "data.context=10"])
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.model.kind == "ff" and cfg.data.context == 10
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_overrides_win_over_file(tmp_path):
    f = tmp_path / "e.yaml"
    f.write_text("train: {lr: 1.0e-2, max_steps: 7}\n")
    cfg = config.load(f, ["train.max_steps=9"])
    assert (cfg.train.lr, cfg.train.max_steps) == (1e-2, 9)


def test_flatten_round_trips_through_dict():
    cfg = config.load(None, ["model.n_layer=3"])
    assert config.from_dict(config.to_dict(cfg)) == cfg
    assert config.flatten(cfg)["model.n_layer"] == 3


def _err(tmp_path, text, overrides=()):
    f = tmp_path / "exp.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        config.load(f, list(overrides))
    msg = str(e.value)
    assert "\n" not in msg
    return msg, f


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    msg, f = _err(tmp_path, "model:\n  n_layr: 3\n")
    assert msg == f"Unknown config key 'model.n_layr' in {f}; did you mean 'model.n_layer'?"


def test_unknown_section(tmp_path):
    msg, _ = _err(tmp_path, "trian:\n  lr: 1\n")
    assert "Unknown config key 'trian'" in msg


def test_wrong_type(tmp_path):
    msg, f = _err(tmp_path, "train:\n  lr: fast\n")
    assert msg == f"Config key 'train.lr' in {f} must be float, got str 'fast'"


def test_int_key_rejects_fraction(tmp_path):
    msg, _ = _err(tmp_path, "train:\n  max_steps: 10.5\n")
    assert "'train.max_steps'" in msg and "must be int" in msg


@pytest.mark.parametrize("text,key,expected", [
    ("data: {context: 0}", "data.context", "an integer >= 1"),
    ("model: {kind: rnnn}", "model.kind", "a built-in kind (gpt | ff | ngram | rnn) or a plugin's import path module:Class"),
    ("model: {n_embd: 100, n_head: 3}", "model.n_head", "a divisor of model.n_embd (100)"),
    ("model: {dropout: 1.5}", "model.dropout", "a number in [0, 1)"),
    ("train: {lr: -1}", "train.lr", "a number > 0"),
    ("data: {val_fraction: 0.7}", "data.val_fraction", "a fraction in (0, 0.5)"),
    ("train: {compile: maybe}", "train.compile", "one of auto | true | false"),
    ("train: {compile_mode: max-autotune}", "train.compile_mode", "one of auto | default | reduce-overhead"),
    ("train: {precision: true}", "train.precision", "one of auto | fp32 | bf16"),
])
def test_bad_values(tmp_path, text, key, expected):
    msg, f = _err(tmp_path, text + "\n")
    assert msg.startswith(f"Config key '{key}' in {f} must be {expected}, got ")


def test_compile_takes_yaml_booleans_and_words(tmp_path):
    """YAML reads `compile: true` as a boolean; the key holds the word, as --help and the docs say."""
    f = tmp_path / "c.yaml"
    f.write_text("train: {compile: true}\n")
    assert config.load(f).train.compile == "true"
    assert config.load(f, ["train.compile=false"]).train.compile == "false"
    assert config.load(None).train.compile == "auto"


def test_yaml_syntax_error_has_line(tmp_path):
    msg, f = _err(tmp_path, "model:\n  kind: gpt\n  n_layer: [1, 2\n")
    assert msg.startswith(f"YAML syntax error in {f} at line ")


def test_empty_and_missing_files(tmp_path):
    msg, _ = _err(tmp_path, "")
    assert "is empty" in msg
    with pytest.raises(ConfigError, match="Config file not found: nope.yaml"):
        config.load("nope.yaml")


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match=r"Bad --set 'train.lr': expected KEY=VALUE"):
        config.load(None, ["train.lr"])
    with pytest.raises(ConfigError, match=r"Unknown config key 'train.lrr' in --set train.lrr=1"):
        config.load(None, ["train.lrr=1"])


@pytest.mark.parametrize("content,needle", [
    ("model:\n  n_layr: 3\n", "Unknown config key 'model.n_layr'"),
    ("data:\n  path: no/such/file.txt\n", "Data file not found: no/such/file.txt"),
    ("train:\n  patience: -1\n", "Config key 'train.patience'"),
])
def test_cli_reports_config_errors_in_one_line(tmp_path, content, needle):
    f = tmp_path / "bad.yaml"
    f.write_text(content)
    r = subprocess.run([PYTHON, "-m", "charlm", "train", str(f), "--no-track"], capture_output=True,
                       text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "mlruns").exists()  # nothing written for a run that never started
