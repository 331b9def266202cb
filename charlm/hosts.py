"""Which process on which machine: what tells a live worker or run from one whose process died.

A pid can be checked only on its own machine, in its own pid namespace, since its last boot:
``HOST_ID`` holds all three, and :func:`pid_alive` is asked only where they match.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

HOST = socket.gethostname()


def _host_id() -> str:
    """Hostname, boot and pid namespace: pids can be checked only where all three match."""
    parts = [HOST]
    with contextlib.suppress(OSError):
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    return " ".join(parts)


HOST_ID = _host_id()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
