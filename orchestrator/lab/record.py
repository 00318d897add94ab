"""The lab record: what a lab is made of and what runs in it, and the lock that guards it.

Every lab, whatever its nodes are (network namespaces, orchestrator/lab/netns.py; QEMU VMs,
orchestrator/lab/vm.py), is recorded in /run/shoal/lab/<lab>.json: its subnet, its nodes, its
kind (which backend made it) and executor, and the processes started in its nodes, so `down`
removes exactly what was made. Changes to records happen under one lock, `locked()`.

This module is the base both backends build on; it imports neither (docs/architecture.md,
"The lab").
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_LAB = os.environ.get("SHOAL_LAB", "shoal")
DEFAULT_SUBNET = ipaddress.IPv4Network("192.168.56.0/24")
FIRST_HOST = 11  # sw1 is .11 of the underlay, sw2 .12, ...
RUN_DIR = Path("/run/shoal/lab")
DATA_DIR = Path("/var/lib/shoal/lab")
# what a lab's nodes are: the backend that makes them
NETNS = "netns"  # network namespaces on a bridge of this machine (orchestrator/lab/netns.py)
VM = "vm"  # QEMU VMs running Debian's kernel (orchestrator/lab/vm.py)
# how a lab's shoalds run tasks: "container" (an engine per node, the lab's registry:
# namespace labs only) or "native" (docs/native-executor.md)
EXECUTORS = ("container", "native")
_LAB_NAME = re.compile(r"^[a-z][a-z0-9]{0,9}$")


class LabError(RuntimeError):
    """A lab operation failed; the message says what to do."""


@dataclass
class Node:
    name: str  # sw1
    netns: str  # shoal-sw1; in a VM lab, the lab's namespace, where the VM's tap is
    address: str  # 192.168.56.11
    host_veth: str  # its underlay link's end on the bridge's side (a VM's tap)


@dataclass
class Lab:
    name: str
    subnet: str
    bridge: str
    nodes: list[Node] = field(default_factory=list)
    # node -> [pid, start time] of processes started in it; the start time guards against
    # signalling a recycled pid
    processes: dict[str, list[list[int]]] = field(default_factory=dict)
    kind: str = NETNS
    # records made before executors were a choice, and VM labs, are native
    executor: str = "native"

    @property
    def gateway(self) -> str:
        return str(next(ipaddress.IPv4Network(self.subnet).hosts()))

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        known = ", ".join(n.name for n in self.nodes) or "none"
        raise LabError(f"lab {self.name} has no node {name!r} (nodes: {known})")

    @property
    def run_dir(self) -> Path:
        return RUN_DIR / self.name

    @property
    def data_dir(self) -> Path:
        """What outlives the run dir: engines' data, the registry's storage."""
        return DATA_DIR / self.name

    @property
    def containers(self) -> bool:
        """Do this lab's nodes run an engine, and the lab a registry?"""
        return self.executor == "container"


def node_index(name: str) -> int:
    """sw3 -> 3."""
    return int(name.removeprefix("sw"))


def record_path(name: str) -> Path:
    return RUN_DIR / f"{name}.json"


def check_name(name: str) -> None:
    if not _LAB_NAME.match(name):
        raise LabError(
            f"invalid lab name {name!r}: use 1-10 lowercase letters and digits, "
            "starting with a letter"
        )


def load(name: str) -> Lab | None:
    path = record_path(name)
    if not path.exists():
        return None
    raw = json.loads(path.read_text())
    nodes = [Node(**n) for n in raw.pop("nodes")]
    return Lab(nodes=nodes, **raw)


def save(lab: Lab) -> None:
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    tmp = record_path(lab.name).with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(lab), indent=2))
    tmp.replace(record_path(lab.name))


def all_labs() -> list[Lab]:
    if not RUN_DIR.is_dir():
        return []
    labs = [load(p.stem) for p in sorted(RUN_DIR.glob("*.json"))]
    return [lab for lab in labs if lab is not None]


@contextlib.contextmanager
def locked() -> Iterator[None]:
    """Hold the lock of every lab record (one for all: labs share the host's names)."""
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    with open(RUN_DIR / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def ip(*args: str) -> None:
    """`ip ARGS`; LabError with its message if it fails."""
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


# ---- processes started in nodes ------------------------------------------------------------------


def start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def add_process(lab_name: str, node: str, pid: int) -> None:
    """Remember a process started in a node, so `down` stops it."""
    started = start_time(pid)
    if started is None:
        return
    with locked():
        lab = load(lab_name)
        if lab is None:
            raise LabError(f"no lab named {lab_name}")
        lab.processes.setdefault(node, []).append([pid, started])
        save(lab)


def running(lab: Lab, node: str) -> list[int]:
    """The node's recorded processes that still run."""
    return [
        pid
        for pid, started in lab.processes.get(node, [])
        if start_time(pid) == started and alive(pid)
    ]


def stop_recorded(procs: list[list[int]]) -> None:
    """Stop recorded processes ([pid, start time]) that are still the ones recorded."""
    stop_pids([pid for pid, started in procs if start_time(pid) == started])


def stop_pids(pids: list[int], first: signal.Signals = signal.SIGTERM) -> None:
    """Signal the processes (then SIGKILL those still there after 5 s) and wait for them."""
    for sig in dict.fromkeys((first, signal.SIGKILL)):
        left = []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
                left.append(pid)
        if not left:
            return
        deadline = time.monotonic() + 5
        while left and time.monotonic() < deadline:
            left = [p for p in left if alive(p)]
            time.sleep(0.05)
        pids = left


def alive(pid: int) -> bool:
    """Is the process there, and not a zombie?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.split(")")[-1].split()[0] == "Z":
            return False
    return True
