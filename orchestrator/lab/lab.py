"""The lab: nodes sw1..swN on one underlay, as network namespaces or as QEMU VMs.

The entry points: `up`, `down`, and `exec_argv` (a command line running a command in a node),
whatever the lab's kind. `backend(lab)` is the lab's backend, chosen from its record's kind:
orchestrator/lab/netns.py (namespaces, the default) or orchestrator/lab/vm.py (VMs, `shoal lab
up --vm`), both behind orchestrator/lab/backend.py's interface. The record and its lock are
orchestrator/lab/record.py; their names are exported here too, for the lab's users.
docs/architecture.md ("The lab") has the layout.
"""

from __future__ import annotations

import contextlib
import ipaddress
import shutil

from orchestrator.lab.backend import LabBackend, Say
from orchestrator.lab.netns import NetnsBackend, node_namespaces
from orchestrator.lab.record import (
    DATA_DIR,
    DEFAULT_LAB,
    DEFAULT_SUBNET,
    EXECUTORS,
    FIRST_HOST,
    NETNS,
    RUN_DIR,
    VM,
    Lab,
    LabError,
    Node,
    add_process,
    all_labs,
    check_name,
    load,
    locked,
    record_path,
    running,
    save,
    start_time,
    stop_pids,
)
from orchestrator.lab.vm import VmBackend

__all__ = [
    "DATA_DIR",
    "DEFAULT_LAB",
    "DEFAULT_SUBNET",
    "EXECUTORS",
    "FIRST_HOST",
    "NETNS",
    "RUN_DIR",
    "VM",
    "Lab",
    "LabError",
    "Node",
    "add_process",
    "all_labs",
    "backend",
    "backend_for",
    "check_name",
    "down",
    "exec_argv",
    "load",
    "locked",
    "node_namespaces",
    "running",
    "save",
    "start_time",
    "stop_pids",
    "up",
]

_BACKENDS: dict[str, LabBackend] = {b.kind: b for b in (NetnsBackend(), VmBackend())}


def backend_for(kind: str) -> LabBackend:
    """The backend that makes labs of this kind (record.NETNS, record.VM)."""
    try:
        return _BACKENDS[kind]
    except KeyError:
        raise LabError(f"unknown kind of lab {kind!r}: {', '.join(_BACKENDS)}") from None


def backend(lab: Lab) -> LabBackend:
    """The lab's backend, from its record."""
    return backend_for(lab.kind)


def up(
    name: str = DEFAULT_LAB,
    nodes: int = 3,
    subnet: ipaddress.IPv4Network = DEFAULT_SUBNET,
    executor: str | None = None,
    engines: bool = False,
    kind: str = NETNS,
    say: Say = print,
) -> Lab:
    """Make the lab have exactly `nodes` nodes of this kind, running; idempotent. The executor
    defaults to the backend's (namespace labs: container; VM labs: native, the only one). With
    engines, also start what its shoalds will need (a container lab: the lab's registry,
    seeded, and every node's engine), as `shoal lab up` does before the daemons."""
    chosen = backend_for(kind)
    lab = chosen.up(name, nodes, subnet, executor, say)
    if engines:
        chosen.start_engines(lab)  # not under the lock: what it starts is recorded under it
        lab = load(name) or lab
    return lab


def down(name: str = DEFAULT_LAB, purge: bool = False) -> bool:
    """Remove the lab and all it made but its registry's storage (images pushed to it), which
    purge removes too; False if there was nothing to remove."""
    check_name(name)
    data_dir = DATA_DIR / name
    with locked():
        lab = load(name)
        if lab is None:
            if purge and data_dir.exists():  # the storage an earlier `down` kept
                shutil.rmtree(data_dir)
                return True
            return False
        backend(lab).remove(lab)
        if purge:
            if data_dir.exists():
                shutil.rmtree(data_dir)
        else:
            for d in (data_dir / "nodes", data_dir):  # left only if empty
                with contextlib.suppress(OSError):
                    d.rmdir()
        if lab.run_dir.is_dir():
            for p in sorted(lab.run_dir.rglob("*"), reverse=True):
                p.rmdir() if p.is_dir() else p.unlink()
            lab.run_dir.rmdir()
        record_path(name).unlink()
        return True


def exec_argv(lab: Lab, node: str, argv: list[str]) -> list[str]:
    """A command line that runs argv inside a node, as `shoal lab exec` does (in a namespace
    lab, `ip netns exec`; in a VM lab, a local stand-in for the command in the VM)."""
    return backend(lab).exec_argv(lab, node, argv)
