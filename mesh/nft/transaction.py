"""Building nf_tables batches: tables, chains, rules, sets, elements and counters.

A Transaction collects requests for one table; commit applies one or several tables'
transactions as a single atomic batch.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mesh.netlink.attrs import (
    attr,
    attr_be32,
    attr_str,
    attrs_dict,
    get_be32,
    get_be64,
    get_str,
    iter_attrs,
    nest,
)
from mesh.netlink.core import NLM_F_APPEND, NLM_F_CREATE
from mesh.netlink.nfnetlink import Message
from mesh.nft.expr import NF_ACCEPT, NFT_OBJECT_COUNTER, Expr, data_value, data_verdict
from mesh.nft.wire import NftSocket

NFPROTO_IPV4 = 2

# message types
NEWTABLE, GETTABLE, DELTABLE = 0, 1, 2
NEWCHAIN, DELCHAIN = 3, 5
NEWRULE, DELRULE = 6, 8
NEWSET, DELSET = 9, 11
NEWSETELEM, DELSETELEM = 12, 14
GETGEN = 16
NEWOBJ, GETOBJ, DELOBJ = 18, 19, 20

# netfilter hooks
HOOK_PREROUTING = 0
HOOK_INPUT = 1
HOOK_FORWARD = 2
HOOK_OUTPUT = 3
HOOK_POSTROUTING = 4

# set flags
SET_CONSTANT = 0x2
SET_MAP = 0x8
SET_OBJECT = 0x40
NFT_DATA_VERDICT = 0xFFFFFF00

# nft's datatype numbers, used by `nft list` to print keys and data (informational to the kernel)
TYPE_VERDICT = 1
TYPE_INTEGER = 4
TYPE_IPADDR = 7
TYPE_INET_PROTOCOL = 12
TYPE_INET_SERVICE = 13
TYPE_MARK = 19
_TYPE_BITS = 6

_ELEMENTS_PER_MESSAGE = 512  # a nested attribute is at most 64 KiB


def concat_type(*types: int) -> int:
    out = 0
    for t in types:
        out = (out << _TYPE_BITS) | t
    return out


@dataclass(frozen=True)
class Hook:
    hooknum: int
    priority: int
    chain_type: str = "nat"


@dataclass(frozen=True)
class SetSpec:
    name: str
    key_type: int
    key_len: int
    data_type: int | None = None  # None: a plain set; NFT_DATA_VERDICT: a verdict map
    data_len: int = 0
    object_type: int | None = None  # NFT_OBJECT_COUNTER: an object map
    host_order_key: bool = False  # tells `nft list` to print an integer key in host order


@dataclass(frozen=True)
class Element:
    key: bytes
    data: bytes | None = None  # map value in register layout
    goto: str | None = None  # verdict map: goto this chain
    objref: str | None = None  # object map: this object's name


def _udata_comment(text: str) -> bytes:
    raw = text.encode()[:250] + b"\0"
    return bytes([0, len(raw)]) + raw


class Transaction:
    """Requests against one table, to be committed as a single atomic batch."""

    def __init__(self, table: str, family: int = NFPROTO_IPV4):
        self.table = table
        self.family = family
        self.messages: list[Message] = []
        self._t = attr_str(1, table)
        self._next_set_id = 1

    def __len__(self) -> int:
        return len(self.messages)

    def _add(self, msg_type: int, flags: int, body: bytes, what: str) -> None:
        self.messages.append(Message(msg_type, flags, self.family, body, what))

    def commit(self, sock: NftSocket) -> None:
        commit(sock, [self])

    # tables
    def add_table(self) -> None:
        self._add(NEWTABLE, NLM_F_CREATE, self._t, f"add table {self.table}")

    def delete_table(self) -> None:
        self._add(DELTABLE, 0, self._t, f"delete table {self.table}")

    # chains
    def add_chain(self, name: str, hook: Hook | None = None) -> None:
        body = self._t + attr_str(3, name)
        if hook is not None:
            body += nest(4, attr_be32(1, hook.hooknum), attr_be32(2, hook.priority & 0xFFFFFFFF))
            body += attr_be32(5, NF_ACCEPT) + attr_str(7, hook.chain_type)
        self._add(NEWCHAIN, NLM_F_CREATE, body, f"add chain {self.table} {name}")

    def flush_chain(self, name: str) -> None:
        self._add(DELRULE, 0, self._t + attr_str(2, name), f"flush chain {self.table} {name}")

    def delete_chain(self, name: str) -> None:
        self._add(DELCHAIN, 0, self._t + attr_str(3, name), f"delete chain {self.table} {name}")

    # rules
    def add_rule(self, chain: str, exprs: Sequence[Expr], comment: str | None = None) -> None:
        body = self._t + attr_str(2, chain) + nest(4, *(e.encode() for e in exprs))
        if comment:
            body += attr(7, _udata_comment(comment))
        self._add(
            NEWRULE,
            NLM_F_CREATE | NLM_F_APPEND,
            body,
            f"add rule {self.table} {chain}" + (f" ({comment})" if comment else ""),
        )

    # sets and maps
    def add_set(self, spec: SetSpec) -> None:
        flags = 0
        body = self._t + attr_str(2, spec.name)
        extra = b""
        if spec.data_type is not None:
            flags |= SET_MAP
            extra += attr_be32(6, spec.data_type)
            if spec.data_type != NFT_DATA_VERDICT:
                extra += attr_be32(7, spec.data_len)
        if spec.object_type is not None:
            flags |= SET_OBJECT
            extra += attr_be32(15, spec.object_type)
        body += (
            attr_be32(3, flags) + attr_be32(4, spec.key_type) + attr_be32(5, spec.key_len) + extra
        )
        if spec.host_order_key:
            # libnftnl user data: NFTNL_UDATA_SET_KEYBYTEORDER = BYTEORDER_HOST_ENDIAN
            body += attr(13, bytes([0, 4]) + struct.pack("=I", 1))
        body += attr_be32(10, self._next_set_id)  # NFTA_SET_ID is mandatory
        self._next_set_id += 1
        self._add(NEWSET, NLM_F_CREATE, body, f"add set {self.table} {spec.name}")

    def delete_set(self, name: str) -> None:
        self._add(DELSET, 0, self._t + attr_str(2, name), f"delete set {self.table} {name}")

    def add_elements(self, set_name: str, elements: Iterable[Element]) -> None:
        self._elements(NEWSETELEM, NLM_F_CREATE, set_name, elements, "add element")

    def delete_elements(self, set_name: str, keys: Iterable[bytes]) -> None:
        self._elements(DELSETELEM, 0, set_name, (Element(k) for k in keys), "delete element")

    def _elements(
        self, msg_type: int, flags: int, set_name: str, elements: Iterable[Element], verb: str
    ) -> None:
        head = self._t + attr_str(2, set_name)
        chunk: list[bytes] = []

        def flush() -> None:
            self._add(
                msg_type,
                flags,
                head + nest(3, *chunk),
                f"{verb} {self.table} {set_name} ({len(chunk)} elements)",
            )
            chunk.clear()

        for el in elements:
            parts = [nest(1, data_value(el.key))]
            if el.data is not None:
                parts.append(nest(2, data_value(el.data)))
            elif el.goto is not None:
                parts.append(nest(2, data_verdict(-4, el.goto)))
            if el.objref is not None:
                parts.append(attr_str(9, el.objref))
            chunk.append(nest(1, *parts))
            if len(chunk) >= _ELEMENTS_PER_MESSAGE:
                flush()
        if chunk:
            flush()

    # named counters
    def add_counter(self, name: str) -> None:
        body = self._t + attr_str(2, name) + attr_be32(3, NFT_OBJECT_COUNTER) + nest(4, b"")
        self._add(NEWOBJ, NLM_F_CREATE, body, f"add counter {self.table} {name}")

    def delete_counter(self, name: str) -> None:
        body = self._t + attr_str(2, name) + attr_be32(3, NFT_OBJECT_COUNTER)
        self._add(DELOBJ, 0, body, f"delete counter {self.table} {name}")


def commit(sock: NftSocket, transactions: Iterable[Transaction]) -> None:
    """Apply the transactions of several tables as one batch: all of it or nothing."""
    sock.commit([m for tx in transactions for m in tx.messages])


def list_tables(sock: NftSocket, family: int = NFPROTO_IPV4) -> list[str]:
    return [get_str(attrs_dict(raw), 1) for raw in sock.dump(GETTABLE, family)]


def read_counters(
    sock: NftSocket, table: str, family: int = NFPROTO_IPV4
) -> dict[str, tuple[int, int]]:
    """Named counters of a table: name -> (packets, bytes)."""
    out: dict[str, tuple[int, int]] = {}
    body = attr_str(1, table) + attr_be32(3, NFT_OBJECT_COUNTER)
    for raw in sock.dump(GETOBJ, family, body):
        a = attrs_dict(raw)
        if get_str(a, 1) != table or get_be32(a, 3) != NFT_OBJECT_COUNTER:
            continue
        data = dict(iter_attrs(a.get(4, b"")))
        out[get_str(a, 2)] = (get_be64(data, 2), get_be64(data, 1))
    return out
