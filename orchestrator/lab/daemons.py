"""shoald in the lab's nodes: one per node, recorded so `shoal lab down` stops it with the lab.

`shoal lab up` starts them (unless --no-daemons); `shoal lab exec swN -- shoal ...` runs the CLI
against swN's shoald. In a namespace lab, shoald's socket and data root are under the lab's run
dir (`/run/shoal/lab/<lab>/swN/`), reachable from the host too (`shoal lab env swN`). In a VM
lab, shoald runs inside the VM, started through the VM's agent like any command there (its
local stand-in is what is recorded): its socket and data root are on the VM's own tmpfs
(`/run/shoal/shoal.sock`, `/var/lib/shoal`: a unix socket on the 9p-shared run dir would not
connect), so only commands in the VM reach it; its log is still
`/run/shoal/lab/<lab>/swN/shoald.log` on the host.

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

from orchestrator.lab import engines, registry, vm, vmagent
from orchestrator.lab.lab import (
    Lab,
    LabError,
    Node,
    add_process,
    exec_argv,
    load,
    running,
    start_engines,
)

# Inside a VM (its /run and root are tmpfs); the VM agent points DOCKER_HOST here.
VM_SOCKET = Path(vmagent.SHOALD_SOCKET)
VM_DATA_ROOT = Path("/var/lib/shoal")
# shoald imports a lot: ~10-30 s under emulation, three VMs at once on a couple of cores
VM_READY_TIMEOUT = 240.0


def node_dir(lab: Lab, node: str) -> Path:
    """The node's directory on the host: shoald's log; in a namespace lab its socket and data."""
    return lab.run_dir / node


def socket_path(lab: Lab, node: str) -> Path:
    """shoald's API socket; in a VM lab, a path inside the node's VM."""
    if lab.kind == vm.KIND:
        return VM_SOCKET
    return node_dir(lab, node) / "shoal.sock"


def docker_host(lab: Lab, node: str) -> str:
    """DOCKER_HOST for the node's shoald; in a VM lab, valid inside the node's VM only."""
    lab.node(node)  # a clear error for an unknown node
    return f"unix://{socket_path(lab, node)}"


def _executor_args(lab: Lab, node: str) -> list[str]:
    if lab.containers:
        return ["--executor", "container", "--engine", engines.socket_url(lab, node)]
    return ["--executor", "native"]


def _argv(lab: Lab, node: Node) -> list[str]:
    if lab.kind == vm.KIND:
        daemon = [
            sys.executable,
            "-m",
            "orchestrator.daemon",
            "--host",
            f"unix://{VM_SOCKET}",
            "--data-root",
            str(VM_DATA_ROOT),
            "--hostname",
            node.name,
            *_executor_args(lab, node.name),
        ]
        return exec_argv(lab, node.name, daemon)
    # nsenter, not `ip netns exec`: that gives the process a mount namespace of its own, and
    # the task namespaces shoald creates (bind mounts in /run/netns) would be invisible to the
    # host: `ip netns exec <task>` from the host would fail.
    return [
        "nsenter",
        f"--net=/run/netns/{node.netns}",
        sys.executable,
        "-m",
        "orchestrator.daemon",
        "--host",
        f"unix://{socket_path(lab, node.name)}",
        "--data-root",
        str(node_dir(lab, node.name) / "data"),
        "--hostname",
        node.name,
        "--netns-prefix",
        node.netns,
        *_executor_args(lab, node.name),
    ]


def start(lab: Lab, node: Node) -> int | None:
    """Start shoald in a node unless it answers already, recorded so `down` stops it; returns
    the new pid (in a VM lab, that of its local stand-in: signals and kills go through it).
    In a container lab, the node's engine first (and the lab's registry, if it is not up)."""
    if lab.containers:
        if not registry.is_running(lab):
            registry.start(lab)
            registry.seed(lab)
        engines.start(lab, node.name)
        engines.wait_ready(lab, node.name)
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


def ping(path: Path) -> bool:
    """Does the Engine API on this unix socket (shoald's) answer /_ping?"""
    return engines.ping(path)


def answers(lab: Lab, node: str) -> bool:
    """Does the node's shoald answer /_ping?"""
    if lab.kind == vm.KIND:
        probe = ["curl", "-sf", "-m", "3", "--unix-socket", str(VM_SOCKET), "http://x/_ping"]
        try:
            return vm.run(lab, node, probe, timeout=15).returncode == 0
        except OSError:
            return False
    path = socket_path(lab, node)
    return path.exists() and ping(path)


def _standin_alive(lab: Lab, node: str) -> bool:
    """Is a local stand-in of the node's shoald (VM labs) still running?"""
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
    in_vm = lab.kind == vm.KIND
    if timeout is None:
        timeout = VM_READY_TIMEOUT if in_vm else 20.0
    log = node_dir(lab, node) / "shoald.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if answers(lab, node):
            return
        if in_vm and not _standin_alive(lab, node):
            raise LabError(f"shoald in {node} exited; {log}:\n{_tail(log)}")
        time.sleep(1.0 if in_vm else 0.1)
    raise LabError(f"shoald in {node} did not come up within {timeout:.0f} s; see {log}")


def start_all(lab: Lab) -> None:
    """shoald in every node of the lab (idempotent), recorded so `down` stops them; in a
    container lab, the registry and every node's engine first."""
    start_engines(lab)
    for node in lab.nodes:
        start(lab, node)
    for node in lab.nodes:
        wait_ready(lab, node.name)
