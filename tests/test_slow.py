"""Long checks (minutes): `make test-slow`. The shipped model's quality against nanoGPT's CPU recipe
is a benchmark (bench/recipe.py, in `make bench`): a long training does not belong in a test tier."""

import subprocess

import pytest

from helpers import PYTHON, ROOT


@pytest.mark.slow
def test_two_hundred_small_trials_with_two_workers_all_accounted():
    r = subprocess.run([PYTHON, str(ROOT / "bench" / "sweep_load.py"), "--trials", "200", "--workers", "2"],
                       capture_output=True, text=True, cwd=ROOT, timeout=1800)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.startswith("200 trials with 2 workers") and "'COMPLETE': 200" in r.stdout
