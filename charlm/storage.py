"""The Optuna side of a sweep's storage: open it, lock it, open the study in it.

Any Optuna RDB URL (``sqlite:///``, ``postgresql://``, ``mysql://``) or ``journal:PATH`` for a
journal file (the default, under ``mlruns/optuna/``). The journal's own lock file is held with
Ctrl-C and SIGTERM deferred (see charlm/interrupts.py).

``study_lock`` serialises count-and-ask among every worker that shares the storage: a
PostgreSQL advisory lock (every host sees it), or a lock file beside a journal or SQLite file.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from dataclasses import dataclass, field
from pathlib import Path

import optuna

from charlm import interrupts, paths, preflight
from charlm.errors import CharlmError, OutsideFault, first_line
from charlm.search import make_pruner, make_sampler
from charlm.sweepfile import SweepSpec
from charlm.tracking import file_lock

optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass
class Session:
    """Everything a worker needs, built once per process."""

    spec: SweepSpec
    storage_url: str
    study: optuna.Study
    parent_run_id: str
    worker: int = 0
    beats: dict = field(default_factory=dict)  # trial id -> (heartbeat seen, this process's monotonic time)
    experiment_id: str = ""  # the MLflow experiment, where the coordinator knows it
    stop_at: float | None = None  # the plan's deadline (epoch s): a trial in flight stops there, none starts a rung past it
    deadline: float | None = None  # when new work stops: the plan's deadline, else study.timeout_min's (epoch s)


def storage_url(spec: SweepSpec) -> str:
    """The sweep's storage, or by default a journal file: mlruns/optuna/<study>.journal."""
    return spec.study.storage or paths.default_storage(spec.study.name)


def open_storage(url: str):
    """The storage behind ``url``; a URL that cannot be opened is one line naming it, redacted."""
    journal = paths.journal_path(url)
    if journal is None and "://" not in url:
        raise CharlmError(f"Storage '{paths.redact(url)}' is not a URL; use sqlite:///file.db, postgresql://..., "
                          "or journal:path")
    preflight.optuna_storage(url)  # its folder, and a journal's or SQLite file's contents: one line each
    if journal is not None:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        try:
            return JournalStorage(JournalFileBackend(str(journal), lock_obj=_GuardedOpenLock(str(journal))))
        except (ValueError, KeyError, TypeError, IndexError) as e:  # records that parse but do not replay
            raise OutsideFault(f"Optuna journal {journal} does not replay ({type(e).__name__}: {e}); move it aside "
                               f"(mv {journal} {journal}.bad) to start the study anew, or restore it from a copy") from None
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=preflight.engine_kwargs(url))
    except Exception as e:  # driver missing, server down, bad credentials
        raise OutsideFault(f"Cannot open Optuna storage {paths.redact(url)}: {type(e).__name__}: "
                           f"{first_line(e)}") from None


def storage_fault(url: str, e: BaseException, during: str = "") -> OutsideFault:
    """A storage that failed mid-sweep (a database server stopped, a disk full) as one line naming
    it, password redacted, from the deepest cause (the driver's own words, not Optuna's wrapper)."""
    cause = e
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
    first = first_line(cause)
    return OutsideFault(f"the Optuna storage {paths.redact(url)} failed{' ' + during if during else ''} "
                        f"({type(cause).__name__}: {paths.redact(first)}); check that it runs and answers")


class _GuardedOpenLock(optuna.storages.journal.JournalFileOpenLock):
    """Optuna's lock file, held with Ctrl-C and SIGTERM deferred (see charlm/interrupts.py).

    Optuna breaks a stale lock file by calling ``release()`` from inside ``acquire()``: that
    release ends no section of ours, so it leaves the deferral alone."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._local = threading.local()  # the heartbeat thread shares this lock object

    def acquire(self) -> bool:
        interrupts.enter()
        self._local.acquiring = True
        try:
            return super().acquire()
        except BaseException:
            interrupts.leave()
            raise
        finally:
            self._local.acquiring = False

    def release(self) -> None:
        if getattr(self._local, "acquiring", False):
            super().release()
            return
        try:
            super().release()
        finally:
            interrupts.leave()


def artifact_store(study: str):
    """Optuna's artifact store of a study, ``mlruns/optuna-artifacts/<study>/``: files the
    optuna-dashboard shows on each trial (its loss curve), shared by the sweep and `make dashboard`."""
    from optuna.artifacts import FileSystemArtifactStore

    base = paths.MLRUNS / "optuna-artifacts" / study
    if base.absolute() not in _ARTIFACTS_CHECKED:  # a synced test write once per process, not per trial
        preflight.folder(base, "the Optuna artifact folder")
        _ARTIFACTS_CHECKED.add(base.absolute())
    return FileSystemArtifactStore(base_path=str(base))


_ARTIFACTS_CHECKED: set[Path] = set()


def lock_path(spec: SweepSpec, url: str) -> Path:
    """The lock file beside a journal or SQLite file (every process that opens it sees it); for
    another RDB without a lock of its own, a file in this machine's mlruns/."""
    journal = paths.journal_path(url)
    if journal is not None:
        return Path(f"{journal}.charlm-lock")  # not ".lock": Optuna's own journal lock uses that
    db = paths.sqlite_path(url)
    if db is not None:
        return Path(f"{db}.charlm-lock")
    return paths.sweep_lock(spec.study.name)


_ENGINES: dict[str, object] = {}


@contextlib.contextmanager
def study_lock(spec: SweepSpec, url: str):
    """Held around count-and-ask (and the study's creation) by every worker of the study."""
    if not url.startswith(("postgresql:", "postgresql+", "postgres:")):
        with file_lock(lock_path(spec, url)):
            yield
        return
    from sqlalchemy import create_engine, text

    if url not in _ENGINES:
        _ENGINES[url] = create_engine(url, pool_size=1, **preflight.engine_kwargs(url))
    key = int.from_bytes(hashlib.sha256(f"charlm-study:{spec.study.name}".encode()).digest()[:8], "big", signed=True)
    try:
        conn = _ENGINES[url].connect()
    except Exception as e:  # server down, bad credentials: one line, password redacted
        raise OutsideFault(f"Cannot lock study '{spec.study.name}' in {paths.redact(url)}: {type(e).__name__}: "
                          f"{first_line(e)}") from None
    with conn, conn.begin():  # a transaction-level lock: it ends with the transaction or the connection
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
        yield


def open_planned(spec: SweepSpec, storage_url: str) -> tuple[SweepSpec, optuna.Study]:
    """The study, with the plan it keeps applied to ``spec`` (charlm/plan.py) and to its sampler."""
    from charlm.plan import for_study

    study = open_study(spec, storage_url)
    planned = for_study(spec, study)
    if planned.plan is not None:
        retune(study, planned)
    return planned, study


def retune(study: optuna.Study, spec: SweepSpec) -> None:
    """The study's sampler and pruner as ``spec`` (a planned one) sets them."""
    study.sampler = make_sampler(spec)
    study.pruner = make_pruner(spec, spec.base_config().train.max_minutes)


def open_study(spec: SweepSpec, storage_url: str, create: bool = False) -> optuna.Study:
    base = spec.base_config()
    storage = open_storage(storage_url)
    kw = dict(study_name=spec.study.name, storage=storage, sampler=make_sampler(spec),
              pruner=make_pruner(spec, base.train.max_minutes))
    if create:
        return optuna.create_study(direction=spec.study.direction, load_if_exists=True, **kw)
    try:
        return optuna.load_study(**kw)
    except KeyError:
        raise CharlmError(f"No study '{spec.study.name}' in {paths.redact(storage_url)}; run the sweep first") from None
