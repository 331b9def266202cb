"""A throwaway LAN of network namespaces: a server host and worker hosts on one bridge.

Each host is a network namespace named ``charlm-<host>-<suffix>`` with its own address in a /24 of
10.213.0.0/16; the bridge lives in the server's namespace, and one veth pair gives this (root)
namespace an address on it too, so a test can reach the servers. Worker processes also get their
own UTS namespace (own hostname). ``lan()`` removes every namespace and link it made, and kills
any process still inside them, however the test ends. Needs root and iproute2.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import signal
import subprocess
from dataclasses import dataclass, field


def ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and r.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return r


@dataclass
class Lan:
    suffix: str
    subnet: str  # e.g. 10.213.57
    ns: dict[str, str] = field(default_factory=dict)  # host -> namespace
    addr: dict[str, str] = field(default_factory=dict)  # host -> address
    links: list[str] = field(default_factory=list)  # links made in the root namespace

    def exec(self, host: str, *cmd: str, hostname: str | None = None) -> list[str]:
        """``cmd`` run on ``host`` (and under ``hostname`` in a UTS namespace of its own)."""
        prefix = ["ip", "netns", "exec", self.ns[host]]
        if hostname is None:
            return [*prefix, *cmd]
        # the script is a constant; the name and the command are arguments
        return [*prefix, "unshare", "--uts", "sh", "-c", 'echo "$0" > /proc/sys/kernel/hostname && exec "$@"',
                hostname, *cmd]


def _add_host(lan: Lan, host: str, number: int, bridge: str) -> None:
    lan.addr[host] = f"{lan.subnet}.{number}"
    ns = None
    if host != "test":  # the test's own end stays in the root namespace
        ns = lan.ns[host] = f"charlm-{host}-{lan.suffix}"
        ip("netns", "add", ns)
        ip("link", "set", "lo", "up", ns=ns)
    if host == "server":
        ip("link", "add", bridge, "type", "bridge", ns=ns)
        ip("addr", "add", f"{lan.addr[host]}/24", "dev", bridge, ns=ns)
        ip("link", "set", bridge, "up", ns=ns)
        return
    outer, inner = f"cv{host[0]}{lan.suffix}", f"cp{host[0]}{lan.suffix}"
    ip("link", "add", outer, "type", "veth", "peer", "name", inner, "netns", lan.ns["server"])
    lan.links.append(outer)
    ip("link", "set", inner, "master", bridge, "up", ns=lan.ns["server"])
    if ns is not None:
        ip("link", "set", outer, "netns", ns)
        lan.links.remove(outer)
    ip("addr", "add", f"{lan.addr[host]}/24", "dev", outer, ns=ns)
    ip("link", "set", outer, "up", ns=ns)


@contextlib.contextmanager
def lan(hosts: tuple[str, ...]):
    """Hosts ``server`` (.1), then ``hosts`` (.2, .3, ...), and this namespace as ``test`` (.254)."""
    assert os.geteuid() == 0, "the scale-out test makes network namespaces: run it as root (CI does)"
    suffix = secrets.token_hex(3)
    net = Lan(suffix, f"10.213.{random.randint(1, 254)}")
    try:
        _add_host(net, "server", 1, f"cbr{suffix}")
        for i, host in enumerate(hosts, start=2):
            _add_host(net, host, i, f"cbr{suffix}")
        _add_host(net, "test", 254, f"cbr{suffix}")
        yield net
    finally:
        for ns in net.ns.values():
            pids = ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:  # only processes this test started can be in there
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            ip("netns", "del", ns, check=False)
        for link in net.links:
            ip("link", "del", link, check=False)
