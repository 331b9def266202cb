"""Where run data goes: MLflow for real runs, a null tracker (in memory) for unit tests.

The trainer only calls the :class:`Tracker` protocol below. Step metrics are buffered and sent
with one ``log_batch`` per evaluation: ``log_metric`` on SQLite costs milliseconds per call.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

from charlm import interrupts, paths, preflight
from charlm.errors import CharlmError, OutsideFault, first_line
from charlm.hosts import HOST_ID, pid_alive

SYSTEM_METRICS_INTERVAL = 2.0  # seconds between samples: a smoke trial lasts a few seconds, a real one minutes
# The experiment kind MLflow's UI knows: model training, not GenAI. The 3.17 UI, though, picks its view
# from its GenAI / Model training switch (the `workflowType` URL parameter, else a saved choice,
# else GenAI's overview), so the links charlm prints also carry workflowType=machine_learning.
KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
UI_URL = "http://127.0.0.1:5000"  # where `make ui` serves by default

# Bounded waits on a tracking server, set on purpose (README, Reliability); a user's own setting wins.
# MLflow's defaults (120 s a request, 7 retries backing off by 2) keep a command retrying a dead
# server for minutes. Here: a request may take 60 s (a slow server is still waited for), and a
# refused or dropped one is retried 3 times over about 10 s, so a down server fails in under 30 s.
HTTP_WAITS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "60", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
              "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5"}
for _key, _value in HTTP_WAITS.items():
    os.environ.setdefault(_key, _value)

# MLflow's SQL store logs a full traceback for each database error it then raises (a full disk, a
# locked or corrupt file); charlm reports that error itself, in one line (:func:`unavailable`).
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)

# What a failing store or server says, as MLflow passes it on: a fault from outside, not a bug.
_OUTSIDE = ("max retries exceeded", "connection refused", "connection reset", "connection aborted", "timed out",
            "name or service not known", "temporarily unavailable", "bad gateway", "service unavailable",
            "gateway time", "database is locked", "disk i/o error", "database or disk is full",
            "no space left", "unable to open database", "read-only file system", "readonly database",
            "file is not a database", "database disk image is malformed", "could not connect", "server closed")


def _chain(e: BaseException | None, most: int = 8):
    """``e`` and what caused it, nearest first (``most`` at most: a chain may loop)."""
    for _ in range(most):
        if e is None:
            return
        yield e
        e = e.__cause__ or e.__context__


def outside(e: BaseException) -> bool:
    """Whether ``e`` (or what caused it) is a store or server failing: a connection, a disk, a file.
    The words of one of charlm's own errors that is not an :class:`OutsideFault` are not read as a
    store's: it names its own problem (a missing corpus whose failed download said "name or service
    not known" is not the Optuna storage failing); what caused it still counts."""
    for cause in _chain(e):
        if isinstance(cause, (OSError, TimeoutError)):
            return True
        name = type(cause).__module__ + "." + type(cause).__name__
        if name.startswith(("requests.exceptions.", "urllib3.exceptions.", "sqlite3.")) or \
                name.endswith(("OperationalError", "StorageInternalError")):
            return True
        own = isinstance(cause, CharlmError) and not isinstance(cause, OutsideFault)
        if not own and any(s in str(cause).lower() for s in _OUTSIDE):
            return True
    return False


def telling_line(e: BaseException) -> str:
    """The line of ``e`` (or of what caused it) that names the fault, else ``e``'s first line.
    SQLAlchemy puts its own words first: a full disk met during an autoflush reads "(raised as a
    result of Query-invoked autoflush; ...)" and only its second line says "database or disk is full"."""
    for cause in _chain(e):
        for line in str(cause).splitlines():
            if any(s in line.lower() for s in _OUTSIDE):
                return line.strip()[:200]
    return first_line(e)


def unavailable(uri: str, doing: str, e: BaseException) -> OutsideFault:
    """The one line for a tracking store that failed mid-run."""
    shown, db = paths.redact(uri), paths.sqlite_path(uri)
    fix = (f"check the file and the space left on its disk (df -h {db.parent})" if db is not None else
           f"check it (curl {shown.rstrip('/')}/health for a server)")
    return OutsideFault(f"the MLflow store {shown} failed while {doing} ({type(e).__name__}: {telling_line(e)}); {fix}")


