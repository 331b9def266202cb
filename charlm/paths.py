"""Where things live: every folder charlm writes under ``mlruns/``, and the storage URLs it parses.

Relative to the working directory, like MLflow's own ``mlruns`` default, so a test (or a worker
machine) that runs in another folder keeps its own store.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MLRUNS = Path("mlruns")
BEST_ROOT = MLRUNS / "best"  # mlruns/best/<study>/: the model `make best` saved
REPORT_ROOT = MLRUNS / "reports"  # mlruns/reports/<study>/report.md and its plots
STATES = MLRUNS / "states"  # mlruns/states/train-<config hash>.pt: a `train` a fault stopped, resumed by the same command
DEFAULT_MODEL = str(BEST_ROOT)  # `eval`/`sample` without --model: the newest best model

JOURNAL = "journal:"
SQLITE = "sqlite:///"
_PASSWORD = re.compile(r"(://[^:/@]+):[^@]*@")  # user:password@ in a URL


def default_storage(study: str) -> str:
    """A sweep without ``study.storage`` keeps its study in a journal file."""
    return f"{JOURNAL}{MLRUNS}/optuna/{study}.journal"


def sweep_lock(study: str) -> Path:
    """The lock file this machine's workers take around count-and-ask for an RDB server without a
    lock of its own (not PostgreSQL): n_trials is then exact per machine only."""
    return MLRUNS / f".sweep-{study}.lock"


def journal_path(url: str) -> Path | None:
    """``journal:PATH`` -> PATH; None for any other URL."""
    return Path(url[len(JOURNAL):]) if url.startswith(JOURNAL) else None


def sqlite_path(url: str) -> Path | None:
    """``sqlite:///PATH`` -> PATH; None for any other URL."""
    return Path(url[len(SQLITE):]) if url.startswith(SQLITE) else None


def has_password(url: str) -> bool:
    return bool(_PASSWORD.search(url))


def redact(url: str) -> str:
    """``postgresql://user:secret@host/db`` -> ``postgresql://user:***@host/db``."""
    return _PASSWORD.sub(r"\1:***@", url)
