"""Failures on demand in a lab, so anyone can watch a cluster cope: kill and restart a node's
daemons, cut nodes off from each other and heal (`shoal lab kill | start | partition | heal`).

The lab's backend makes them (orchestrator/lab/backend.py): namespace labs do
(orchestrator/lab/netns.py; partitions are orchestrator/lab/partitions.py), VM labs refuse.
"""

from __future__ import annotations

from orchestrator.lab import daemons
from orchestrator.lab.lab import backend
from orchestrator.lab.record import Lab


def kill(lab: Lab, node: str) -> list[int]:
    """A crash of the whole node: SIGKILL, all at once and without warning, its daemons
    (shoald, its shoal-mesh, anything else running in the node's namespace) and, in a
    container lab, its engine (dockerd, containerd, the shims) and every container process.
    The node is gone as far as peers know; its disk stays as a crashed host's would (the
    engine's containers and images, shoald's data). In a native lab, tasks, in namespaces of
    their own, keep running until shoald comes back, which stops them and runs them anew (as
    Docker without live-restore does). The pids killed."""
    return backend(lab).kill(lab, node)


def start(lab: Lab, node: str) -> int | None:
    """Start a killed node again: its engine (over the state the crash left, as after a
    reboot), then shoald (which keeps its membership in its data root)."""
    backend(lab).check_start(lab, node)
    return daemons.start(lab, lab.node(node))


def partition(lab: Lab, nodes: list[str], from_nodes: list[str] | None = None) -> None:
    """Cut `nodes` off from `from_nodes` (default: every other node), both ways: everything
    between the two sides goes, the control plane and the overlay's VXLAN too. Cuts
    accumulate until `heal`."""
    backend(lab).partition(lab, nodes, from_nodes)


def heal(lab: Lab) -> None:
    """Remove every cut in the lab."""
    backend(lab).heal(lab)


def cuts(lab: Lab) -> dict[str, bool]:
    """Which nodes have cuts in place."""
    return backend(lab).cuts(lab)