def ui_runs_url(experiment_id: str, run_id: str | None = None) -> str:
    """The `make ui` page of an experiment's runs, or of one run, in the model-training view."""
    return f"{UI_URL}/#/experiments/{experiment_id}/runs" + (f"/{run_id}" if run_id else "") + \
        "?workflowType=machine_learning"

class Tracker(Protocol):
    """What a training run records; :class:`MlflowTracker` and :class:`NullTracker` implement it."""

    run_id: str | None
    workdir: Path  # scratch folder for files before they are logged as artifacts

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def flush(self) -> None: ...  # send buffered metrics now
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def artifact_uri(self, artifact_path: str) -> str: ...
    def log_dataset(self, corpus, context: str = "training") -> None: ...  # lineage: which text
    def start_system_metrics(self, interval: float = SYSTEM_METRICS_INTERVAL) -> None: ...


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///mlruns/mlflow.db`` under the cwd."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        return uri
    if not paths.MLRUNS.is_dir():
        preflight.folder(paths.MLRUNS, "the local MLflow store's folder")
    return f"{paths.SQLITE}{(paths.MLRUNS / 'mlflow.db').resolve()}"


def client(uri: str | None = None):
    """An MLflow client on ``uri`` (default: ``tracking_uri()``, its registry too) whose calls run
    whole: a Ctrl-C or SIGTERM arriving inside one is raised when it returns (charlm/interrupts.py)."""
    from mlflow.tracking import MlflowClient  # slow import; only real runs pay it

    uri = uri or tracking_uri()
    return interrupts.deferring(MlflowClient(tracking_uri=uri, registry_uri=uri))


def artifact_root(uri: str) -> str | None:
    """Artifacts live beside a SQLite store (``<store dir>/artifacts``); a server decides its own."""
    db = paths.sqlite_path(uri)
    return (db.parent / "artifacts").resolve().as_uri() if db is not None else None


