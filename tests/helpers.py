"""What test files share: the repository's paths, the CLI as a user runs it, a free port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Development and CI keep a copy of the corpus in ../shared/data; a user's own setting wins.
os.environ.setdefault("CHARLM_DATA_MIRROR", str(ROOT.parent / "shared" / "data"))
MIRROR = Path(os.environ["CHARLM_DATA_MIRROR"])
PYTHON = sys.executable


def cli(*args, cwd=None, timeout=600, env=None) -> subprocess.CompletedProcess:
    """``python -m charlm ARGS`` in a real process, output captured as text."""
    return subprocess.run([PYTHON, "-m", "charlm", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
