"""Workers without training: per-trial sampler seeds. In-process, on journal storages."""

from __future__ import annotations

import pytest
import yaml

from charlm.space import load_sweep, suggest
from charlm.storage import open_study
from helpers import ROOT

SMOKE = ROOT / "sweeps" / "smoke.yaml"


def _spec(tmp_path, sampler: str = "random"):
    doc = yaml.safe_load(SMOKE.read_text())
    doc.pop("baseline")
    doc["base"] = str(ROOT / "experiments" / "gpt.yaml")
    doc["study"] = {"name": "w", "n_trials": 6}
    doc["sampler"] = {"type": sampler, "seed": 0, "n_startup_trials": 2}
    f = tmp_path / "w.yaml"
    f.write_text(yaml.safe_dump(doc))
    return load_sweep(f)


def _draw(spec, url: str, n: int) -> list[tuple]:
    """``n`` trials asked, suggested and told by a freshly opened study (as a new process would)."""
    study = open_study(spec, url, create=True)
    out = []
    for _ in range(n):
        trial = study.ask()
        values = suggest(trial, spec)
        study.tell(trial, float(values["train.lr"]))
        out.append(tuple(sorted(trial.params.items())))
    return out


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_a_resumed_study_never_replays_and_a_fresh_one_reproduces(tmp_path, sampler):
    spec = _spec(tmp_path, sampler)
    resumed = _draw(spec, f"journal:{tmp_path / 'a.journal'}", 3) + _draw(spec, f"journal:{tmp_path / 'a.journal'}", 3)
    assert len(set(resumed)) == 6  # the second call does not start the first one's stream again
    # the same seed from a fresh storage proposes the same trials, resumed or not
    assert _draw(spec, f"journal:{tmp_path / 'b.journal'}", 6) == resumed


def test_two_processes_on_one_study_draw_distinct_trials(tmp_path):
    spec = _spec(tmp_path)
    url = f"journal:{tmp_path / 'c.journal'}"
    a, b = open_study(spec, url, create=True), open_study(spec, url)  # each "worker 0" with seed 0
    params = []
    for _ in range(4):
        for study in (a, b):
            trial = study.ask()
            suggest(trial, spec)
            study.tell(trial, 1.0)
            params.append(tuple(sorted(trial.params.items())))
    assert len(set(params)) == 8
