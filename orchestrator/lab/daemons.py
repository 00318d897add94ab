"""shoald in the lab's nodes: one per node, recorded so `shoal lab down` stops it with the lab.

`shoal lab up` starts them (unless --no-daemons); `shoal lab exec swN -- shoal ...` runs the CLI
against swN's shoald. One code path for both kinds of lab: the lab's backend
(orchestrator/lab/backend.py) says how a node runs a daemon (`daemon_argv`), where shoald's
socket and data root are, and its other options. In a namespace lab they are under the lab's
run dir (`/run/shoal/lab/<lab>/swN/`), reachable from the host too (`shoal lab env swN`); in a
VM lab, shoald runs inside the VM, started through the VM's agent like any command there (its
local stand-in is what is recorded), its socket and data root on the VM's own tmpfs. Either
way its log is `/run/shoal/lab/<lab>/swN/shoald.log` on the host.

In a lab with the container executor, a node's engine (orchestrator/lab/engines.py) starts
before its shoald, which runs `--executor container --engine unix://<the engine's socket>`;
the lab's registry (orchestrator/lab/registry.py) is started and seeded first if it is not
running. Other labs' shoalds run `--executor native`.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path

from orchestrator.lab.lab import backend
from orchestrator.lab.record import Lab, LabError, Node, add_process, load, running


def node_dir(lab: Lab, node: str) -> Path:
    """The node's directory on the host: shoald's log; in a namespace lab its socket and data."""
    return lab.run_dir / node


def socket_path(lab: Lab, node: str) -> Path:
    """shoald's API socket; in a VM lab, a path inside the node's VM."""
    return backend(lab).shoald_socket(lab, node)


def docker_host(lab: Lab, node: str) -> str:
    """DOCKER_HOST for the node's shoald; in a VM lab, valid inside the node's VM only."""
    lab.node(node)  # a clear error for an unknown node
    return f"unix://{socket_path(lab, node)}"


def _argv(lab: Lab, node: Node) -> list[str]:
    """The command line of the node's shoald, on this machine."""
    lab_backend = backend(lab)
    daemon = [
        sys.executable,
        "-m",
        "orchestrator.daemon",
        "--host",
        f"unix://{lab_backend.shoald_socket(lab, node.name)}",
        "--data-root",
        str(lab_backend.shoald_data_root(lab, node.name)),
        "--hostname",
        node.name,
        *lab_backend.shoald_options(lab, node.name),
    ]
    return lab_backend.daemon_argv(lab, node.name, daemon)


def start(lab: Lab, node: Node) -> int | None:
    """Start shoald in a node unless it answers already, recorded so `down` stops it; returns
    the new pid (in a VM lab, that of its local stand-in: signals and kills go through it).
    In a container lab, the node's engine first (and the lab's registry, if it is not up)."""
    backend(lab).start_engine(lab, node.name)
    if answers(lab, node.name):
        return None
    d = node_dir(lab, node.name)
    d.mkdir(parents=True, exist_ok=True)
    log = open(d / "shoald.log", "ab")  # noqa: SIM115 - handed to the child
    try:
        proc = subprocess.Popen(
            _argv(lab, node),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        log.close()
    add_process(lab.name, node.name, proc.pid)
    return proc.pid


def answers(lab: Lab, node: str) -> bool:
    """Does the node's shoald answer /_ping?"""
    return backend(lab).shoald_answers(lab, node)


def _started_alive(lab: Lab, node: str) -> bool:
    """Is a shoald started in the node (or its local stand-in, in a VM lab) still running?"""
    record = load(lab.name) or lab
    for pid in running(record, node):
        with contextlib.suppress(OSError):
            if b"orchestrator.daemon" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
    return False


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_ready(lab: Lab, node: str, timeout: float | None = None) -> None:
    """Until the node's shoald answers; LabError if it exits or takes longer than timeout
    (default: the backend's)."""
    lab_backend = backend(lab)
    if timeout is None:
        timeout = lab_backend.shoald_timeout
    log = node_dir(lab, node) / "shoald.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if answers(lab, node):
            return
        if not _started_alive(lab, node):
            raise LabError(f"shoald in {node} exited; {log}:\n{_tail(log)}")
        time.sleep(lab_backend.shoald_poll)
    raise LabError(f"shoald in {node} did not come up within {timeout:.0f} s; see {log}")


def start_all(lab: Lab) -> None:
    """shoald in every node of the lab (idempotent), recorded so `down` stops them; in a
    container lab, the registry and every node's engine first."""
    backend(lab).start_engines(lab)
    for node in lab.nodes:
        start(lab, node)
    for node in lab.nodes:
        wait_ready(lab, node.name)
