"""Scale-out across real hosts: network namespaces on one bridge (tests/netns.py). The server host
runs a throwaway PostgreSQL cluster and `make server` (MLflow tracking server on it, artifacts
served); worker hosts, each with its own network and UTS namespace (own address and hostname)
and its own folder, know only the two URLs and a .pgpass file. Different hostnames: a killed
worker can only be noticed through its heartbeat, as on separate machines.

Run with `make test-pg` (as root; it needs PostgreSQL's server binaries, which .ci/run installs).
Everything started here is stopped and removed, namespaces and links included.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import netns
import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from charlm import config
from charlm.data import load_corpus
from charlm.tracking import MlflowTracker
from helpers import PYTHON, ROOT, SMOKE

pytestmark = pytest.mark.pg
REPETITIONS = 5  # two hosts racing for the last trials of a study, this many studies in a row


def _pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    assert found, "PostgreSQL's server is not installed: apt-get install postgresql (.ci/run does)"
    return Path(found[-1]).parent


def _wait(predicate, timeout: float, what: str, procs=()):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        assert all(p.poll() is None for p in procs), f"a process exited while waiting for {what}"
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The server host: PostgreSQL (role `charlm` by password, over the LAN only) and MLflow."""
    home = Path(tempfile.mkdtemp(prefix="charlm-pg-"))
    home.chmod(0o755)
    shutil.chown(home, "postgres", "postgres")
    bin_dir, data, password = _pg_bin(), home / "data", secrets.token_hex(12)
    work = tmp_path_factory.mktemp("scale")
    with netns.lan(("a", "b")) as lan:
        server = None
        pg = lambda *cmd: subprocess.run(  # noqa: E731  the server refuses to run as root
            lan.exec("server", "runuser", "-u", "postgres", "--", *cmd), check=True, capture_output=True, timeout=120)
        try:
            pg(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth-local=trust",
               "--auth-host=scram-sha-256", "-E", "UTF8", "--no-instructions")
            with open(data / "pg_hba.conf", "a") as f:
                f.write(f"host all charlm {lan.subnet}.0/24 scram-sha-256\n")
            pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(home / "server.log"), "-w", "-o",
               f"-p 5432 -k {home} -c listen_addresses={lan.addr['server']}", "start")
            for sql in (f"CREATE ROLE charlm LOGIN PASSWORD '{password}'", "CREATE DATABASE optuna OWNER charlm",
                        "CREATE DATABASE mlflow OWNER charlm"):
                pg(str(bin_dir / "psql"), "-h", str(home), "-U", "postgres", "-q", "-c", sql)
            pgpass = work / "pgpass"
            pgpass.write_text(f"{lan.addr['server']}:5432:*:charlm:{password}\n")
            pgpass.chmod(0o600)
            db = f"postgresql://charlm@{lan.addr['server']}:5432"
            tracking = f"http://{lan.addr['server']}:5000"
            env = {**os.environ, "PGPASSFILE": str(pgpass), "MLFLOW_TRACKING_URI": tracking, "CI": "true"}
            venv = Path(sys.prefix)  # this interpreter's venv, already installed: never reinstall it
            server = subprocess.Popen(
                lan.exec("server", "make", "-s", "-C", str(ROOT), "-o", f"{venv}/.installed", "server",
                         f"VENV={venv}", "PORT=5000", f"HOST={lan.addr['server']}", f"BACKEND={db}/mlflow",
                         f"ARTIFACTS={work / 'served'}"),
                env=env, stdout=subprocess.DEVNULL, stderr=(work / "server.log").open("w"), start_new_session=True)
            _wait(lambda: _healthy(tracking), 180, "the MLflow server on PostgreSQL", [server])
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("PGPASSFILE", str(pgpass))  # for this test's own reads of the studies
                yield dict(lan=lan, work=work, env=env, storage=f"{db}/optuna", tracking=tracking, password=password)
        finally:
            if server is not None:
                os.killpg(server.pid, signal.SIGTERM)
                server.wait(timeout=60)
            subprocess.run(["runuser", "-u", "postgres", "--", str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast",
                            "-w", "stop"], capture_output=True, timeout=120)
            shutil.rmtree(home, ignore_errors=True)


def _healthy(url: str) -> bool:
    try:
        return urllib.request.urlopen(f"{url}/health", timeout=2).status == 200
    except OSError:
        return False


