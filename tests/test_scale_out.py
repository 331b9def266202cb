"""Scale-out, for real: a throwaway PostgreSQL cluster on a free local port, `make server` (an
MLflow tracking server on it, artifacts served), and workers that know only the two URLs and a
.pgpass file, each in its own folder as on its own machine. Plain processes on loopback: the
workers share this host's name, so a killed worker is found by its pid at once (on separate hosts
the 60-second heartbeat finds it). Everything started here is stopped and removed.

Run with `make test-pg`; it needs PostgreSQL's server binaries (.ci/run installs Debian's).
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from helpers import PYTHON, ROOT, free_port

pytestmark = pytest.mark.pg



def _pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    assert found, "PostgreSQL's server is not installed: apt-get install postgresql (.ci/run does)"
    return Path(found[-1]).parent


def _as_postgres(cmd: list[str]) -> list[str]:
    # the server refuses to run as root; Debian's package creates the `postgres` account
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture(scope="module")
def postgres():
    """A cluster of its own: superuser over a Unix socket only, role `charlm` by password over TCP."""
    bin_dir = _pg_bin()
    home = Path(tempfile.mkdtemp(prefix="charlm-pg-"))
    home.chmod(0o755)
    if os.geteuid() == 0:
        shutil.chown(home, "postgres", "postgres")
    data, port, password = home / "data", free_port(), secrets.token_hex(12)
    run = lambda cmd: subprocess.run(_as_postgres(cmd), check=True, capture_output=True, text=True, timeout=120)  # noqa: E731
    try:
        run([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth-local=trust",
             "--auth-host=scram-sha-256", "-E", "UTF8", "--no-instructions"])
        run([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(home / "server.log"), "-w", "-o",
             f"-p {port} -k {home} -c listen_addresses=127.0.0.1", "start"])
        sql = (f"CREATE ROLE charlm LOGIN PASSWORD '{password}';"
               "CREATE DATABASE optuna OWNER charlm; CREATE DATABASE mlflow OWNER charlm;")
        for statement in sql.split(";")[:-1]:
            run([str(bin_dir / "psql"), "-h", str(home), "-p", str(port), "-U", "postgres", "-q", "-c", statement])
        yield {"port": port, "password": password}
    finally:
        subprocess.run(_as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
                       capture_output=True, timeout=120)
        shutil.rmtree(home, ignore_errors=True)


def _sweep_file(folder: Path, name: str, n_trials: int) -> Path:
    doc = yaml.safe_load((ROOT / "sweeps" / "smoke.yaml").read_text())
    doc["study"] = {"name": name, "n_trials": n_trials}
    doc["base"] = str(ROOT / "experiments" / "gpt.yaml")
    doc["fixed"].update({"train.max_steps": 200, "train.validation_interval": 20})
    doc["pruner"] = {"type": "none"}
    doc.pop("baseline")
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _wait(predicate, timeout: float, what: str, procs=()):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        assert all(p.poll() is None for p in procs), f"a process exited while waiting for {what}"
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_postgres_study_and_mlflow_server_with_two_workers_one_killed(postgres, tmp_path, monkeypatch):
    pgpass = tmp_path / "pgpass"
    pgpass.write_text(f"127.0.0.1:{postgres['port']}:*:charlm:{postgres['password']}\n")
    pgpass.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(pgpass))  # for this test's own reads of the study
    storage = f"postgresql://charlm@127.0.0.1:{postgres['port']}/optuna"
    mport = free_port()
    tracking = f"http://127.0.0.1:{mport}"
    env = {**os.environ, "PGPASSFILE": str(pgpass), "MLFLOW_TRACKING_URI": tracking, "CI": "true"}
    server = subprocess.Popen(
        ["make", "-s", "-C", str(ROOT), "server", f"PORT={mport}",
         f"BACKEND=postgresql://charlm@127.0.0.1:{postgres['port']}/mlflow", f"ARTIFACTS={tmp_path / 'served'}"],
        env=env, stdout=subprocess.DEVNULL, stderr=(tmp_path / "server.log").open("w"), start_new_session=True)
    workers: list[subprocess.Popen] = []
    try:
        def healthy():
            try:
                return urllib.request.urlopen(f"{tracking}/health", timeout=2).status == 200
            except OSError:
                return False

        _wait(healthy, 180, "the MLflow server on PostgreSQL", [server])

        def start_worker(sweep: Path, host: str) -> subprocess.Popen:
            cwd = tmp_path / host  # nothing shared on disk: each worker is its own machine
            cwd.mkdir(exist_ok=True)
            p = subprocess.Popen([PYTHON, "-m", "charlm", "sweep", str(sweep), "--storage", storage], cwd=cwd, env=env,
                                 stdout=(cwd / "out.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
            workers.append(p)
            return p

        # one worker alone, for the trials/minute baseline
        one = _sweep_file(tmp_path, "pg-one", 6)
        t0 = time.time()
        solo = start_worker(one, "solo")
        assert solo.wait(timeout=600) == 0, (tmp_path / "solo" / "out.log").read_text()[-2000:]
        rate_one = 6 / ((time.time() - t0) / 60)

        # two workers on one study; the first creates the study and its parent run, the second joins
        two = _sweep_file(tmp_path, "pg-two", 8)
        t0 = time.time()
        first = start_worker(two, "host-a")
        study = _wait(lambda: _loaded("pg-two", storage), 120, "the study", [first])
        _wait(lambda: study.user_attrs.get("mlflow_parent_run_id"), 120, "the parent run", [first])
        second = start_worker(two, "host-b")

        def running_mid_trial():
            for t in optuna.load_study(study_name="pg-two", storage=storage).get_trials(states=(TrialState.RUNNING,)):
                if t.last_step and t.system_attrs.get("charlm.pid") == second.pid:
                    return t
            return None

        victim = _wait(running_mid_trial, 300, "a trial of the second worker to report", [first, second])
        os.killpg(second.pid, signal.SIGKILL)
        second.wait()
        assert first.wait(timeout=600) == 0, (tmp_path / "host-a" / "out.log").read_text()[-2000:]
        rate_two = 8 / ((time.time() - t0) / 60)
        print(f"\ntrials/minute on PostgreSQL + MLflow server: 1 worker {rate_one:.1f}, "
              f"2 workers (one killed mid-trial) {rate_two:.1f}")

        study = optuna.load_study(study_name="pg-two", storage=storage)
        trials = {t.number: t for t in study.get_trials()}
        assert trials[victim.number].state == TrialState.FAIL
        retry = [t for t in trials.values() if t.user_attrs.get("retry_of") == victim.number]
        assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and retry[0].params == victim.params
        done = [t for t in trials.values() if t.state == TrialState.COMPLETE]
        assert len(done) == 8 and len(trials) == 9  # the target reached; the killed trial accounted as FAIL

        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking)
        exp = client.get_experiment_by_name("pg-two")
        runs = client.search_runs([exp.experiment_id], max_results=1000)
        assert not [r for r in runs if r.info.status == "RUNNING"]
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
        by_trial: dict[str, list] = {}
        for r in children:
            by_trial.setdefault(r.data.tags["optuna.trial_number"], []).append(r)
        assert sorted(by_trial, key=int) == [str(n) for n in sorted(trials)]
        assert all(len(v) == 1 for v in by_trial.values()), "a trial with more than one MLflow run"
        killed_run = by_trial[str(victim.number)][0]
        assert killed_run.info.status == "FAILED" and "died" in killed_run.data.tags["error"]
        # artifacts went through the server into its own folder, not onto the workers' disks
        run = by_trial[str(done[0].number)][0]
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")
        assert list((tmp_path / "served").rglob("loss_curve.png"))
        assert not list((tmp_path / "host-a").rglob("loss_curve.png"))
        # the password is in the .pgpass file only
        seen = [json.dumps([r.data.params, r.data.tags]) for r in runs]
        seen += [(tmp_path / h / "out.log").read_text() for h in ("solo", "host-a", "host-b")]
        assert not [s for s in seen if postgres["password"] in s]
    finally:
        for p in workers:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def _loaded(name: str, storage: str):
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None
