"""Long checks (minutes): `make test-slow`. Quality regressions show up here, not in `make test`."""

import re
import subprocess

import pytest

from helpers import PYTHON, ROOT


@pytest.mark.slow
def test_shipped_gpt_experiment_beats_nanogpts_cpu_recipe(tmp_path):
    # nanoGPT's CPU recipe scores 1.886 nats/char on these test characters (its val split). The
    # shipped 5-minute clock trained 768 steps on the reference 2-core machine (docs/results.md, One model);
    # the test trains those steps, not the clock, so that every machine checks the same model:
    # on a 2-core AVX2 machine without bf16 the clock reached 2.35, and the steps take ~30 min
    # there (speed is `make bench`'s, never a test's)
    r = subprocess.run([PYTHON, "-m", "charlm", "train", str(ROOT / "experiments" / "gpt.yaml"), "--no-track",
                        "--out", str(tmp_path), "--set", "train.max_minutes=0", "--set", "train.max_steps=768"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=3600)
    assert r.returncode == 0, r.stderr[-2000:]
    test_loss = float(re.search(r"test loss ([0-9.]+)", r.stdout).group(1))
    assert test_loss < 1.886
    assert (tmp_path / "model.pt").is_file()


@pytest.mark.slow
def test_two_hundred_small_trials_with_two_workers_all_accounted():
    r = subprocess.run([PYTHON, str(ROOT / "bench" / "sweep_load.py"), "--trials", "200", "--workers", "2"],
                       capture_output=True, text=True, cwd=ROOT, timeout=1800)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.startswith("200 trials with 2 workers") and "'COMPLETE': 200" in r.stdout
