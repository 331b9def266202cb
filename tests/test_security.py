"""What must never be in the code, and the UI server as the user starts it."""

import ast
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request

import pytest
import torch

from helpers import PYTHON, ROOT, SMOKE, free_port

SOURCES = [p for d in ("charlm", "bench", "docs", "tests") for p in (ROOT / d).rglob("*.py")]


def _code(path):
    return path.read_text(encoding="utf-8")


def test_yaml_is_only_safe_loaded():
    for p in SOURCES:
        if p.name == "test_security.py":
            continue
        assert not re.search(r"yaml\.(load|unsafe_load|full_load)\(|yaml\.(Unsafe|Full)?Loader", _code(p)), p


def _torch_load_calls(path):
    """Every ``torch.load(...)`` call in a file, parsed, so nested parentheses in its arguments don't hide a keyword."""
    tree = ast.parse(_code(path))
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "load"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "torch"
    ]


def test_checkpoints_are_loaded_without_code_execution():
    calls = [(p, c) for p in SOURCES if p.parent.name != "tests" for c in _torch_load_calls(p)]
    assert calls, "expected torch.load in charlm/checkpoint.py"
    for p, c in calls:
        safe = [k for k in c.keywords if k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True]
        assert safe, f"{p}:{c.lineno}: torch.load without weights_only=True"


def test_no_shell_commands_built_from_strings():
    for p in SOURCES:
        if p.name == "test_security.py":
            continue
        assert "shell=True" not in _code(p) and "os.system(" not in _code(p), p



def _get(url, data=None, **headers):
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.slow
def test_make_ui_binds_loopback_with_host_and_cors_protection(tmp_path):
    port = free_port()
    proc = subprocess.Popen(["make", "-s", "-C", str(ROOT), "ui", f"PORT={port}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline, status = time.time() + 120, None
        while time.time() < deadline and status != 200:
            time.sleep(1)
            try:
                status = _get(f"http://127.0.0.1:{port}/health")
            except OSError:
                status = None
        assert status == 200, "the UI did not come up on 127.0.0.1"
        listening = subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout
        assert f"127.0.0.1:{port} " in listening and f"0.0.0.0:{port} " not in listening
        api = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1"
        assert _get(api) == 200
        assert _get(api, Host="evil.example") == 403  # DNS-rebinding protection is on
        create = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/create"
        body = b'{"name": "from-elsewhere"}'
        assert _get(create, body, Origin="http://evil.example") == 403  # cross-origin writes are refused
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_a_password_in_a_sweep_file_or_on_the_command_line_is_refused(tmp_path):
    import yaml

    from charlm.sweepfile import SweepError, load_sweep

    doc = yaml.safe_load(SMOKE.read_text())
    doc["base"] = str(ROOT / "experiments" / "gpt.yaml")
    doc["study"]["storage"] = "postgresql://alice:s3cret@db/optuna"
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(doc))
    with pytest.raises(SweepError, match="holds a password") as e:
        load_sweep(f)
    assert "s3cret" not in str(e.value)
    r = subprocess.run([PYTHON, "-m", "charlm", "sweep", str(SMOKE), "--storage",
                        "postgresql://alice:s3cret@db/optuna"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "--storage holds a password" in r.stderr and "s3cret" not in r.stderr + r.stdout


@pytest.fixture
def charlm_signals():
    """charlm's Ctrl-C/SIGTERM handlers for one test; the previous handlers restored after it."""
    from charlm import interrupts

    old = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    interrupts.install()
    yield interrupts
    signal.signal(signal.SIGTERM, old[0])
    signal.signal(signal.SIGINT, old[1])


def _sigterm_raises_at_once() -> None:
    with pytest.raises(SystemExit):  # outside the lock: at once
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)


def test_sigterm_while_the_journal_lock_is_held_waits_for_its_release(tmp_path, charlm_signals):
    """A kill landing inside Optuna's journal lock must not leave the lock file behind (every
    later access would wait out its 30 s grace): the signal is raised once the lock is released."""
    from charlm.storage import open_storage

    lock = open_storage(f"journal:{tmp_path / 's.journal'}")._backend._lock
    lock_file = tmp_path / "s.journal.lock"
    lock.acquire()
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.1)  # the handler has run: deferred, nothing raised
    assert lock_file.exists()
    with pytest.raises(SystemExit) as e:
        lock.release()
    assert e.value.code == 143 and not lock_file.exists()
    _sigterm_raises_at_once()


def test_breaking_a_stale_journal_lock_keeps_signals_deferred_then_delivered(tmp_path, charlm_signals):
    """Optuna breaks a stale lock file by calling release() inside acquire(): that must neither end
    the guarded section early nor leave the deferral depth below zero (signals swallowed after)."""
    from charlm.storage import open_storage

    interrupts = charlm_signals
    lock = open_storage(f"journal:{tmp_path / 's.journal'}")._backend._lock
    lock.grace_period = 1  # Optuna's default waits 30 s before breaking a lock file
    (tmp_path / "s.journal.lock").touch()  # left behind by a process killed inside the lock
    assert lock.acquire()
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.1)  # held: deferred
    with pytest.raises(SystemExit) as e:
        lock.release()
    assert e.value.code == 143 and interrupts._depth == 0
    interrupts.leave()  # an unmatched release is harmless
    _sigterm_raises_at_once()


