"""One tiny config for every test that trains, and a throwaway MLflow store per test."""

from __future__ import annotations

from pathlib import Path

import pytest

from charlm import config
from charlm.data import DEFAULT_NAME
from helpers import MIRROR


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    path = MIRROR / DEFAULT_NAME
    assert path.is_file(), f"tests need the corpus: set CHARLM_DATA_MIRROR to a folder holding {DEFAULT_NAME}"
    return path


@pytest.fixture(scope="session")
def tiny_text(shakespeare, tmp_path_factory) -> Path:
    """The first 30k characters of tiny shakespeare: real text, fast to train on."""
    path = tmp_path_factory.mktemp("data") / "tiny.txt"
    path.write_text(shakespeare.read_text(encoding="utf-8")[:30_000], encoding="utf-8")
    return path


@pytest.fixture
def tiny_cfg(tiny_text) -> config.Config:
    """A model small enough to train for 40 steps in about a second."""
    return config.load(None, [
        f"data.path={tiny_text}", "data.context=16",
        "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.hidden=64", "model.layers=2",
        "train.batch_size=8", "train.max_steps=40", "train.validation_interval=10", "train.warmup_steps=5",
        "train.eval_chars=1000", "train.sample_chars=40", "train.precision=fp32", "train.threads=1",
        "train.compile=false",  # a GPU machine runs this suite too: no test but the gpu ones compiles
        "experiment=tests", "name=tiny",
    ])


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    """A fresh SQLite MLflow store (artifacts beside it) for this test only."""
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri
