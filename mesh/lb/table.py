"""One namespace's `shoal` nftables table, kept equal to a NamespaceLB.

A full sync replaces the table in one atomic transaction (add, delete, add); conntrack keeps
the NAT of established connections, so a restart breaks none. Afterwards each sync sends only
what changed. If a transaction fails nothing of it is applied, so the remembered state stays
true and the next sync can retry; callers fall back to a full sync.
"""

from __future__ import annotations

import errno
import ipaddress
from dataclasses import dataclass

from mesh.lb.base import BackendCount, Balancer, FrontendSlot
from mesh.lb.model import Frontend, NamespaceLB
from mesh.naming import BRIDGE_PREFIX, NFT_TABLE
from mesh.netns import run_in_netns
from mesh.nft import expr as E
from mesh.nft.transaction import (
    HOOK_OUTPUT,
    HOOK_POSTROUTING,
    HOOK_PREROUTING,
    NFT_DATA_VERDICT,
    TYPE_INET_PROTOCOL,
    TYPE_INET_SERVICE,
    TYPE_IPADDR,
    Element,
    Hook,
    SetSpec,
    Transaction,
    concat_type,
    list_tables,
    read_counters,
)
from mesh.nft.wire import NftError, NftSocket

PUBLISHED_MAP = "published"
VIP_MAP = "vips"
_PROTO = {"tcp": 6, "udp": 17}
_LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")


@dataclass(frozen=True)
class SyncResult:
    requests: int
    full: bool


def _chain(fe: Frontend) -> str:
    return f"fe-{fe.service}-{fe.network}-{fe.protocol}-{fe.target_port}"


def _published_key(fe: Frontend) -> bytes:
    assert fe.published is not None
    return E.proto_reg(_PROTO[fe.protocol]) + E.port_reg(fe.published)


def _vip_key(fe: Frontend) -> bytes:
    assert fe.vip is not None
    return E.ipv4(str(fe.vip)) + E.proto_reg(_PROTO[fe.protocol])


