"""Makes one node's kernel match a MeshState: overlays, endpoints, load balancing.

The order matters: encryption first (an encrypted network's VXLAN must not exist before its
traffic is sure to be encrypted; one that cannot be is left out of everything else), then links
and addresses (a VIP rule is useless without the interface it routes over), then the tables,
then conntrack clean-up for backends that went away. Each part reports its own errors and the
others still run; a failed part is retried by the next sync.

A backend that leaves a balancer while its task still holds its address is *ending*: it drains
(docs/updates.md), so its conntrack entries stay until its endpoint is gone from the state,
and only then are they cleaned (mesh/conntrack.py): a connection still in its handshake with
an ending task finishes with it rather than being balanced afresh mid-way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pyroute2.netlink.exceptions import NetlinkError

from mesh.conntrack import Target, delete_stale
from mesh.ipsec import Ipsec
from mesh.lb.base import Balancer
from mesh.lb.model import NamespaceLB, node_lb, task_lb
from mesh.lb.table import NamespaceTable
from mesh.netlink.core import NetlinkRefused
from mesh.netns import NetnsError, netns_exists, run_in_netns
from mesh.nft.wire import NftError
from mesh.overlay import Overlay, write_sysctl
from mesh.state import MeshState


@dataclass
class SyncReport:
    full: bool
    seconds: float = 0.0
    nft_requests: int = 0
    link_changes: int = 0
    conntrack_deleted: int = 0
    balancing_failed: bool = False  # a table (or IPVS) refused its part
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors


def task_namespaces(state: MeshState) -> dict[str, set[str]]:
    """Local task namespaces and the networks each is attached to."""
    out: dict[str, set[str]] = {}
    for ep in state.local_endpoints():
        if ep.netns:
            out.setdefault(ep.netns, set()).add(ep.network)
    return out


class Mesh:
    """The data plane of one node. netns None: the namespace this process runs in."""

    def __init__(self, balancer: Callable[[str | None], Balancer], netns: str | None = None):
        self.netns = netns
        self._balancer = balancer
        self.overlay = Overlay(netns)
        self.ipsec = Ipsec(netns)
        self._node_table: NamespaceTable | None = None
        self._task_tables: dict[str, NamespaceTable] = {}
        self._prepared = False
        # backends that left a balancer while their tasks end: namespace -> targets, cleaned
        # from conntrack once their addresses leave the state
        self._ending: dict[str | None, set[Target]] = {}

    def _prepare(self) -> None:
        def tune() -> None:
            write_sysctl("net.ipv4.ip_forward", "1")
            # Hairpin traffic leaves the bridge it came in on; a redirect would tell the task
            # to bypass the node's NAT.
            write_sysctl("net.ipv4.conf.all.send_redirects", "0")

        run_in_netns(self.netns, tune)
        self._prepared = True

    def apply(
        self, state: MeshState, full: bool = False, verify: bool = False, clean: bool = True
    ) -> SyncReport:
        """Reconcile; `full` rewrites the tables, `verify` re-checks every endpoint's links.
        `clean` False leaves the conntrack clean-up of gone backends to `clean_ending`."""
        started = time.perf_counter()
        report = SyncReport(full=full)
        if not self._prepared:
            self._prepare()
        esp = self.ipsec.reconcile(state, full=full or verify or self._node_table is None)
        report.errors.update(esp.errors)
        report.link_changes += esp.changes
        state = state.without_networks(esp.refused)
        try:
            clashing = self.overlay.clashes(state)
        except (NetlinkError, NetnsError, OSError) as e:
            report.errors["routes"] = f"cannot read this node's routes: {e}"
            clashing = {}
        for name, why in clashing.items():
            report.errors[f"network {name}"] = why
        state = state.without_networks(set(clashing))
        self.overlay.protected = esp.protected
        overlay = self.overlay.reconcile(state, full=full or verify or self._node_table is None)
        report.link_changes += overlay.changes
        report.errors.update(overlay.errors)
        removed: list[Target] = []

        if self._node_table is None:
            self._node_table = NamespaceTable(self.netns, self._balancer(self.netns))
            full = True
        removed += self._sync_table(self._node_table, node_lb(state), full, "node", report)

        wanted = task_namespaces(state)
        for ns in list(self._task_tables):
            if ns not in wanted:
                table = self._task_tables.pop(ns)
                if netns_exists(ns):
                    try:
                        table.remove()
                    except (NftError, NetnsError) as e:
                        report.errors[f"table in {ns}"] = str(e)
                table.close()
        for ns, networks in wanted.items():
            if not netns_exists(ns):
                continue
            existing = self._task_tables.get(ns)
            ns_full = full
            if existing is not None:
                table = existing
            else:
                try:
                    table = self._task_tables[ns] = NamespaceTable(ns, self._balancer(ns))
                except NetnsError as e:
                    report.errors[f"table in {ns}"] = str(e)
                    continue
                ns_full = True
            removed_here = self._sync_table(table, task_lb(state, networks), ns_full, ns, report)
            self._ending.setdefault(ns, set()).update(removed_here)
        self._ending.setdefault(self.netns, set()).update(removed)
        if clean:
            report.conntrack_deleted += self._clean_gone(state, report)
        report.full = full
        report.seconds = time.perf_counter() - started
        return report

    @staticmethod
    def _sync_table(
        table: NamespaceTable, desired: NamespaceLB, full: bool, where: str, report: SyncReport
    ) -> list[Target]:
        before = table.applied
        try:
            result = table.sync(desired, full=full)
        except (NftError, NetlinkError, OSError) as e:
            # NetlinkError: IPVS refused its part, which the balancer retries in full
            report.errors[f"table in {where}"] = str(e)
            report.balancing_failed = True
            return []
        report.nft_requests += result.requests
        if before is None:
            return []
        gone: list[Target] = []
        for key, fe in before.frontends.items():
            now = desired.frontends.get(key)
            if now == fe:
                continue  # tuples compare in C; most frontends are unchanged
            kept = {(b.ip, b.port) for b in now.backends} if now is not None else set()
            gone += [
                Target(b.ip, b.port, fe.protocol) for b in fe.backends if (b.ip, b.port) not in kept
            ]
        return gone

    def has_ending(self, state: MeshState) -> bool:
        """Whether `clean_ending` has work: an ending backend whose task is gone from `state`."""
        live = {e.ip for e in state.endpoints}
        return any(t.ip not in live for targets in self._ending.values() for t in targets)

    def clean_ending(self, state: MeshState) -> SyncReport:
        """The conntrack clean-up `apply(clean=False)` left: a daemon applies a state, says so,
        and cleans afterwards, so a slow clean-up (a conntrack dump, an entry per delete) never
        delays the next change of the load balancers."""
        started = time.perf_counter()
        report = SyncReport(full=False)
        report.conntrack_deleted = self._clean_gone(state, report)
        report.seconds = time.perf_counter() - started
        return report

    def _clean_gone(self, state: MeshState, report: SyncReport) -> int:
        """Clean the conntrack entries of ending backends whose tasks are gone."""
        live = {e.ip for e in state.endpoints}
        deleted = 0
        for ns in list(self._ending):
            gone = [t for t in self._ending[ns] if t.ip not in live]
            if ns is not None and ns != self.netns and not netns_exists(ns):
                del self._ending[ns]  # the namespace went with its task, entries and all
                continue
            if gone:
                self._ending[ns].difference_update(gone)
                deleted += self._clean_conntrack(ns, gone, report)
            if not self._ending[ns]:
                del self._ending[ns]
        return deleted

    @staticmethod
    def _clean_conntrack(netns: str | None, targets: list[Target], report: SyncReport) -> int:
        if not targets:
            return 0
        try:
            return delete_stale(netns, targets)
        except (NetlinkRefused, NetnsError, OSError) as e:
            report.errors[f"conntrack in {netns or 'node'}"] = str(e)
            return 0

    def tables(self) -> list[NamespaceTable]:
        node = [self._node_table] if self._node_table else []
        return node + list(self._task_tables.values())

    def cleanup(
        self, state: MeshState | None = None, extra_namespaces: list[str] | None = None
    ) -> None:
        """Remove everything this node's mesh owns (links, tables) in its namespaces."""
        namespaces = set(self._task_tables) | set(extra_namespaces or [])
        if state is not None:
            namespaces |= set(task_namespaces(state))
        for ns in sorted(namespaces):
            if netns_exists(ns):
                table = self._task_tables.pop(ns, None) or NamespaceTable(ns, self._balancer(ns))
                table.remove()
                table.close()
        node = self._node_table or NamespaceTable(self.netns, self._balancer(self.netns))
        node.remove()
        node.close()
        self._node_table = None
        self.overlay.cleanup()
        self.ipsec.cleanup()