def git_commit() -> str:
    """HEAD of the checkout this code runs from, with ``-dirty`` when files are modified."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=paths.REPO_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()

    try:
        head, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("-dirty" if head and dirty else "")


class NullTracker:
    """Keeps everything in memory; for tests and for runs nobody wants recorded."""

    run_id: str | None = None

    def __init__(self, workdir: str | Path | None = None):
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="charlm-")
        self.workdir = Path(workdir or self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.params: dict[str, Any] = {}
        self.metrics: dict[str, list[tuple[int | None, float]]] = {}
        self.tags: dict[str, str] = {}
        self.artifacts: list[str] = []
        self.datasets: list[dict[str, Any]] = []
        self.system_metrics: float | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update({k: str(v) for k, v in params.items()})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for k, v in metrics.items():
            self.metrics.setdefault(k, []).append((step, float(v)))

    def flush(self) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.tags.update({k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.artifacts.append(f"{artifact_path}/{Path(path).name}" if artifact_path else Path(path).name)

    def artifact_uri(self, artifact_path: str) -> str:
        return str(self.workdir / artifact_path)

    def log_dataset(self, corpus, context: str = "training") -> None:
        self.datasets.append(dataset_fields(corpus, context))

    def start_system_metrics(self, interval: float = SYSTEM_METRICS_INTERVAL) -> None:
        self.system_metrics = interval


class MlflowTracker:
    """One MLflow run, used as a context manager.

    Ends FINISHED on success, KILLED on Ctrl-C/SIGTERM, FAILED on any other exception, so no run
    is left RUNNING by a process that exits normally or by signal.
    """

    def __init__(self, experiment: str, run_name: str = "", parent_run_id: str | None = None,
                 tags: dict[str, str] | None = None, uri: str | None = None, run_id: str | None = None):
        """A new run, or with ``run_id`` the same run reopened (a promoted trial continues its curve)."""
        self.uri = uri or tracking_uri()
        self.down = False  # the store failed: the run cannot be ended there now (close_dead_runs does, later)
        self.run_id = run_id
        self.client = client(self.uri)
        with self._guard("starting a run"):
            self.experiment_id = get_or_create_experiment(experiment, self.uri, self.client)
            if (self.uri, self.experiment_id) not in _SWEPT:  # once per process: a sweep opens a run per trial
                close_dead_runs(self.client, self.experiment_id)
                _SWEPT.add((self.uri, self.experiment_id))
            if run_id:
                self.client.set_tag(run_id, PID_TAG, str(os.getpid()))  # this process keeps it now
                self.client.set_tag(run_id, HOST_TAG, HOST_ID)
                self.client.update_run(run_id, status="RUNNING")
                run = self.client.get_run(run_id)
            else:
                all_tags = source_tags()
                if parent_run_id:
                    all_tags["mlflow.parentRunId"] = parent_run_id
                all_tags.update(tags or {})
                run = self.client.create_run(self.experiment_id, run_name=run_name or None, tags=all_tags)
        self.run_id = run.info.run_id
        self._artifact_uri = run.info.artifact_uri
        self._buffer: list = []
        self._tmp = tempfile.TemporaryDirectory(prefix="charlm-run-")
        self.workdir = Path(self._tmp.name)
        self.status: str | None = None
        self._monitor = None

    def __enter__(self) -> MlflowTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            status = "FINISHED"
        elif issubclass(exc_type, (KeyboardInterrupt, SystemExit)):
            status = "KILLED"
        else:
            status = "FAILED"
            if not self.down:
                with contextlib.suppress(OutsideFault):  # the error being raised is the one to report
                    self.set_tags({"error": f"{exc_type.__name__}: {exc}"[:5000]})
        self.end(status)

    @contextlib.contextmanager
    def _guard(self, doing: str):
        """A call to the store: where the store or its server fails (see :func:`outside`), one line
        naming it, and the run marked down so ending it does not wait on the store again."""
        try:
            yield
        except OutsideFault:
            self.down = True
            raise
        except Exception as e:
            if not outside(e):
                raise
            self.down = True
            raise unavailable(self.uri, f"{doing} (run {self.run_id})" if self.run_id else doing, e) from None

    def end(self, status: str = "FINISHED") -> None:
        """End the run with ``status``. A store that failed earlier is not waited on again: the run
        stays RUNNING there until the next run starts in its experiment (:func:`close_dead_runs`)."""
        if self.status is not None:
            return
        try:
            if self._monitor is not None:
                self._monitor.finish()  # its last samples are written before the run ends
            if not self.down:
                self.flush()
        finally:
            self.status = status
            self._tmp.cleanup()
            if not self.down:
                try:
                    with self._guard("ending the run"):
                        self.client.set_terminated(self.run_id, status=status)
                except OutsideFault:
                    if status == "FINISHED":
                        raise
                    # already failing for another reason: that one is the error to report

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        with self._guard("logging parameters"):
            for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
                self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._buffer += [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()]

    def flush(self) -> None:
        with self._guard("logging metrics"):
            while self._buffer:
                self.client.log_batch(self.run_id, metrics=self._buffer[:1000])
                self._buffer = self._buffer[1000:]  # dropped once sent: a failed batch is sent again

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        with self._guard("setting tags"):
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        with self._guard(f"storing artifact {Path(path).name}"):
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def download(self, artifact_path: str) -> Path:
        """One of this run's artifacts, copied into the scratch folder (from any host)."""
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bar per promoted trial in the log
        with self._guard(f"fetching artifact {artifact_path}"):
            return Path(self.client.download_artifacts(self.run_id, artifact_path, str(self.workdir)))

    def artifact_uri(self, artifact_path: str) -> str:
        """Where an artifact of this run lives, as a local path when the store is local."""
        uri = f"{self._artifact_uri}/{artifact_path}"
        return uri[len("file://"):] if uri.startswith("file://") else uri

    def start_system_metrics(self, interval: float = SYSTEM_METRICS_INTERVAL) -> None:
        """MLflow's sampler of CPU, memory, disk and network (``system/*`` metrics) on this run, in
        a thread, until the run ends."""

        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop lines per run
        if self._monitor is None:
            self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval, tracking_uri=self.uri)
            self._monitor.start()

    def log_dataset(self, corpus, context: str = "training") -> None:
        """The corpus as the run's MLflow dataset input (lineage: which text, read from where).

        The store inserts a dataset on its first use in an experiment. Runs starting at the same
        moment (workers on several hosts) race for that insert and the losers get a unique-key
        error from the server; tried again, they find the winner's row and link to it."""
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.exceptions import MlflowException

        d = dataset_fields(corpus, context)
        entity = Dataset(name=d["name"], digest=d["digest"], source_type="local",
                         source=json.dumps({"uri": d["source"]}),
                         profile=json.dumps(d["profile"]))
        for attempt in range(3):
            try:
                with self._guard("logging the dataset"):
                    self.client.log_inputs(self.run_id, [DatasetInput(entity, [InputTag("mlflow.data.context",
                                                                                        context)])])
                return
            except MlflowException:
                if attempt == 2:
                    raise
                time.sleep(0.2 * (attempt + 1))


