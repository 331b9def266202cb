"""Faults from outside, injected for real: folders that cannot be written (a file in the way, a
read-only mount), a full disk (a size-limited tmpfs), a tracking server that is down or killed
mid-run, PostgreSQL stopped mid-sweep, stores that are corrupt or another program's, a journal cut
mid-record, SIGKILL at random points of `best`. For each: one line ``error: ...`` naming the place,
exit 2, in seconds; and nothing finished is lost or left RUNNING. ``make test-faults`` (CI runs it);
the mounts need root, as CI has."""

from __future__ import annotations

import glob
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from helpers import PYTHON, ROOT, SMOKE, cli, free_port, journal_study, mlflow_client, wait_for_http

pytestmark = pytest.mark.faults

GPT = str(ROOT / "experiments" / "gpt.yaml")
DOWN = 30  # seconds: the most a fault from outside may take to be reported


def tiny(text: Path, steps: int = 60, every: int = 10) -> list[str]:
    """--set values: a 1-layer GPT 32 wide on 30k characters, a few milliseconds a step."""
    return ["--set", f"data.path={text}", "data.context=16", "model.n_layer=1", "model.n_head=2", "model.n_embd=32",
            "train.batch_size=8", f"train.max_steps={steps}", "train.max_minutes=0", f"train.validation_interval={every}",
            "train.warmup_steps=5", "train.eval_chars=1000", "train.sample_chars=0", "train.precision=fp32",
            "train.threads=1", "train.compile=false", "train.patience=0", "experiment=faults", "name=tiny"]