def _sweep_file(folder: Path, name: str, n_trials: int, max_steps: int, **study) -> Path:
    doc = yaml.safe_load(SMOKE.read_text())
    doc["study"] = {"name": name, "n_trials": n_trials, **study}
    doc["base"] = str(ROOT / "experiments" / "gpt.yaml")
    doc["fixed"].update({"train.max_steps": max_steps, "train.validation_interval": 10, "train.eval_chars": 500,
                         "train.sample_chars": 20})
    doc["pruner"] = {"type": "none"}
    doc.pop("baseline")
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _start(c, host: str, sweep: Path, procs: list) -> subprocess.Popen:
    """`python -m charlm sweep` on ``host``, in a folder of its own, under a hostname of its own."""
    cwd = c["work"] / f"{sweep.stem}-{host}"
    cwd.mkdir()
    cmd = c["lan"].exec(host, PYTHON, "-m", "charlm", "sweep", str(sweep), "--storage", c["storage"],
                        hostname=f"charlm-{host}-{c['lan'].suffix}")
    p = subprocess.Popen(cmd, cwd=cwd, env=c["env"], stdout=(cwd / "out.log").open("w"), stderr=subprocess.STDOUT,
                         start_new_session=True)
    procs.append(p)
    return p


def _finish(c, procs: list, timeout: float = 300) -> None:
    for p in procs:
        try:
            code = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        assert code == 0, _logs(c)


def _logs(c) -> dict[str, str]:
    return {str(f.relative_to(c["work"])): f.read_text()[-1500:] for f in c["work"].glob("*/out.log")}


def _kill_all(procs: list) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _rate(trials) -> float:
    """Trials per minute from the first trial's start to the last one's end."""
    span = max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)
    return len(trials) / (span.total_seconds() / 60)


def _mlflow_runs(c, study: str) -> dict[str, list]:
    """The study's child runs by trial number; asserts one parent run and none left RUNNING."""
    client = MlflowClient(c["tracking"])
    runs = client.search_runs([client.get_experiment_by_name(study).experiment_id], max_results=1000)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert sum(r.data.tags.get("charlm.role") == "study" for r in runs) == 1
    by_trial: dict[str, list] = {}
    for r in runs:
        if r.data.tags.get("mlflow.parentRunId"):
            by_trial.setdefault(r.data.tags["optuna.trial_number"], []).append(r)
    return by_trial


def test_two_hosts_finish_exactly_n_trials_every_time(cluster):
    c, procs, n = cluster, [], 4
    try:
        one = _sweep_file(c["work"], "solo", n, 20)
        _start(c, "a", one, procs)
        _finish(c, procs)
        rates = {1: _rate(optuna.load_study(study_name="solo", storage=c["storage"]).trials), 2: []}
        shared, walls = 0, []
        for rep in range(REPETITIONS):
            sweep = _sweep_file(c["work"], f"race-{rep}", n, 20)
            t0 = time.time()
            batch = [_start(c, host, sweep, procs) for host in ("a", "b")]  # at the same moment
            _finish(c, batch)
            walls.append(time.time() - t0)
            trials = optuna.load_study(study_name=f"race-{rep}", storage=c["storage"]).trials
            states = [(t.state.name, t.user_attrs.get("error")) for t in trials]  # why, when one failed
            assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == n and len(trials) == n, \
                (states, _logs(c))
            assert len({tuple(sorted(t.params.items())) for t in trials}) == n  # two hosts, no trial drawn twice
            shared += len({t.system_attrs["charlm.host"] for t in trials}) == 2
            runs = _mlflow_runs(c, f"race-{rep}")
            assert sorted(runs, key=int) == [str(t.number) for t in trials] and all(len(v) == 1 for v in runs.values())
            rates[2].append(_rate(trials))
        assert shared, "one host took every trial of every study: nothing raced"
        print(f"\ntrials/minute ({n} trials of 20 steps, first start to last end): 1 host {rates[1]:.1f}, "
              f"2 hosts {sum(rates[2]) / len(rates[2]):.1f} (mean of {REPETITIONS}: "
              f"{', '.join(f'{r:.1f}' for r in rates[2])}); {sum(walls) / len(walls):.0f} s per 2-host study "
              f"with process start-up")
    finally:
        _kill_all(procs)