def dataset_fields(corpus, context: str) -> dict[str, Any]:
    """What identifies a corpus. MLflow caps a digest at 36 characters: the digest is the head of
    the sha256, whose full value is in the profile (and in the run's ``data_sha256`` param)."""
    return {"name": corpus.path.name, "digest": corpus.sha256[:36], "source": Path(corpus.path).resolve().as_uri(),
            "context": context, "profile": {"sha256": corpus.sha256, "chars": len(corpus.data),
                                            "vocab_size": len(corpus.vocab)}}


def source_tags() -> dict[str, str]:
    """MLflow's standard source tags: who ran it, from what, at which commit."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (some containers)
        user = str(os.getuid())
    return {"mlflow.user": user, "mlflow.source.type": "LOCAL", "mlflow.source.name": "charlm",
            "mlflow.source.git.commit": git_commit(), HOST_TAG: HOST_ID, PID_TAG: str(os.getpid())}


HOST_TAG, PID_TAG = "charlm.host_id", "charlm.pid"  # the process that keeps a run RUNNING (charlm/hosts.py)


_SWEPT: set[tuple[str, str]] = set()  # (store, experiment) this process has run close_dead_runs on


def close_dead_runs(mlflow_client, experiment_id: str) -> list[str]:
    """End FAILED the runs of ``experiment_id`` left RUNNING by a process of this machine that is
    gone (killed, or stopped by a fault while its store was unreachable), so no run stays RUNNING
    once its store answers again. Runs of other machines are theirs to judge (charlm/workers.py)."""
    ended = []
    runs = mlflow_client.search_runs([experiment_id], filter_string=f"attributes.status = 'RUNNING' and "
                                     f"tags.`{HOST_TAG}` = '{HOST_ID}'", max_results=1000)
    for r in runs:
        pid = r.data.tags.get(PID_TAG, "")
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            mlflow_client.set_tag(r.info.run_id, "error", f"process {pid} died before it ended this run")
            mlflow_client.set_terminated(r.info.run_id, status="FAILED")
            ended.append(r.info.run_id)
    if ended:
        print(f"ended {len(ended)} MLflow run(s) FAILED that a process which died had left RUNNING", file=sys.stderr)
    return ended


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive lock among the processes of this machine, held by a lock file at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def store_lock(uri: str):
    """Two processes creating a fresh SQLite MLflow store at once corrupt it: serialise the first
    touch (schema creation, experiment creation) with a lock file beside the database."""
    db = paths.sqlite_path(uri)
    if db is None:
        yield
        return
    with file_lock(db.with_name(db.name + ".lock")):
        yield


def get_or_create_experiment(name: str, uri: str, mlflow_client=None) -> str:
    """The experiment's id, creating it (artifacts beside a SQLite store) if needed; race-safe."""
    with store_lock(uri):
        return _get_or_create_experiment(mlflow_client or client(uri), name, uri)


def _get_or_create_experiment(client, name: str, uri: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise CharlmError(
                f"MLflow experiment '{name}' is deleted; restore it in the UI or pick another name"
            )
        if not exp.tags.get(KIND_TAG):  # made before charlm set it, or by hand
            client.set_experiment_tag(exp.experiment_id, KIND_TAG, MODEL_TRAINING)
        return exp.experiment_id
    root = artifact_root(uri)
    location = f"{root}/{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}" if root else None
    try:
        return client.create_experiment(name, artifact_location=location, tags={KIND_TAG: MODEL_TRAINING})
    except MlflowException:
        exp = client.get_experiment_by_name(name)  # another process created it first
        if exp is None:
            raise
        return exp.experiment_id

