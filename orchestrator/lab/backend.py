"""What a lab's nodes are, behind one interface: `LabBackend`.

A lab's nodes are network namespaces of this machine (orchestrator/lab/netns.py) or QEMU VMs
running Debian's kernel (orchestrator/lab/vm.py). Everything else — the record, `down`,
shoald in every node (orchestrator/lab/daemons.py), MeshLab, the CLI — is written once
against this interface; orchestrator/lab/lab.py picks the backend from the lab record's kind.
What the backends share is here; the record itself is orchestrator/lab/record.py.
docs/architecture.md ("The lab") has the layout, docs/vm-lab.md the VM backend.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, NoReturn

from orchestrator.lab.record import (
    FIRST_HOST,
    Lab,
    LabError,
    Node,
    check_name,
    load,
    node_index,
    save,
)

Say = Callable[[str], None]


@dataclass(frozen=True)
class Completed:
    """A command run in a node, its output collected (LabBackend.run)."""

    returncode: int
    stdout: str
    stderr: str


def need_command(argv: list[str]) -> None:
    if not argv:
        raise LabError("nothing to run: give a command after --")


def exec_here(argv: list[str]) -> NoReturn:
    """Replace this process with argv, the project's commands (shoal, shoal-mesh) on its PATH
    even outside an activated virtualenv."""
    bindir = os.path.dirname(sys.executable)
    os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    sys.stdout.flush()
    os.execvp(argv[0], argv)


class LabBackend(ABC):
    """How a kind of lab makes its nodes and runs things in them.

    Stateless: every operation is given the lab's record, as loaded by its caller, and those
    that change the record save it.
    """

    kind: ClassVar[str]  # the record's `kind`
    executors: ClassVar[tuple[str, ...]]  # the first is the default
    max_nodes: ClassVar[int]
    nodes_note: ClassVar[str] = ""  # said after the node bound, when --nodes is out of it
    shoald_timeout: ClassVar[float]  # seconds for a node's shoald to answer once started
    shoald_poll: ClassVar[float]  # seconds between two probes of it

    # ---- making and removing the lab -------------------------------------------------------------

    @abstractmethod
    def up(
        self,
        name: str,
        nodes: int,
        subnet: ipaddress.IPv4Network,
        executor: str | None = None,
        say: Say = print,
    ) -> Lab:
        """Make the lab have exactly `nodes` nodes, running; idempotent."""

    @abstractmethod
    def other_kind(self, name: str) -> str:
        """What to say when lab `name` exists as another kind of lab."""

    @abstractmethod
    def new_lab(self, name: str, subnet: ipaddress.IPv4Network, executor: str) -> Lab:
        """The record of a lab that does not exist yet (nothing made)."""

    @abstractmethod
    def new_node(self, lab: Lab, name: str, address: str) -> Node:
        """The record of a node to make (nothing made)."""

    @abstractmethod
    def remove_node(self, lab: Lab, node: Node) -> None:
        """Stop all that runs in the node and remove what makes it; under the lock."""

    @abstractmethod
    def remove(self, lab: Lab) -> None:
        """Remove every node and all the lab made on this machine but its record, run dir and
        data dir (lab.down's); under the lock."""

    @abstractmethod
    def start_engines(self, lab: Lab) -> None:
        """What the lab's shoalds need besides themselves, up and answering (a container lab:
        its registry and every node's engine); idempotent."""

    @abstractmethod
    def start_engine(self, lab: Lab, node: str) -> None:
        """The same for one node, before its shoald starts."""

    # shared by the backends' `up`

    def check_up(
        self, name: str, nodes: int, subnet: ipaddress.IPv4Network, executor: str | None
    ) -> str:
        """Refuse bad arguments of `up`; the executor to use."""
        check_name(name)
        if not 1 <= nodes <= self.max_nodes:
            raise LabError(
                f"--nodes must be between 1 and {self.max_nodes}{self.nodes_note}, not {nodes}"
            )
        executor = executor or self.executors[0]
        if executor not in self.executors:
            raise LabError(f"unknown executor {executor!r}: use one of {', '.join(self.executors)}")
        if subnet.prefixlen > 24:
            raise LabError(f"underlay subnet {subnet} is too small; use a /24 or larger")
        return executor

    def open_record(self, name: str, subnet: ipaddress.IPv4Network, executor: str) -> Lab:
        """The lab's record, new if there is none, saved; LabError if the lab exists but not
        as asked. Under the lock: the record comes first, so `down` can clean a half-made
        lab."""
        lab = load(name)
        if lab is None:
            lab = self.new_lab(name, subnet, executor)
        elif lab.kind != self.kind:
            raise LabError(self.other_kind(name))
        elif lab.subnet != str(subnet):
            raise LabError(
                f"lab {name} already exists on {lab.subnet}; run `shoal lab down "
                f"--name {name}` first to move it to {subnet}"
            )
        elif lab.executor != executor:
            raise LabError(
                f"lab {name} runs the {lab.executor} executor; give --executor {lab.executor}, "
                f"or run `shoal lab down --name {name}` first to make it {executor}"
            )
        save(lab)
        return lab

    def resize(self, lab: Lab, nodes: int, ensure: Callable[[Node], None]) -> None:
        """Nodes sw1..sw<nodes>: the missing ones recorded, every one ensured (made, or
        repaired), those beyond removed. Under the lock."""
        subnet = ipaddress.IPv4Network(lab.subnet)
        for i in range(1, nodes + 1):
            name = f"sw{i}"
            node = next((n for n in lab.nodes if n.name == name), None)
            if node is None:
                node = self.new_node(lab, name, str(subnet.network_address + FIRST_HOST + i - 1))
                lab.nodes.append(node)
                save(lab)
            ensure(node)
            save(lab)
        for node in [n for n in lab.nodes if node_index(n.name) > nodes]:
            self.remove_node(lab, node)
            lab.nodes.remove(node)
            save(lab)

    # ---- running commands in a node --------------------------------------------------------------

    @abstractmethod
    def exec_argv(self, lab: Lab, node: str, argv: list[str]) -> list[str]:
        """A command line of this machine that runs argv in the node as `shoal lab exec` does;
        the local process stands for the command (signal it, kill it)."""

    @abstractmethod
    def daemon_argv(self, lab: Lab, node: str, argv: list[str]) -> list[str]:
        """A command line that runs argv in the node as the lab runs the node's daemons (and
        their tasks): the network namespaces it makes are where the node's are."""

    @abstractmethod
    def run(
        self,
        lab: Lab,
        node: str,
        argv: list[str],
        input: bytes | None = None,
        timeout: float | None = 60.0,
    ) -> Completed:
        """Run argv in the node (as daemon_argv would) and collect its output, like
        subprocess.run; from any thread."""

    @abstractmethod
    def exec_interactive(self, lab: Lab, node: str, argv: list[str]) -> int:
        """Run argv in the node with this process's stdin, stdout, stderr and signals (`shoal
        lab exec`), pointed at the node's shoald where it can be; its exit status (or this
        process becomes it)."""

    @abstractmethod
    def outside(self, lab: Lab) -> str | None:
        """The network namespace of the lab's outside, its host, from which every node's
        address is reachable: None for this machine's own."""

    @abstractmethod
    def netns_prefix(self, lab: Lab, node: str) -> str:
        """The names of network namespaces made for the node's tasks start with this and a
        dash."""

    @abstractmethod
    def shares(self, lab: Lab, path: Path) -> bool:
        """Do the nodes see this directory of this machine, writable, at the same path?"""

    def check(self, lab: Lab, node: str, argv: list[str], timeout: float | None = 60.0) -> str:
        """run(), raising LabError with the command's stderr if it fails; its stdout."""
        done = self.run(lab, node, argv, timeout=timeout)
        if done.returncode != 0:
            raise LabError(
                f"`{' '.join(argv)}` failed on {node} ({done.returncode}): {done.stderr.strip()}"
            )
        return done.stdout

    # ---- shoald ----------------------------------------------------------------------------------

    @abstractmethod
    def shoald_socket(self, lab: Lab, node: str) -> Path:
        """Where the node's shoald serves the Engine API: a path in the node."""

    @abstractmethod
    def shoald_data_root(self, lab: Lab, node: str) -> Path:
        """The node's shoald's --data-root: a path in the node."""

    @abstractmethod
    def shoald_options(self, lab: Lab, node: str) -> list[str]:
        """The rest of the node's shoald's options (its executor's among them)."""

    @abstractmethod
    def shoald_answers(self, lab: Lab, node: str) -> bool:
        """Does the node's shoald answer /_ping?"""

    @abstractmethod
    def host_socket(self, lab: Lab, node: str) -> Path:
        """The node's shoald's socket as a path of this machine; LabError, saying what to do
        instead, where this machine cannot reach it."""

    # ---- failures on demand (orchestrator/lab/faults.py) -----------------------------------------

    @abstractmethod
    def kill(self, lab: Lab, node: str) -> list[int]:
        """Crash the node: SIGKILL all that runs in it; the pids."""

    @abstractmethod
    def check_start(self, lab: Lab, node: str) -> None:
        """LabError unless the node can be started again (it was killed)."""

    @abstractmethod
    def partition(self, lab: Lab, nodes: list[str], from_nodes: list[str] | None) -> None:
        """Cut `nodes` off from `from_nodes` (default: every other node), both ways."""

    @abstractmethod
    def heal(self, lab: Lab) -> None:
        """Remove every cut."""

    @abstractmethod
    def cuts(self, lab: Lab) -> dict[str, bool]:
        """Which nodes have cuts in place."""

    # ---- saying what there is --------------------------------------------------------------------

    @abstractmethod
    def describe(self, lab: Lab, daemons: bool) -> list[str]:
        """What `shoal lab up` prints about the lab (and, with daemons, how to reach them)."""