def refused(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, no traceback, and the last line of stderr one ``error: ...`` holding every needle."""
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), r.stderr[-3000:]
    for n in needles:
        assert n in last, f"{n!r} not in: {last}"
    return last


def timed(*args, **kw) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    r = cli(*args, **kw)
    return r, time.monotonic() - t0


def runs(cwd: Path, experiment: str, uri: str | None = None) -> list:
    client = MlflowClient(uri) if uri else mlflow_client(cwd)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id], max_results=1000)


@contextmanager
def mounted(path: Path, *options: str):
    """A tmpfs at ``path`` (``size=...``, ``ro``): a full or read-only disk, for real."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(("mode=0755", *options)), "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# --------------------------------------------------------------------------- places that cannot be written


def test_an_out_folder_that_cannot_be_made_is_refused_before_training(tmp_path, tiny_text):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    r, took = timed("train", GPT, *tiny(tiny_text, steps=100000), "--out", "blocker/models", cwd=tmp_path)
    refused(r, "blocker", "is a file")
    assert took < DOWN and not runs(tmp_path, "faults")  # refused before any run was made, let alone trained
    with mounted(tmp_path / "ro", "ro"):
        r, took = timed("train", GPT, *tiny(tiny_text, steps=100000), "--out", "ro/models", cwd=tmp_path)
        refused(r, "ro/models", "Read-only file system")
        assert took < DOWN and not runs(tmp_path, "faults")


def test_an_mlruns_that_cannot_be_written_is_refused_before_training(tmp_path, tiny_text):
    (tmp_path / "mlruns").write_text("not a folder")
    r, took = timed("train", GPT, *tiny(tiny_text, steps=100000), cwd=tmp_path)
    refused(r, "mlruns", "is a file")
    assert took < DOWN
    (tmp_path / "mlruns").unlink()
    with mounted(tmp_path / "mlruns", "ro"):
        r, took = timed("train", GPT, *tiny(tiny_text, steps=100000), cwd=tmp_path)
        refused(r, "mlruns", "Read-only file system")
        assert took < DOWN
        r, took = timed("sweep", str(SMOKE), cwd=tmp_path)
        refused(r, "mlruns", "Read-only file system")
        assert took < DOWN


def test_a_storage_whose_folder_cannot_be_made_or_whose_file_is_foreign_is_one_line(tmp_path):
    (tmp_path / "blocker").write_text("a file")
    for url in ("journal:blocker/optuna/smoke.journal", "sqlite:///blocker/optuna.db"):
        r, took = timed("sweep", str(SMOKE), "--storage", url, cwd=tmp_path)
        refused(r, "blocker", "is a file")
        assert took < DOWN
    (tmp_path / "garbage.db").write_bytes(b"this is not SQLite, it only ends in .db\n" * 200)
    refused(cli("sweep", str(SMOKE), "--storage", "sqlite:///garbage.db", cwd=tmp_path),
            "garbage.db", "not a readable SQLite database")
    con = sqlite3.connect(tmp_path / "other.db")
    con.execute("CREATE TABLE invoices (id INTEGER, total REAL)")
    con.commit()
    con.close()
    before = (tmp_path / "other.db").read_bytes()
    refused(cli("sweep", str(SMOKE), "--storage", "sqlite:///other.db", cwd=tmp_path), "other.db",
            "another program's SQLite database (tables invoices)")
    assert (tmp_path / "other.db").read_bytes() == before  # nothing written into someone else's database


def test_a_corrupt_or_foreign_mlflow_store_is_one_line(tmp_path, tiny_text):
    store = tmp_path / "mlruns" / "mlflow.db"
    store.parent.mkdir()
    store.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 64)
    refused(cli("train", GPT, *tiny(tiny_text), cwd=tmp_path), "mlflow.db", "not a readable SQLite database")
    store.unlink()
    optuna_db = tmp_path / "optuna.db"
    r = cli("sweep", str(SMOKE), "--storage", f"sqlite:///{optuna_db}", "--n-trials", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    shutil.copy(optuna_db, store)  # an Optuna database where MLflow's store belongs
    refused(cli("train", GPT, *tiny(tiny_text), cwd=tmp_path), "mlflow.db", "another program's SQLite database")


# --------------------------------------------------------------------------- a full disk


def test_a_disk_too_small_is_refused_before_training_and_one_that_fills_mid_run_keeps_the_state(tmp_path, tiny_text):
    big = ["model.n_layer=4", "model.n_embd=256", "model.n_head=4"]  # ~3M parameters: ~50 MB of state
    with mounted(tmp_path / "small", "size=40m") as disk:
        r, took = timed("train", GPT, *tiny(tiny_text), *big, cwd=disk)
        refused(r, "MB free", "needs about")
        assert took < DOWN and not list(disk.glob("mlruns/states/*.pt"))
    with mounted(tmp_path / "disk", "size=48m") as disk:
        proc = subprocess.Popen([PYTHON, "-m", "charlm", "train", GPT, *tiny(tiny_text, steps=20000, every=50)],
                                cwd=disk, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while not list(disk.glob("mlruns/states/train-*.pt")):  # it trained up to its first evaluation
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        filler = disk / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M"], capture_output=True)  # until the disk is full
        out, err = proc.communicate(timeout=DOWN + 60)
        r = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        last = refused(r)
        assert any(s in last for s in ("No space left", "disk is full", "MB free")), last
        assert "kept: the training state" in last and "run the same command again" in last
        filler.unlink()
        r = cli("train", GPT, *tiny(tiny_text, steps=20000, every=50), cwd=disk, timeout=900)
        assert r.returncode == 0 and "resuming from step" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
        statuses = [x.info.status for x in runs(disk, "faults", f"sqlite:///{disk / 'mlruns' / 'mlflow.db'}")]
        assert sorted(statuses) == ["FAILED", "FINISHED"], statuses  # the run the full disk stopped is ended
        assert not list(disk.glob("mlruns/states/*"))  # finished: no state and no lock left on the small disk


# --------------------------------------------------------------------------- servers that are down or go down


def test_a_tracking_server_that_is_down_fails_within_30_s_naming_it(tmp_path, tiny_text):
    env = {**os.environ, "MLFLOW_TRACKING_URI": "http://charlm:s3cret@127.0.0.1:1"}
    for args in (("train", GPT, *tiny(tiny_text, steps=100000)), ("sweep", str(SMOKE)), ("best", str(SMOKE))):
        r, took = timed(*args, cwd=tmp_path, env=env)
        last = refused(r, "http://charlm:***@127.0.0.1:1", "curl")
        assert "s3cret" not in r.stderr + r.stdout and took < DOWN, (took, last)


@contextmanager
def mlflow_server(folder: Path, port: int):
    """A real MLflow tracking server on a SQLite store and a served artifact folder; killed at the end."""
    proc = subprocess.Popen([str(Path(PYTHON).parent / "mlflow"), "server", "--backend-store-uri",
                             f"sqlite:///{folder / 'server.db'}", "--artifacts-destination", str(folder / "artifacts"),
                             "--serve-artifacts", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=(folder / "server.log").open("a"), start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", proc, 120, lambda: (folder / "server.log").read_text()[-2000:])
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_tracking_server_killed_mid_run_then_brought_back(tmp_path, tiny_text):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    args = ["train", GPT, *tiny(tiny_text, steps=30000, every=50)]
    with mlflow_server(tmp_path, port) as server:
        proc = subprocess.Popen([PYTHON, "-m", "charlm", *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while True:  # two evaluations logged: the run is well under way
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            logged = [r for r in runs(tmp_path, "faults", uri) if r.info.status == "RUNNING"]
            if logged and len(MlflowClient(uri).get_metric_history(logged[0].info.run_id, "val_loss")) >= 2:
                break
            time.sleep(0.5)
        os.killpg(server.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        out, err = proc.communicate(timeout=120)
        took = time.monotonic() - killed_at
    r = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    refused(r, uri, "kept: the training state", "run the same command again")
    assert took < DOWN + 15, took  # the next evaluation's send, then bounded retries
    assert list((tmp_path / "mlruns" / "states").glob("train-*.pt"))
    with mlflow_server(tmp_path, port):  # the same store, back
        r = cli(*args, cwd=tmp_path, env=env, timeout=900)
        assert r.returncode == 0 and "resuming from step" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
        done = runs(tmp_path, "faults", uri)
        statuses = sorted(x.info.status for x in done)
        assert statuses == ["FAILED", "FINISHED"], statuses  # the run the fault left open is ended, not RUNNING
        finished = next(x for x in done if x.info.status == "FINISHED")
        curve = [m.step for m in MlflowClient(uri).get_metric_history(finished.info.run_id, "val_loss")]
        assert curve[0] == 50 and curve[-1] == 30000, curve[:3] + curve[-3:]  # the whole curve, resumed part too
    assert not list((tmp_path / "mlruns" / "states").glob("train-*.pt"))  # finished: nothing left to resume


def _pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    assert found, "PostgreSQL's server is not installed: apt-get install postgresql (.ci/run does)"
    return Path(found[-1]).parent


def test_postgresql_stopped_mid_sweep_then_started(tmp_path):
    home = Path(tempfile.mkdtemp(prefix="charlm-pgfault-"))
    home.chmod(0o755)
    shutil.chown(home, "postgres", "postgres")
    bin_dir, data, port = _pg_bin(), home / "data", free_port()

    def pg(*cmd):
        return subprocess.run(["runuser", "-u", "postgres", "--", *cmd], check=True, capture_output=True, timeout=120)

    start = [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(home / "server.log"), "-w", "-o",
             f"-p {port} -k {home} -c listen_addresses=127.0.0.1", "start"]
    stop = [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]
    try:
        pg(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-instructions")
        pg(*start)
        pg(str(bin_dir / "psql"), "-h", str(home), "-p", str(port), "-U", "postgres", "-q", "-c", "CREATE DATABASE optuna")
        url = f"postgresql://postgres@127.0.0.1:{port}/optuna"  # trust: a password belongs in .pgpass anyway
        doc = yaml.safe_load(SMOKE.read_text())
        doc["study"].update(n_trials=6, name="pgfault")
        doc["base"], doc["baseline"] = str(ROOT / doc["base"]), str(ROOT / doc["baseline"])
        doc["fixed"]["train.max_steps"] = 400
        doc["pruner"] = {"type": "none"}
        sweep = tmp_path / "pgfault.yaml"
        sweep.write_text(yaml.safe_dump(doc, sort_keys=False))
        proc = subprocess.Popen([PYTHON, "-m", "charlm", "sweep", str(sweep), "--storage", url], cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        import optuna

        from charlm.storage import open_storage
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            with_study = [s for s in optuna.get_all_study_summaries(open_storage(url)) if s.study_name == "pgfault"]
            if with_study and with_study[0].n_trials >= 3:
                break
            time.sleep(0.5)
        done_before = {t.number for t in optuna.load_study(study_name="pgfault", storage=open_storage(url)).trials
                       if t.state == TrialState.COMPLETE}
        pg(*stop)
        stopped_at = time.monotonic()
        out, err = proc.communicate(timeout=180)
        took = time.monotonic() - stopped_at
        r = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        last = refused(r, "postgresql://postgres@127.0.0.1")
        assert "run the sweep again" in last or "run the command again" in last, last
        assert took < 60, took  # the trial in flight finishes its few seconds, then the first call fails
        pg(*start)
        r = cli("sweep", str(sweep), "--storage", url, cwd=tmp_path, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        study = optuna.load_study(study_name="pgfault", storage=open_storage(url))
        states = [t.state for t in study.trials]
        assert TrialState.RUNNING not in states, states
        assert done_before <= {t.number for t in study.trials if t.state == TrialState.COMPLETE}  # nothing lost
        assert sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states) == 6, states
        assert "RUNNING" not in [x.info.status for x in runs(tmp_path, "pgfault")]
    finally:
        subprocess.run(["runuser", "-u", "postgres", "--", *stop], capture_output=True, timeout=120)
        shutil.rmtree(home, ignore_errors=True)


# --------------------------------------------------------------------------- corrupt and cut-off stores


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A real smoke study (3 trials) in its own folder: its journal and MLflow store."""
    cwd = tmp_path_factory.mktemp("swept")
    r = cli("sweep", str(SMOKE), "--n-trials", "3", cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    return cwd


def test_a_corrupt_or_foreign_journal_is_one_line_naming_it_and_left_as_it_was(swept, tmp_path):
    journal = swept / "mlruns" / "optuna" / "smoke.journal"
    lines = journal.read_bytes().split(b"\n")
    cases = {"not a journal": b"these are notes, not a journal\n",
             "an image": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) + b"\n",
             "a garbled record mid-file": b"\n".join(lines[:3] + [b'{"op_code": 4, "worker_id"::}'] + lines[3:]),
             "JSON of another program": b'{"name": "not optuna", "version": 2}\n'}
    for name, data in cases.items():
        folder = tmp_path / name.replace(" ", "-")
        (folder / "mlruns" / "optuna").mkdir(parents=True)
        bad = folder / "mlruns" / "optuna" / "smoke.journal"
        bad.write_bytes(data)
        r, took = timed("sweep", str(SMOKE), cwd=folder)
        last = refused(r, str(Path("mlruns") / "optuna" / "smoke.journal"), "mv ")
        assert took < DOWN and bad.read_bytes() == data, (name, last)


def test_a_journal_cut_at_every_byte_of_its_last_record_loads_its_complete_records(swept, tmp_path):
    import optuna

    from charlm.storage import open_storage

    data = (swept / "mlruns" / "optuna" / "smoke.journal").read_bytes()
    start = data.rstrip(b"\n").rfind(b"\n") + 1  # where the last record begins
    whole = optuna.load_study(study_name="smoke", storage=open_storage(f"journal:{swept}/mlruns/optuna/smoke.journal"))
    copy = tmp_path / "cut.journal"
    for end in range(start + 1, len(data)):  # every cut inside the last record, its newline included
        copy.write_bytes(data[:end])
        study = optuna.load_study(study_name="smoke", storage=open_storage(f"journal:{copy}"))
        assert len(study.trials) == len(whole.trials)  # the last record is an update, not a new trial
        assert copy.read_bytes() == data[:start], end  # the cut record dropped, whole lines kept
    # and the sweep goes on from a cut journal: the cut record's change is redone, nothing is lost
    cut = tmp_path / "resumed"
    shutil.copytree(swept / "mlruns", cut / "mlruns")
    journal = cut / "mlruns" / "optuna" / "smoke.journal"
    journal.write_bytes(data[:start + (len(data) - start) // 2])
    r = cli("sweep", str(SMOKE), "--n-trials", "4", cwd=cut)
    assert r.returncode == 0 and "cut off mid-write" in r.stderr, r.stderr[-3000:]
    trials = journal_study(cut, "smoke").trials
    assert TrialState.RUNNING not in [t.state for t in trials]
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) == 4, [t.state for t in trials]


def test_a_corrupt_training_state_stops_the_resume_unless_the_user_discards_it(tmp_path, tiny_text):
    args = ["train", GPT, *tiny(tiny_text, steps=30000, every=20)]
    proc = subprocess.Popen([PYTHON, "-m", "charlm", *args], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((tmp_path / "mlruns" / "states").glob("train-*.pt")):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = next((tmp_path / "mlruns" / "states").glob("train-*.pt"))
    state.write_bytes(state.read_bytes()[:1000])  # cut short, as a crash of the disk would leave it
    refused(cli(*args, cwd=tmp_path), str(state.name), "--discard-corrupt-state")
    assert state.is_file()  # never discarded without consent
    r = cli(*args, "--discard-corrupt-state", cwd=tmp_path, timeout=900)
    assert r.returncode == 0 and "discarded the unreadable training state" in r.stderr, r.stderr[-2000:]
    assert "RUNNING" not in [x.info.status for x in runs(tmp_path, "faults")]  # the killed run ended FAILED


# --------------------------------------------------------------------------- SIGKILL at random points of best


def test_best_killed_at_random_points_then_run_again_loses_nothing(swept, tmp_path):
    cwd = tmp_path / "best"
    shutil.copytree(swept / "mlruns", cwd / "mlruns")
    rng = random.Random(int(os.environ.get("CHARLM_FAULT_SEED", "0")))
    kills = []
    for _ in range(5):
        proc = subprocess.Popen([PYTHON, "-m", "charlm", "best", str(SMOKE)], cwd=cwd, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        at = rng.uniform(1.0, 12.0)
        try:
            proc.wait(timeout=at)  # it finished before its kill: the next call finds the seeds kept
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            kills.append(round(at, 1))
    r = cli("best", str(SMOKE), cwd=cwd, timeout=600)
    assert r.returncode == 0, f"killed at {kills} s\n{r.stderr[-3000:]}"
    metrics = json.loads((cwd / "mlruns" / "best" / "smoke" / "metrics.json").read_text())
    assert metrics["test_loss_mean"] > 0
    assert cli("eval", "--model", "mlruns/best/smoke", "--split", "test", cwd=cwd).returncode == 0
    client = mlflow_client(cwd)
    statuses = [x.info.status for x in runs(cwd, "smoke")]
    assert "RUNNING" not in statuses, (kills, statuses)
    versions = client.search_model_versions("name='charlm-smoke'")
    assert versions and all(client.get_run(v.run_id).info.status == "FINISHED" for v in versions), kills
    champion = client.get_model_version_by_alias("charlm-smoke", "champion")  # the alias names a version that exists
    assert champion.version in {v.version for v in versions}