class NamespaceTable:
    def __init__(self, netns: str | None, balancer: Balancer):
        self.netns = netns
        self.balancer = balancer
        self._sock: NftSocket = run_in_netns(netns, NftSocket)
        self._applied: NamespaceLB | None = None
        self._slots: dict[str, FrontendSlot] = {}
        self._next_fid = 1

    def close(self) -> None:
        self._sock.close()

    @property
    def applied(self) -> NamespaceLB | None:
        return self._applied

    def _slot(self, fe: Frontend) -> FrontendSlot:
        fid = self._next_fid
        self._next_fid += 1
        chain = _chain(fe)
        return FrontendSlot(fid, chain, "be-" + chain[3:])

    def exists(self) -> bool:
        return NFT_TABLE in list_tables(self._sock)

    def sync(self, desired: NamespaceLB, full: bool = False) -> SyncResult:
        """Make the table match; raises NftError (and changes nothing) if the kernel refuses."""
        old = self._applied
        full = full or old is None or old.node != desired.node
        if full or old is None:
            tx, slots = self._full(desired)
        else:
            tx, slots = self._incremental(old, desired)
        tx.commit(self._sock)
        self._applied, self._slots = desired, slots
        self.balancer.after_commit()
        return SyncResult(len(tx), full)

    def _base(self, tx: Transaction, lb: NamespaceLB) -> None:
        if lb.node:
            tx.add_set(
                SetSpec(
                    PUBLISHED_MAP,
                    concat_type(TYPE_INET_PROTOCOL, TYPE_INET_SERVICE),
                    8,
                    NFT_DATA_VERDICT,
                )
            )
        else:
            tx.add_set(
                SetSpec(
                    VIP_MAP,
                    concat_type(TYPE_IPADDR, TYPE_INET_PROTOCOL),
                    8,
                    NFT_DATA_VERDICT,
                )
            )
        self.balancer.declare(tx)
        tx.add_chain("output", Hook(HOOK_OUTPUT, -100))
        if lb.node:
            tx.add_chain("prerouting", Hook(HOOK_PREROUTING, -100))
            tx.add_chain("postrouting", Hook(HOOK_POSTROUTING, 100))
        self._base_rules(tx, lb)

    def _base_rules(self, tx: Transaction, lb: NamespaceLB) -> None:
        if not lb.node:
            tx.add_rule(
                "output",
                [*E.key_daddr_l4proto(), E.lookup(VIP_MAP, E.REG32_00, E.REG_VERDICT)],
                comment="service VIPs",
            )
            return
        # Published ports answer on every local address but loopback (that would need
        # route_localnet, a hole: CVE-2020-8558).
        published_rule = [
            *E.match_fib_daddr_local(),
            *E.match_ip_addr_in(E.IP_DADDR_OFFSET, _LOOPBACK, negate=True),
            *E.key_l4proto_dport(),
            E.lookup(PUBLISHED_MAP, E.REG32_00, E.REG_VERDICT),
        ]
        tx.add_rule("prerouting", published_rule, comment="published ports")
        tx.add_rule("output", published_rule, comment="published ports, from this node")
        # Connections we DNAT onto an overlay leave from the node's address there, so replies
        # come back through this node's conntrack (from outside, from the node, hairpin).
        tx.add_rule(
            "postrouting",
            [*E.match_ct_dnat(), *E.match_oifname_prefix(BRIDGE_PREFIX), E.masquerade()],
            comment="mesh traffic onto overlays",
        )
        for subnet in lb.overlay_subnets:
            tx.add_rule(
                "postrouting",
                [
                    *E.match_ip_addr_in(E.IP_SADDR_OFFSET, subnet),
                    *E.match_oifname_prefix(BRIDGE_PREFIX, negate=True),
                    E.masquerade(),
                ],
                comment=f"tasks of {subnet} reaching out",
            )

    def _add_frontend(self, tx: Transaction, fe: Frontend, slot: FrontendSlot) -> None:
        tx.add_chain(slot.chain)
        self.balancer.add_frontend(tx, fe, slot)
        self._add_entries(tx, fe, slot)

    def _add_entries(self, tx: Transaction, fe: Frontend, slot: FrontendSlot) -> None:
        if fe.published is not None:
            tx.add_elements(PUBLISHED_MAP, [Element(_published_key(fe), goto=slot.chain)])
        if fe.vip is not None:
            tx.add_elements(VIP_MAP, [Element(_vip_key(fe), goto=slot.chain)])

    def _remove_entries(self, tx: Transaction, fe: Frontend) -> None:
        if fe.published is not None:
            tx.delete_elements(PUBLISHED_MAP, [_published_key(fe)])
        if fe.vip is not None:
            tx.delete_elements(VIP_MAP, [_vip_key(fe)])

    def _full(self, desired: NamespaceLB) -> tuple[Transaction, dict[str, FrontendSlot]]:
        tx = Transaction(NFT_TABLE)
        tx.add_table()
        tx.delete_table()
        tx.add_table()
        self._base(tx, desired)
        slots: dict[str, FrontendSlot] = {}
        for key, fe in desired.frontends.items():
            slots[key] = self._slot(fe)
            self._add_frontend(tx, fe, slots[key])
        return tx, slots

    def _incremental(
        self, old: NamespaceLB, new: NamespaceLB
    ) -> tuple[Transaction, dict[str, FrontendSlot]]:
        tx = Transaction(NFT_TABLE)
        slots = dict(self._slots)
        if old.overlay_subnets != new.overlay_subnets:
            for chain in ("prerouting", "output", "postrouting") if new.node else ("output",):
                tx.flush_chain(chain)
            self._base_rules(tx, new)
        for key in old.frontends.keys() - new.frontends.keys():
            fe, slot = old.frontends[key], slots.pop(key)
            self._remove_entries(tx, fe)
            self.balancer.remove_frontend(tx, fe, slot)
            tx.delete_chain(slot.chain)
        for key, fe in new.frontends.items():
            prev = old.frontends.get(key)
            if prev is None:
                slots[key] = self._slot(fe)
                self._add_frontend(tx, fe, slots[key])
            elif prev != fe:
                slot = slots[key]
                if (prev.published, prev.vip) != (fe.published, fe.vip):
                    self._remove_entries(tx, prev)
                    self._add_entries(tx, fe, slot)
                if prev.backends != fe.backends:
                    self.balancer.update_backends(tx, prev, fe, slot)
        return tx, slots

    def remove(self) -> None:
        """Delete the table (and so everything in it), if it is there."""
        tx = Transaction(NFT_TABLE)
        tx.delete_table()
        try:
            tx.commit(self._sock)
        except NftError as e:
            if e.errnos != {errno.ENOENT}:
                raise
        self._applied, self._slots = None, {}

    def counts(self) -> list[BackendCount]:
        if self._applied is None:
            return []
        counters = read_counters(self._sock, NFT_TABLE)
        out: list[BackendCount] = []
        for key, fe in self._applied.frontends.items():
            out.extend(self.balancer.counts(counters, fe, self._slots[key]))
        return out
