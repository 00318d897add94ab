"""One namespace's `shoal` nftables tables, kept equal to a NamespaceLB.

Frontends live in tables of at most SHARD_SIZE frontends: `shoal`, which also holds what the
namespace needs once (the node's masquerading, the balancer's own chains), and past that
`shoal-1`, `shoal-2`, ... Each table classifies the traffic of its own frontends (published
ports, VIPs) from its own base chains. Why: most of what nf_tables does on a change grows with
the table changed, not with the namespace. It revalidates the whole table from its base chains
whenever a rule or a verdict-map element is added, and finds a set by name in a list of the
table's sets; in one table of 20,000 frontends (10,000 services, a VIP frontend per protocol)
adding a service took ~25 ms of kernel time and a full load ~30 s of it (docs/benchmarks.md,
"Sync cost"). The price is a lookup per table on a new connection's first packet (the nat
chains see no other packet), ~0.2 us each. A frontend stays in its table until a full sync
repacks them; a shard that empties goes.

A full sync replaces the tables in one atomic transaction (add, delete, add); conntrack keeps
the NAT of established connections, so a restart breaks none. Afterwards each sync sends only
what changed, in one batch across tables. If a transaction fails nothing of it is applied, so
the remembered state stays true and the next sync can retry; callers fall back to a full sync.
"""

from __future__ import annotations

import errno
import ipaddress
import re
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
    commit,
    concat_type,
    list_tables,
    read_counters,
)
from mesh.nft.wire import NftError, NftSocket

PUBLISHED_MAP = "published"
VIP_MAP = "vips"
# Frontends per table: the kernel's work on a change that grows with its table stays under
# 1 ms, and a namespace of 10,000 services has 20 tables to look up (docs/benchmarks.md).
SHARD_SIZE = 1000
_PROTO = {"tcp": 6, "udp": 17}
_LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")
# Not `shoal-esp` (mesh/ipsec.py) nor `shoal-lab` (the lab's partitions)
_SHARD_NAME = re.compile(re.escape(NFT_TABLE) + r"(?:-([1-9][0-9]*))?")


@dataclass(frozen=True)
class SyncResult:
    requests: int
    full: bool


@dataclass(frozen=True)
class _Change:
    """What a sync sends, and what the table remembers once the kernel has taken it: the
    frontends' slots that went and came (a change costs what changed, not a copy of 20,000
    slots), and the size of every table."""

    txs: list[Transaction]
    removed: list[str]
    added: dict[str, FrontendSlot]
    sizes: dict[str, int]


def _table(shard: int) -> str:
    return f"{NFT_TABLE}-{shard}" if shard else NFT_TABLE


def _shard(table: str) -> int | None:
    """The shard number of one of our tables; None for anyone else's."""
    found = _SHARD_NAME.fullmatch(table)
    return None if found is None else int(found.group(1) or 0)


