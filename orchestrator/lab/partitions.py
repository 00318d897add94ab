"""Partitions of a namespace lab (`shoal lab partition | heal`): nftables in node namespaces.

A partition is a table `shoal-lab` in each affected node's namespace (the mesh owns table
`shoal` and never touches this one): packets from a cut-off node's address are dropped in
prerouting, and packets to it in output. Everything between the two sides goes: the control
plane, and the overlay's VXLAN too, as in a real network split. Cuts accumulate until `heal`.
"""

from __future__ import annotations

import ipaddress

from mesh.netns import run_in_netns
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
from orchestrator.lab.record import Lab, LabError

TABLE = "shoal-lab"
CUT = "cut-off"


def partition(lab: Lab, nodes: list[str], from_nodes: list[str] | None = None) -> None:
    """Cut `nodes` off from `from_nodes` (default: every other node), both ways."""
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