def test_sigterm_inside_an_mlflow_write_ends_the_run_killed(tmp_path, monkeypatch, charlm_signals):
    """A kill landing inside a write to MLflow's SQLite store must wait for that write to end:
    raised mid-transaction it left the database locked, so the run could not even be marked
    KILLED and the command died with 'database is locked' (exit 1) instead of 143."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    from charlm.tracking import MlflowTracker

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = MlflowTracker("signals", "killed-mid-write")

    kills = []

    def kill_once(conn, cursor, statement, *args):
        if statement.lstrip().upper().startswith("INSERT INTO METRICS") and not kills:
            kills.append(statement)
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs inside the transaction

    event.listen(Engine, "after_cursor_execute", kill_once)
    try:
        with pytest.raises(SystemExit) as e, tracker:
            tracker.log_metrics({"loss": 1.0}, step=1)
            tracker.flush()
    finally:
        event.remove(Engine, "after_cursor_execute", kill_once)
    assert e.value.code == 143 and kills
    run = tracker.client.get_run(tracker.run_id)
    assert run.info.status == "KILLED" and run.data.metrics["loss"] == 1.0
    _sigterm_raises_at_once()


def test_sigterm_during_a_checkpoint_write_lets_the_file_complete(tmp_path, charlm_signals):
    """A kill landing inside ``torch.save`` broke its zip writer (a RuntimeError that hid exit 143);
    the write now finishes, the file is renamed into place, and then the signal is raised."""
    from charlm.checkpoint import write_atomic

    blob = {"weights": torch.arange(1000.0)}

    def killed_while_writing(f):
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the next line
        torch.save(blob, f)

    with pytest.raises(SystemExit) as e:
        write_atomic(tmp_path / "model.pt", killed_while_writing)
    assert e.value.code == 143
    assert torch.equal(torch.load(tmp_path / "model.pt", weights_only=True)["weights"], blob["weights"])
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left
    _sigterm_raises_at_once()


def test_a_second_signal_while_one_waits_raises_at_once(charlm_signals):
    """A hung call inside a guarded section must not make Ctrl-C wait for ever: the second signal
    raises at once, and the first is not raised again afterwards."""
    interrupts = charlm_signals
    interrupts.enter()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)  # deferred
        with pytest.raises(SystemExit) as e:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        assert e.value.code == 143
    finally:
        interrupts.leave()  # nothing left pending: no second exit
    assert interrupts._depth == 0 and interrupts._pending is None
    _sigterm_raises_at_once()
