"""Failures on demand in a lab, so anyone can watch a cluster cope: kill and restart a node's
daemons, cut nodes off from each other and heal.

A partition is a table `shoal-lab` in each affected node's namespace (the mesh owns table
`shoal` and never touches this one): packets from a cut-off node's address are dropped in
prerouting, and packets to it in output. Everything between the two sides goes: the control
plane, and the overlay's VXLAN too, as in a real network split. Cuts accumulate until `heal`.
"""

from __future__ import annotations

import ipaddress
import signal

from mesh.netns import processes_in, run_in_netns
from mesh.nft import expr as E
from mesh.nft.transaction import (
    HOOK_OUTPUT,
    HOOK_PREROUTING,
    TYPE_IPADDR,
    Element,
    Hook,
    SetSpec,
    Transaction,
    list_tables,
)
from mesh.nft.wire import NftSocket
from orchestrator.lab import daemons, engines
from orchestrator.lab.lab import Lab, LabError, running, stop_pids

TABLE = "shoal-lab"
_NETNS_ONLY = (
    "kill and start work on namespace labs; in a VM lab, stop a node's shoald with "
    "`shoal lab exec swN -- pkill -f orchestrator.daemon`"
)
CUT = "cut-off"


def kill(lab: Lab, node: str) -> list[int]:
    """A crash of the whole node: SIGKILL, all at once and without warning, its daemons
    (shoald, its shoal-mesh, anything else running in the node's namespace) and, in a
    container lab, its engine (dockerd, containerd, the shims) and every container process.
    The node is gone as far as peers know; its disk stays as a crashed host's would (the
    engine's containers and images, shoald's data). In a native lab, tasks, in namespaces of
    their own, keep running until shoald comes back, which stops them and runs them anew (as
    Docker without live-restore does)."""
    if lab.kind != "netns":
        raise LabError(_NETNS_ONLY)
    netns = lab.node(node).netns
    pids = set(running(lab, node)) | set(processes_in([netns])) | set(engines.pids(lab, node))
    stop_pids(sorted(pids), signal.SIGKILL)
    # and what forked meanwhile (a container's process while its siblings died)
    pids |= set(engines.stop(lab, node))
    return sorted(pids)


def start(lab: Lab, node: str) -> int | None:
    """Start the node again: its engine (over the state the crash left, as after a reboot),
    then shoald (which keeps its membership in its data root)."""
    if lab.kind != "netns":
        raise LabError(_NETNS_ONLY)
    if running(lab, node):
        raise LabError(f"{node} is already running (shoal lab kill {node} first)")
    return daemons.start(lab, lab.node(node))


def partition(lab: Lab, nodes: list[str], from_nodes: list[str] | None = None) -> None:
    """Cut `nodes` off from `from_nodes` (default: every other node), both ways."""
    if lab.kind != "netns":
        raise LabError("partitions are made with nftables in node namespaces: netns labs only")
    side_a = [lab.node(n) for n in nodes]
    names_a = {n.name for n in side_a}
    side_b = (
        [lab.node(n) for n in from_nodes]
        if from_nodes
        else [n for n in lab.nodes if n.name not in names_a]
    )
    if not side_a or not side_b:
        raise LabError("a partition needs nodes on both sides")
    if names_a & {n.name for n in side_b}:
        raise LabError("a node cannot be cut off from itself")
    for node in side_a:
        _cut(node.netns, [ipaddress.IPv4Address(n.address) for n in side_b])
    for node in side_b:
        _cut(node.netns, [ipaddress.IPv4Address(n.address) for n in side_a])


def heal(lab: Lab) -> None:
    """Remove every cut in the lab."""
    for node in lab.nodes:

        def work() -> None:
            with NftSocket() as sock:
                if TABLE in list_tables(sock):
                    tx = Transaction(TABLE)
                    tx.delete_table()
                    tx.commit(sock)

        run_in_netns(node.netns, work)


def cuts(lab: Lab) -> dict[str, bool]:
    """Which nodes have cuts in place."""
    out = {}
    for node in lab.nodes:

        def work() -> bool:
            with NftSocket() as sock:
                return TABLE in list_tables(sock)

        out[node.name] = run_in_netns(node.netns, work)
    return out


def _cut(netns: str, addresses: list[ipaddress.IPv4Address]) -> None:
    def work() -> None:
        with NftSocket() as sock:
            tx = Transaction(TABLE)
            if TABLE not in list_tables(sock):
                tx.add_table()
                tx.add_set(SetSpec(CUT, TYPE_IPADDR, 4))
                tx.add_chain("prerouting", Hook(HOOK_PREROUTING, -300, "filter"))
                tx.add_chain("output", Hook(HOOK_OUTPUT, -300, "filter"))
                tx.add_rule(
                    "prerouting",
                    [
                        E.payload(E.NETWORK_HEADER, E.IP_SADDR_OFFSET, 4, E.REG_1),
                        E.lookup(CUT, E.REG_1),
                        E.verdict(E.NF_DROP),
                    ],
                    comment="shoal lab partition",
                )
                tx.add_rule(
                    "output",
                    [
                        E.payload(E.NETWORK_HEADER, E.IP_DADDR_OFFSET, 4, E.REG_1),
                        E.lookup(CUT, E.REG_1),
                        E.verdict(E.NF_DROP),
                    ],
                    comment="shoal lab partition",
                )
            tx.add_elements(CUT, [Element(a.packed) for a in addresses])
            tx.commit(sock)

    run_in_netns(netns, work)