def test_runs_logging_the_same_dataset_at_once_all_record_it(cluster, tmp_path):
    """The server inserts a dataset on its first use in an experiment; workers starting trials at
    the same moment race for that insert, and the losers must still record the input (this race
    once failed a trial in the exact-count test above)."""
    text = tmp_path / "text.txt"
    text.write_text("to be or not to be, that is the question\n" * 200)
    corpus = load_corpus(config.DataConfig(path=str(text)))
    runs = 10  # urllib3's pool size per client host
    for rep in range(3):
        trackers = [MlflowTracker(f"dataset-race-{rep}", f"run-{i}", uri=cluster["tracking"]) for i in range(runs)]
        start, errors = threading.Barrier(runs), []

        def log(tracker, start=start, errors=errors):
            start.wait()
            try:
                tracker.log_dataset(corpus)
            except Exception as e:  # collected, asserted below
                errors.append(f"{type(e).__name__}: {e}"[:300])

        threads = [threading.Thread(target=log, args=(t,)) for t in trackers]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=60)
        assert not errors, errors
        client = MlflowClient(cluster["tracking"])
        for t in trackers:
            t.end("FINISHED")
            inputs = client.get_run(t.run_id).inputs.dataset_inputs
            assert [d.dataset.name for d in inputs] == ["text.txt"], t.run_id


def test_a_host_killed_mid_trial_is_noticed_by_heartbeat_and_its_trial_rerun(cluster):
    c, procs, n, timeout = cluster, [], 4, 4.0
    try:
        sweep = _sweep_file(c["work"], "kill", n, 200, heartbeat_timeout_s=timeout)
        first, second = (_start(c, host, sweep, procs) for host in ("a", "b"))

        def running_mid_trial():
            try:
                study = optuna.load_study(study_name="kill", storage=c["storage"])
            except KeyError:  # not created yet
                return None
            return next((t for t in study.get_trials(states=(TrialState.RUNNING,))
                         if t.last_step and t.system_attrs.get("charlm.pid") == second.pid), None)

        victim = _wait(running_mid_trial, 300, "a trial of host b to report", [first, second])
        os.killpg(second.pid, signal.SIGKILL)
        killed_at = time.time()
        second.wait()

        def state_of(number):
            return optuna.load_study(study_name="kill", storage=c["storage"]).trials[number].state

        _wait(lambda: state_of(victim.number) == TrialState.FAIL, 120, "host a to fail the dead trial", [first])
        recovery = time.time() - killed_at
        _finish(c, [first])
        trials = {t.number: t for t in optuna.load_study(study_name="kill", storage=c["storage"]).trials}
        retry = [t for t in trials.values() if t.user_attrs.get("retry_of") == victim.number]
        assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE and retry[0].params == victim.params
        assert retry[0].system_attrs["charlm.host"] == f"charlm-a-{c['lan'].suffix}"
        rerun = retry[0].datetime_complete.timestamp() - killed_at
        print(f"\nrecovery: host b SIGKILLed mid-trial; host a failed its trial {recovery:.1f} s later "
              f"(heartbeat_timeout_s {timeout:g}) and finished its re-run {rerun:.1f} s after the kill")
        done = [t for t in trials.values() if t.state == TrialState.COMPLETE]
        assert len(done) == n and len(trials) == n + 1  # the target reached; the killed trial accounted as FAIL

        runs = _mlflow_runs(c, "kill")
        assert sorted(runs, key=int) == [str(k) for k in sorted(trials)] and all(len(v) == 1 for v in runs.values())
        killed_run = runs[str(victim.number)][0]
        assert killed_run.info.status == "FAILED" and "died" in killed_run.data.tags["error"]
        # artifacts went through the server into its own folder, not onto the workers' disks
        assert runs[str(done[0].number)][0].info.artifact_uri.startswith("mlflow-artifacts:")
        assert list((c["work"] / "served").rglob("loss_curve.png"))
        assert not list(c["work"].glob("kill-*/**/loss_curve.png"))
        # the password is in the .pgpass file only
        seen = [json.dumps([r.data.params, r.data.tags]) for v in runs.values() for r in v]
        seen += [f.read_text() for f in c["work"].glob("kill-*/out.log")]
        assert not [s for s in seen if c["password"] in s]
    finally:
        _kill_all(procs)
