"""`make all`: the whole search to one deadline, as a user runs it (slow: minutes of wall clock,
the same on every machine, since the plan fits the work to the budget)."""

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ROOT, SMOKE, cli, mlflow_client


def make_all(cwd: Path, *variables: str, timeout: float) -> tuple[float, str]:
    """Run the commands `make all VARIABLES` runs (read from `make -n`), in ``cwd``, timed."""
    venv = Path(sys.executable).parent.parent
    shown = subprocess.run(["make", "-s", "-n", "-C", str(ROOT), "-o", f"{venv}/.installed", "all", f"VENV={venv}",
                            *variables], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    commands = [c for c in shown.stdout.splitlines() if c.strip()]
    assert len(commands) == 2 and " sweep " in commands[0] and " best " in commands[1], commands
    t0 = time.time()
    out = ""
    for c in commands:
        r = subprocess.run(shlex.split(c), capture_output=True, text=True, cwd=cwd, timeout=timeout)
        out += r.stdout + r.stderr
        assert r.returncode == 0, out[-3000:]
    return time.time() - t0, out


@pytest.mark.slow
def test_make_all_on_the_smoke_space_keeps_a_three_minute_budget(tmp_path):
    wall, out = make_all(tmp_path, "BUDGET=3m", f"SWEEP={SMOKE}", timeout=300)
    assert wall <= 3 * 60 + 4, out[-3000:]
    assert "plan for 3.0 min" in out and "registered models:/charlm-smoke/1" in out
    summary = json.loads((tmp_path / "mlruns" / "best" / "smoke" / "metrics.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["test_loss_mean"] < 2.0


@pytest.mark.slow
def test_make_all_on_the_users_own_text_sweeps_retrains_and_registers_on_it(tmp_path):
    # a UTF-8 text that is not tiny shakespeare: this project's own prose and code
    text = tmp_path / "project notes.txt"
    parts = [ROOT / "docs" / "REPORT.md", *sorted((ROOT / "charlm").glob("*.py"))]
    text.write_text("\n".join(p.read_text(encoding="utf-8") for p in parts), encoding="utf-8")
    wall, out = make_all(tmp_path, "BUDGET=5m", f"TEXT={text}", f"SWEEP={ROOT / 'sweeps' / 'default.yaml'}", timeout=600)
    assert wall <= 5 * 60 * 1.02 + 15, out[-3000:]
    study = "default-project-notes"
    assert f"registered models:/charlm-{study}/1" in out
    folder = tmp_path / "mlruns" / "best" / study
    summary = json.loads((folder / "metrics.json").read_text())
    # the registered model scores that text's own test split (the last 10% of it)
    r = cli("eval", "--model", str(folder), "--split", "test", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    scored = json.loads(r.stdout)
    assert scored["text"] == f"{text.name}:test"
    assert scored["chars"] == pytest.approx(len(text.read_text(encoding="utf-8")) * 0.1, rel=0.01)
    saved = next(row for row in summary["runs"] if row["seed"] == summary["saved_seed"])
    assert scored["loss"] == pytest.approx(saved["test_loss"], abs=1e-4)
    client = mlflow_client(tmp_path)
    version = client.get_model_version_by_alias(f"charlm-{study}", "champion")
    run = client.get_run(version.run_id)
    assert run.data.tags["optuna.study_name"] == study
