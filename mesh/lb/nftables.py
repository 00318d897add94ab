"""Round-robin in nftables: `numgen inc` over a per-frontend DNAT map.

Per frontend: a map `be-...` from 0..N-1 to backend address and port, and one rule

    immediate fid; numgen inc mod N; counter name (fid . n) map @backend-counters;
    dnat to n map @be-...

The numgen result is read by both lookups (one pick per connection), so the named counter of
the chosen backend counts exactly the connections it was given. Only a connection's first
packet reaches a nat chain; conntrack carries the rest.

Why these shapes (measured on kernel 6.18, docs/benchmarks.md): binding a *data map* to a new
rule makes the kernel walk the whole map, so one shared backend map would cost O(all backends)
per added service; a map per frontend costs O(its backends). Counter maps are object maps and
are not walked, so one is shared by the frontends of a table.
"""

from __future__ import annotations

import struct

from mesh.lb.base import BackendCount, Balancer, FrontendSlot
from mesh.lb.model import Backend, Frontend
from mesh.nft import expr as E
from mesh.nft.transaction import (
    TYPE_INET_SERVICE,
    TYPE_IPADDR,
    TYPE_MARK,
    Element,
    SetSpec,
    Transaction,
    concat_type,
)

COUNTER_MAP = "backend-counters"
_PROTO = {"tcp": 6, "udp": 17}


def counter_name(fe: Frontend, b: Backend) -> str:
    return f"{fe.key}/{b.ip}:{b.port}" if b.port else f"{fe.key}/{b.ip}"


def _counter_key(fid: int, index: int) -> bytes:
    return struct.pack("=II", fid, index)


def _index_key(index: int) -> bytes:
    return struct.pack("=I", index)


def _backend_value(b: Backend) -> bytes:
    """Address and port in register layout; address alone when the port is kept."""
    return b.ip.packed + (E.port_reg(b.port) if b.port else b"")


class NftablesBalancer(Balancer):
    name = "nftables"

    def declare_table(self, tx: Transaction) -> None:
        tx.add_set(
            SetSpec(
                COUNTER_MAP, concat_type(TYPE_MARK, TYPE_MARK), 8, object_type=E.NFT_OBJECT_COUNTER
            )
        )

    def add_frontend(self, tx: Transaction, fe: Frontend, slot: FrontendSlot) -> None:
        if fe.target_port:
            data_type, data_len = concat_type(TYPE_IPADDR, TYPE_INET_SERVICE), 8
        else:  # the port is kept: the map gives the address alone
            data_type, data_len = TYPE_IPADDR, 4
        tx.add_set(
            SetSpec(slot.backend_map, TYPE_MARK, 4, data_type, data_len, host_order_key=True)
        )
        names = [counter_name(fe, b) for b in fe.backends]
        for name in names:
            tx.add_counter(name)
        self._add_elements(tx, fe, slot, range(len(fe.backends)), names)
        self._add_rule(tx, fe, slot)

    def _add_elements(
        self,
        tx: Transaction,
        fe: Frontend,
        slot: FrontendSlot,
        indexes: range | list[int],
        names: list[str],
    ) -> None:
        """Backends `indexes` into the frontend's maps; `names`: every backend's counter."""
        if not indexes:
            return
        tx.add_elements(
            slot.backend_map,
            [Element(_index_key(i), data=_backend_value(fe.backends[i])) for i in indexes],
        )
        tx.add_elements(
            COUNTER_MAP,
            [Element(_counter_key(slot.fid, i), objref=names[i]) for i in indexes],
        )

    def _add_rule(self, tx: Transaction, fe: Frontend, slot: FrontendSlot) -> None:
        n = len(fe.backends)
        if n == 0:
            reject = E.reject_tcp_reset() if fe.protocol == "tcp" else E.reject_port_unreachable()
            tx.add_rule(
                slot.chain,
                [*E.match_l4proto(_PROTO[fe.protocol]), reject],
                comment=f"{fe.describe()}: no backends",
            )
            return
        tx.add_rule(
            slot.chain,
            [
                E.immediate(E.REG32_00, E.u32_host(slot.fid)),
                E.numgen_inc(E.REG32_01, n),
                E.objref_map(E.REG32_00, COUNTER_MAP),
                E.lookup(slot.backend_map, E.REG32_01, E.REG32_00),
                E.nat(E.NAT_DNAT, E.REG32_00, E.REG32_01 if fe.target_port else None),
            ],
            comment=fe.describe(),
        )

    def update_backends(
        self, tx: Transaction, old: Frontend, new: Frontend, slot: FrontendSlot
    ) -> None:
        names = [counter_name(new, b) for b in new.backends]
        old_names = {counter_name(old, b) for b in old.backends}
        new_names = set(names)
        for name in sorted(new_names - old_names):
            tx.add_counter(name)
        changed = [
            i
            for i in range(max(len(old.backends), len(new.backends)))
            if i >= len(old.backends)
            or i >= len(new.backends)
            or old.backends[i] != new.backends[i]
        ]
        stale = [i for i in changed if i < len(old.backends)]
        if stale:
            tx.delete_elements(slot.backend_map, [_index_key(i) for i in stale])
            tx.delete_elements(COUNTER_MAP, [_counter_key(slot.fid, i) for i in stale])
        self._add_elements(tx, new, slot, [i for i in changed if i < len(new.backends)], names)
        if len(old.backends) != len(new.backends):
            tx.flush_chain(slot.chain)  # the modulus is part of the rule
            self._add_rule(tx, new, slot)
        for name in sorted(old_names - new_names):
            tx.delete_counter(name)

    def remove_frontend(self, tx: Transaction, fe: Frontend, slot: FrontendSlot) -> None:
        tx.flush_chain(slot.chain)
        if fe.backends:
            tx.delete_elements(
                COUNTER_MAP, [_counter_key(slot.fid, i) for i in range(len(fe.backends))]
            )
        tx.delete_set(slot.backend_map)
        for b in fe.backends:
            tx.delete_counter(counter_name(fe, b))

    def counts(
        self, counters: dict[str, tuple[int, int]], fe: Frontend, slot: FrontendSlot
    ) -> list[BackendCount]:
        return [
            BackendCount(fe, b, counters.get(counter_name(fe, b), (0, 0))[0]) for b in fe.backends
        ]
