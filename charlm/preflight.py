"""Checks before work: every place a command will write and every server it will talk to, tried
in seconds before the first training step, so a fault from outside is one line naming the place and
the fix (an :class:`OutsideFault`, exit 2), never a traceback after minutes of training.

- :func:`folder`: the folder exists or can be made, a file can be written and synced in it, and it
  has room (``need`` bytes) for what the command will write there;
- :func:`tracking`: the MLflow store: a SQLite file that is MLflow's (or new) and its artifact
  folder, a local file store, or a tracking server that answers ``/health``;
- :func:`optuna_storage`: a journal whose every complete line is a record (a last line cut off by a
  crash mid-append is dropped, as Optuna's reader skips it), a SQLite file that is Optuna's (or new),
  or a database server that accepts a connection.

Waits are bounded on purpose (README, Reliability): a server gets ``CONNECT_TIMEOUT_S`` to accept a
connection and ``ANSWER_TIMEOUT_S`` to answer, so a slow server is still waited for and a down one
fails within 30 s.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from charlm import paths
from charlm.errors import OutsideFault, first_line

CONNECT_TIMEOUT_S = 5.0  # a server that does not accept a connection in this long is down, or the address is wrong
ANSWER_TIMEOUT_S = 60.0  # a server that accepted may take this long to answer (a busy one still counts)
MIN_FREE = 32 * 2**20  # bytes every folder written must have free, beyond what the command says it needs
SQLITE_CHECK_MAX = 256 * 2**20  # a SQLite file up to this size is checked page by page (quick_check)

MLFLOW_TABLES = {"experiments", "runs"}
OPTUNA_TABLES = {"studies", "version_info"}


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MB"


def _blocker(path: Path) -> Path | None:
    """The nearest ancestor of ``path`` (itself included) that exists and is not a folder."""
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            return None if p.is_dir() else p
    return None


def folder(path: str | Path, what: str, need: int = 0) -> Path:
    """``path`` as a folder this process can write ``need`` bytes into; else one line."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        block = _blocker(path)
        if block is not None:
            raise OutsideFault(f"Cannot create {what} {path}: {block} is a file, not a folder; move that file away "
                               "or choose another place") from None
        raise OutsideFault(f"Cannot create {what} {path}: {e.strerror or e}; choose a place you can write "
                           "(check the disk and its permissions)") from None
    try:
        fd, tmp = tempfile.mkstemp(dir=path, prefix=".charlm-write-check-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(b"\0" * 4096)
                f.flush()
                os.fsync(f.fileno())
        finally:
            os.unlink(tmp)
    except OSError as e:
        raise OutsideFault(f"Cannot write {what} {path}: {e.strerror or e}; free space on its disk, fix its "
                           "permissions, or choose another place") from None
    free = shutil.disk_usage(path).free
    if free < need + MIN_FREE:
        raise OutsideFault(f"{what.capitalize()} {path} has {_mb(free)} free, and this command needs about "
                           f"{_mb(need + MIN_FREE)} there; free space on its disk or choose another place")
    return path


def sqlite_file(path: Path, what: str, tables: set[str]) -> None:
    """An existing SQLite file: a database (not cut short or overwritten), and ``what``'s own (its
    tables), or empty; else one line naming the file."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if path.stat().st_size <= SQLITE_CHECK_MAX:
                bad = [r[0] for r in con.execute("PRAGMA quick_check") if r[0] != "ok"]
                if bad:
                    raise sqlite3.DatabaseError(bad[0])
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        raise OutsideFault(f"{what.capitalize()} {path} is not a readable SQLite database ({e}); move it aside "
                           f"(mv {path} {path}.bad) to start a new one, or restore it from a copy") from None
    if names and not tables <= names:
        shown = ", ".join(sorted(names)[:4]) + (", ..." if len(names) > 4 else "")
        raise OutsideFault(f"{what.capitalize()} {path} is another program's SQLite database (tables {shown}), "
                           "not one of charlm's; give another file")


def server(url: str, what: str, health: str = "/health") -> None:
    """An HTTP server at ``url`` accepts a connection within CONNECT_TIMEOUT_S and answers
    ``health`` with 200 within ANSWER_TIMEOUT_S; else one line naming it (redacted) and the check."""
    parts = urllib.parse.urlsplit(url)
    shown = paths.redact(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    check = f"check it with: curl {shown.rstrip('/')}{health}"
    try:
        with socket.create_connection((parts.hostname or "localhost", port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        reason = f"no answer in {CONNECT_TIMEOUT_S:g} s" if isinstance(e, TimeoutError) else \
            (e.strerror or type(e).__name__)
        raise OutsideFault(f"{what} {shown} is not reachable ({reason}); {check}") from None
    try:
        with urllib.request.urlopen(url.rstrip("/") + health, timeout=ANSWER_TIMEOUT_S) as r:
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    except OSError as e:
        raise OutsideFault(f"{what} {shown} accepted a connection but did not answer ({e}); {check}") from None
    if status != 200:
        raise OutsideFault(f"{what} {shown} answered {health} with HTTP {status}: is it an MLflow server? {check}")


def database(url: str, what: str) -> None:
    """A database server behind an SQLAlchemy URL accepts a connection within CONNECT_TIMEOUT_S."""
    from sqlalchemy import create_engine, text

    try:
        engine = create_engine(url, **engine_kwargs(url))
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
    except Exception as e:  # driver missing, server down, bad credentials: one line, password redacted
        first = first_line(e)
        raise OutsideFault(f"Cannot connect to {what} {paths.redact(url)}: {type(e).__name__}: {first}; check "
                           "that its server runs and accepts this user") from None


def engine_kwargs(url: str) -> dict:
    """SQLAlchemy engine options with the connect timeout charlm sets on purpose (PostgreSQL)."""
    kw: dict = {"pool_pre_ping": True}
    if url.startswith(("postgresql", "postgres:")):
        kw["connect_args"] = {"connect_timeout": int(CONNECT_TIMEOUT_S)}
    return kw


def tracking(uri: str, need: int = 0) -> None:
    """The MLflow store behind ``uri`` can take a run and its artifacts."""
    db = paths.sqlite_path(uri)
    if db is not None and db.is_dir():
        raise OutsideFault(f"The MLflow store {db} is a folder, not a SQLite file; name a file in it "
                           f"(MLFLOW_TRACKING_URI=sqlite:///{db}/mlflow.db)")
    if db is not None:
        folder(db.parent, "the MLflow store's folder", need)
        sqlite_file(db, "the MLflow store", MLFLOW_TABLES)
        folder(db.parent / "artifacts", "the MLflow artifact folder", need)
    elif uri.startswith(("http://", "https://")):
        server(uri, "The MLflow tracking server")
    elif uri.startswith(("postgresql", "postgres:", "mysql")):
        database(uri, "the MLflow store")
    elif "://" not in uri or uri.startswith("file:"):
        folder(Path(uri[len("file://"):] if uri.startswith("file://") else uri), "the MLflow store", need)


def optuna_storage(url: str) -> None:
    """The Optuna storage behind ``url`` can be opened and written."""
    journal = paths.journal_path(url)
    db = paths.sqlite_path(url)
    for file in (journal, db):
        if file is not None and file.is_dir():
            example = f"journal:{file}/study.journal" if file is journal else f"sqlite:///{file}/study.db"
            raise OutsideFault(f"The Optuna storage {file} is a folder, not a file; name a file in it ({example})")
    if journal is not None:
        folder(journal.parent, "the Optuna journal's folder")
        check_journal(journal)
    elif db is not None:
        folder(db.parent, "the Optuna storage's folder")
        sqlite_file(db, "the Optuna storage", OPTUNA_TABLES)
    elif "://" in url:
        database(url, "the Optuna storage")


_CHECKED: dict[Path, tuple[int, int]] = {}


def check_journal(path: Path) -> None:
    """Every complete line of an Optuna journal is a record (a JSON object with an ``op_code``).
    A last line without its newline was cut off by a crash mid-append: the write never finished,
    so the record never counted (Optuna's reader skips it too); it is dropped under the journal's
    lock, before a new record is appended after it and the two garble each other."""
    if not path.is_file():
        return
    stat = path.stat()
    if _CHECKED.get(path) == (stat.st_size, stat.st_mtime_ns):
        return
    data = path.read_bytes()
    lines = data.split(b"\n")
    for number, line in enumerate(lines[:-1], start=1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or "op_code" not in record:
            raise OutsideFault(f"Optuna journal {path} is not a journal, or is corrupt, at line {number} of "
                               f"{len(lines) - 1}; move it aside (mv {path} {path}.bad) to start the study anew, or "
                               "restore it from a copy") from None
    if lines[-1]:
        _drop_cut_record(path)
    stat = path.stat()
    _CHECKED[path] = (stat.st_size, stat.st_mtime_ns)


def _drop_cut_record(path: Path) -> None:
    from optuna.storages.journal import JournalFileOpenLock
    from optuna.storages.journal._file import get_lock_file

    with get_lock_file(JournalFileOpenLock(str(path))):  # no writer is mid-append while we look
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end == len(data):
            return
        records = data[:end].count(b"\n")
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    print(f"Optuna journal {path}: its last record was cut off mid-write ({len(data) - end} bytes, a crash while "
          f"appending); dropped it, the {records} complete records load", file=sys.stderr)