def _chain(fe: Frontend) -> str:
    """Named like its key: a published port's chain by that port, a VIP's `-0`."""
    return "fe-" + fe.key.replace("/", "-")


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
        self._sizes: dict[str, int] = {}  # table -> frontends in it, the main table included
        self._next_fid = 1

    def close(self) -> None:
        self._sock.close()

    @property
    def applied(self) -> NamespaceLB | None:
        return self._applied

    def _slot(self, table: str, fe: Frontend) -> FrontendSlot:
        fid = self._next_fid
        self._next_fid += 1
        chain = _chain(fe)
        return FrontendSlot(table, fid, chain, "be-" + chain[3:])

    def exists(self) -> bool:
        """Are all the tables of the last sync (the main table before any) there?"""
        return (set(self._sizes) or {NFT_TABLE}) <= set(list_tables(self._sock))

    def sync(self, desired: NamespaceLB, full: bool = False) -> SyncResult:
        """Make the tables match; raises NftError (and changes nothing) if the kernel refuses."""
        old = self._applied
        full = full or old is None or old.node != desired.node
        change = self._full(desired) if full or old is None else self._incremental(old, desired)
        commit(self._sock, change.txs)
        if full:
            self._slots = {}
        for key in change.removed:
            del self._slots[key]
        self._slots.update(change.added)
        self._applied, self._sizes = desired, change.sizes
        self.balancer.after_commit()
        return SyncResult(sum(len(tx) for tx in change.txs), full)

    def _new_table(self, name: str, lb: NamespaceLB) -> Transaction:
        """A transaction that (re)creates a table: emptied if it was there, made if not."""
        tx = Transaction(name)
        tx.add_table()
        tx.delete_table()
        tx.add_table()
        tx.add_set(
            SetSpec(
                PUBLISHED_MAP,
                concat_type(TYPE_INET_PROTOCOL, TYPE_INET_SERVICE),
                8,
                NFT_DATA_VERDICT,
            )
            if lb.node
            else SetSpec(
                VIP_MAP,
                concat_type(TYPE_IPADDR, TYPE_INET_PROTOCOL),
                8,
                NFT_DATA_VERDICT,
            )
        )
        main = name == NFT_TABLE
        if main:
            self.balancer.declare(tx)
        self.balancer.declare_table(tx)
        tx.add_chain("output", Hook(HOOK_OUTPUT, -100))
        if not lb.node:
            tx.add_rule(
                "output",
                [*E.key_daddr_l4proto(), E.lookup(VIP_MAP, E.REG32_00, E.REG_VERDICT)],
                comment="service VIPs",
            )
            return tx
        # Published ports answer on every local address but loopback (that would need
        # route_localnet, a hole: CVE-2020-8558).
        published_rule = [
            *E.match_fib_daddr_local(),
            *E.match_ip_addr_in(E.IP_DADDR_OFFSET, _LOOPBACK, negate=True),
            *E.key_l4proto_dport(),
            E.lookup(PUBLISHED_MAP, E.REG32_00, E.REG_VERDICT),
        ]
        tx.add_chain("prerouting", Hook(HOOK_PREROUTING, -100))
        tx.add_rule("prerouting", published_rule, comment="published ports")
        tx.add_rule("output", published_rule, comment="published ports, from this node")
        if main:
            tx.add_chain("postrouting", Hook(HOOK_POSTROUTING, 100))
            self._masquerade_rules(tx, lb)
        return tx

    def _masquerade_rules(self, tx: Transaction, lb: NamespaceLB) -> None:
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

    def _full(self, desired: NamespaceLB) -> _Change:
        txs: dict[str, Transaction] = {}
        for name in list_tables(self._sock):
            if _shard(name):  # a shard a predecessor or a bigger state left (`shoal`: below)
                txs[name] = Transaction(name)
                txs[name].delete_table()
        slots: dict[str, FrontendSlot] = {}
        sizes = {NFT_TABLE: 0}
        txs[NFT_TABLE] = self._new_table(NFT_TABLE, desired)
        for i, (key, fe) in enumerate(desired.frontends.items()):
            name = _table(i // SHARD_SIZE)
            if name not in sizes:
                sizes[name] = 0
                txs[name] = self._new_table(name, desired)  # replaces a mere delete
            sizes[name] += 1
            slots[key] = self._slot(name, fe)
            self._add_frontend(txs[name], fe, slots[key])
        return _Change(list(txs.values()), [], slots, sizes)

    def _incremental(self, old: NamespaceLB, new: NamespaceLB) -> _Change:
        txs: dict[str, Transaction] = {}

        def tx_of(table: str) -> Transaction:
            if table not in txs:
                txs[table] = Transaction(table)
            return txs[table]

        sizes = dict(self._sizes)
        if old.overlay_subnets != new.overlay_subnets:
            tx = tx_of(NFT_TABLE)
            tx.flush_chain("postrouting")
            self._masquerade_rules(tx, new)
        # One pass over the frontends finds what changed; a second finds what went, when some did.
        changed: list[tuple[str, Frontend, Frontend | None]] = []
        kept = 0
        for key, fe in new.frontends.items():
            prev = old.frontends.get(key)
            if prev is None:
                changed.append((key, fe, None))
                continue
            kept += 1
            if prev is not fe and prev != fe:
                changed.append((key, fe, prev))
        removed = (
            [key for key in old.frontends if key not in new.frontends]
            if kept < len(old.frontends)
            else []
        )
        for key in removed:  # first: what went may free a published port or VIP that came
            fe, slot = old.frontends[key], self._slots[key]
            tx = tx_of(slot.table)
            self._remove_entries(tx, fe)
            self.balancer.remove_frontend(tx, fe, slot)
            tx.delete_chain(slot.chain)
            sizes[slot.table] -= 1
        added: dict[str, FrontendSlot] = {}
        for key, fe, prev in changed:
            if prev is None:
                table = self._room(sizes, txs, new)
                sizes[table] += 1
                slot = added[key] = self._slot(table, fe)
                self._add_frontend(tx_of(table), fe, slot)
                continue
            slot = self._slots[key]
            tx = tx_of(slot.table)
            if (prev.published, prev.vip) != (fe.published, fe.vip):
                self._remove_entries(tx, prev)
                self._add_entries(tx, fe, slot)
            if prev.backends != fe.backends:
                self.balancer.update_backends(tx, prev, fe, slot)
        for table, size in list(sizes.items()):
            if size == 0 and table != NFT_TABLE:  # an empty shard goes, and its lookup with it
                del sizes[table]
                txs[table] = Transaction(table)
                txs[table].delete_table()
        return _Change(list(txs.values()), removed, added, sizes)

    def _room(self, sizes: dict[str, int], txs: dict[str, Transaction], lb: NamespaceLB) -> str:
        """The first table with room for one more frontend; a new shard if none has."""
        for table, size in sizes.items():
            if size < SHARD_SIZE:
                return table
        shard = 1
        while _table(shard) in sizes:
            shard += 1
        table = _table(shard)
        sizes[table] = 0
        txs[table] = self._new_table(table, lb)
        return table

    def remove(self) -> None:
        """Delete the tables (and so everything in them) that are there."""
        txs = []
        for name in list_tables(self._sock):
            if _shard(name) is not None:
                txs.append(Transaction(name))
                txs[-1].delete_table()
        try:
            commit(self._sock, txs)
        except NftError as e:
            if e.errnos != {errno.ENOENT}:
                raise
        self._applied, self._slots, self._sizes = None, {}, {}

    def counts(self) -> list[BackendCount]:
        if self._applied is None:
            return []
        counters: dict[str, tuple[int, int]] = {}
        for table in self._sizes:
            counters.update(read_counters(self._sock, table))
        out: list[BackendCount] = []
        for key, fe in self._applied.frontends.items():
            out.extend(self.balancer.counts(counters, fe, self._slots[key]))
        return out
