"""shoald in the lab's nodes: one per node, with its socket and state under the lab's run dir.

`shoal lab up` starts them; `shoal lab exec swN -- ...` and `shoal lab env swN` point clients at
swN's socket; `shoal lab down` stops them with the lab.
"""

from __future__ import annotations

import http.client
import socket
import subprocess
import sys
import time
from pathlib import Path

from orchestrator.lab.lab import Lab, LabError, Node, add_process


def node_dir(lab: Lab, node: str) -> Path:
    return lab.run_dir / node


def socket_path(lab: Lab, node: str) -> Path:
    return node_dir(lab, node) / "shoal.sock"


def docker_host(lab: Lab, node: str) -> str:
    lab.node(node)  # a clear error for an unknown node
    return f"unix://{socket_path(lab, node)}"


def start(lab: Lab, node: Node) -> int | None:
    """Start shoald in a node unless it answers already, recorded so `down` stops it; returns
    the new pid."""
    if ping(socket_path(lab, node.name)):
        return None
    d = node_dir(lab, node.name)
    d.mkdir(parents=True, exist_ok=True)
    log = open(d / "shoald.log", "ab")  # noqa: SIM115 - handed to the child
    try:
        proc = subprocess.Popen(
            # nsenter, not `ip netns exec`: that gives the process a mount namespace of its
            # own, and the task namespaces shoald creates (bind mounts in /run/netns) would be
            # invisible to the host: `ip netns exec <task>` from the host would fail.
            [
                "nsenter",
                f"--net=/run/netns/{node.netns}",
                sys.executable,
                "-m",
                "orchestrator.daemon",
                "--host",
                f"unix://{socket_path(lab, node.name)}",
                "--data-root",
                str(d / "data"),
                "--hostname",
                node.name,
                "--netns-prefix",
                node.netns,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        log.close()
    add_process(lab.name, node.name, proc.pid)
    return proc.pid


def wait_ready(lab: Lab, node: str, timeout: float = 20.0) -> None:
    path = socket_path(lab, node)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and ping(path):
            return
        time.sleep(0.1)
    raise LabError(
        f"shoald in {node} did not come up within {timeout:.0f} s; see "
        f"{node_dir(lab, node) / 'shoald.log'}"
    )


def ping(path: Path) -> bool:
    conn = _UnixConnection(str(path))
    try:
        conn.request("GET", "/_ping")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("localhost", timeout=2)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(2)
        sock.connect(self.path)
        self.sock = sock


def start_all(lab: Lab) -> None:
    """shoald in every node of the lab (idempotent), recorded so `down` stops them."""
    for node in lab.nodes:
        start(lab, node)
    for node in lab.nodes:
        wait_ready(lab, node.name)
