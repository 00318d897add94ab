"""nf_tables expressions, encoded as the kernel expects them (linux/netfilter/nf_tables.h).

A rule is a list of Expr. The small helpers at the bottom compose the matches Shoal uses
("ip daddr in 10.255.0.0/16", "fib daddr type local", ...) from the primitive expressions.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

from mesh.netlink.attrs import attr, attr_be32, attr_str, nest

# registers
REG_VERDICT = 0
REG_1 = 1  # 16-byte register, overlaps REG32_00..03
REG32_00 = 8
REG32_01 = 9
REG32_02 = 10

# verdict codes
NF_DROP = 0
NF_ACCEPT = 1
NFT_CONTINUE = -1
NFT_RETURN = -5
NFT_JUMP = -3
NFT_GOTO = -4

# payload bases
NETWORK_HEADER = 1
TRANSPORT_HEADER = 2

# cmp ops
CMP_EQ = 0
CMP_NEQ = 1

# meta keys
META_MARK = 3
META_L4PROTO = 16

# fib
FIB_RESULT_ADDRTYPE = 3
FIB_F_DADDR = 1 << 1
RTN_LOCAL = 2

# ct keys
CT_STATE = 0
CT_STATUS = 2

# nat
NAT_SNAT = 0
NAT_DNAT = 1
NFPROTO_IPV4 = 2
NAT_RANGE_MAP_IPS = 1 << 0
NAT_RANGE_PROTO_SPECIFIED = 1 << 1

NFT_OBJECT_COUNTER = 1

# expression attribute numbers
_LIST_ELEM = 1
_EXPR_NAME = 1
_EXPR_DATA = 2
_DATA_VALUE = 1
_DATA_VERDICT = 2
_VERDICT_CODE = 1
_VERDICT_CHAIN = 2


@dataclass(frozen=True, slots=True)
class Expr:
    name: str
    data: bytes

    def encode(self) -> bytes:
        return nest(_LIST_ELEM, attr_str(_EXPR_NAME, self.name), nest(_EXPR_DATA, self.data))


def data_value(value: bytes) -> bytes:
    return attr(_DATA_VALUE, value)


def data_verdict(code: int, chain: str | None = None) -> bytes:
    parts = [attr_be32(_VERDICT_CODE, code)]
    if chain is not None:
        parts.append(attr_str(_VERDICT_CHAIN, chain))
    return nest(_DATA_VERDICT, *parts)


def payload(base: int, offset: int, length: int, dreg: int) -> Expr:
    return Expr(
        "payload",
        attr_be32(1, dreg) + attr_be32(2, base) + attr_be32(3, offset) + attr_be32(4, length),
    )


def cmp(op: int, sreg: int, value: bytes) -> Expr:
    return Expr("cmp", attr_be32(1, sreg) + attr_be32(2, op) + nest(3, data_value(value)))


def meta_load(key: int, dreg: int) -> Expr:
    return Expr("meta", attr_be32(1, dreg) + attr_be32(2, key))


def meta_set(key: int, sreg: int) -> Expr:
    return Expr("meta", attr_be32(2, key) + attr_be32(3, sreg))


def bitwise(sreg: int, dreg: int, mask: bytes, xor: bytes) -> Expr:
    return Expr(
        "bitwise",
        attr_be32(1, sreg)
        + attr_be32(2, dreg)
        + attr_be32(3, len(mask))
        + nest(4, data_value(mask))
        + nest(5, data_value(xor)),
    )


def immediate(dreg: int, value: bytes) -> Expr:
    return Expr("immediate", attr_be32(1, dreg) + nest(2, data_value(value)))


def verdict(code: int, chain: str | None = None) -> Expr:
    return Expr("immediate", attr_be32(1, REG_VERDICT) + nest(2, data_verdict(code, chain)))


def lookup(set_name: str, sreg: int, dreg: int | None = None, invert: bool = False) -> Expr:
    data = attr_str(1, set_name) + attr_be32(2, sreg)
    if dreg is not None:
        data += attr_be32(3, dreg)
    if invert:
        data += attr_be32(5, 1)
    return Expr("lookup", data)


def numgen_inc(dreg: int, modulus: int, offset: int = 0) -> Expr:
    return Expr(
        "numgen",
        attr_be32(1, dreg) + attr_be32(2, modulus) + attr_be32(3, 0) + attr_be32(4, offset),
    )


def nat(kind: int, reg_addr: int, reg_proto: int | None) -> Expr:
    flags = NAT_RANGE_MAP_IPS
    data = attr_be32(1, kind) + attr_be32(2, NFPROTO_IPV4) + attr_be32(3, reg_addr)
    if reg_proto is not None:
        data += attr_be32(5, reg_proto)
        flags |= NAT_RANGE_PROTO_SPECIFIED
    return Expr("nat", data + attr_be32(7, flags))


def masquerade() -> Expr:
    # Port-preserving: "fully-random" makes backends' TIME_WAIT reject reused tuples (PAWS),
    # stalling ~3% of new connections (../shared/reference/mesh-anchors.md section 5).
    return Expr("masq", b"")


def counter() -> Expr:
    return Expr("counter", b"")


def objref_map(sreg: int, set_name: str) -> Expr:
    return Expr("objref", attr_be32(3, sreg) + attr_str(4, set_name))


def fib_daddr_type(dreg: int) -> Expr:
    return Expr(
        "fib", attr_be32(1, dreg) + attr_be32(2, FIB_RESULT_ADDRTYPE) + attr_be32(3, FIB_F_DADDR)
    )


def ct_load(key: int, dreg: int) -> Expr:
    return Expr("ct", attr_be32(1, dreg) + attr_be32(2, key))


# ---- values in register layout -------------------------------------------------------------


def u32_host(value: int) -> bytes:
    """Host-order 32-bit value (marks, numgen results, fib results are host order)."""
    return struct.pack("=I", value)


def ipv4(addr: str) -> bytes:
    return socket.inet_aton(addr)


def port_reg(port: int) -> bytes:
    """A port as it sits in a 4-byte register slot: big-endian, zero-padded."""
    return struct.pack(">H", port) + b"\0\0"


def proto_reg(proto: int) -> bytes:
    return bytes([proto, 0, 0, 0])


# ---- composite matches ---------------------------------------------------------------------

IP_SADDR_OFFSET = 12
IP_DADDR_OFFSET = 16


def match_ip_addr_in(
    offset: int, network: ipaddress.IPv4Network, negate: bool = False
) -> list[Expr]:
    """ip saddr/daddr [!=] network (offset selects saddr or daddr)."""
    exprs = [payload(NETWORK_HEADER, offset, 4, REG_1)]
    if network.prefixlen < 32:
        exprs.append(bitwise(REG_1, REG_1, network.netmask.packed, b"\0\0\0\0"))
    exprs.append(cmp(CMP_NEQ if negate else CMP_EQ, REG_1, network.network_address.packed))
    return exprs


def match_fib_daddr_local() -> list[Expr]:
    return [fib_daddr_type(REG_1), cmp(CMP_EQ, REG_1, u32_host(RTN_LOCAL))]


def key_l4proto_dport() -> list[Expr]:
    """Load `meta l4proto . th dport` into REG32_00, REG32_01."""
    return [meta_load(META_L4PROTO, REG32_00), payload(TRANSPORT_HEADER, 2, 2, REG32_01)]


def key_daddr_l4proto() -> list[Expr]:
    """Load `ip daddr . meta l4proto` into REG32_00, REG32_01."""
    return [
        payload(NETWORK_HEADER, IP_DADDR_OFFSET, 4, REG32_00),
        meta_load(META_L4PROTO, REG32_01),
    ]


META_OIFNAME = 7
IPS_DST_NAT = 1 << 5
REJECT_ICMP_UNREACH = 0
REJECT_TCP_RST = 1
ICMP_PORT_UNREACH = 3


def match_ct_dnat() -> list[Expr]:
    """ct status dnat: the connection's destination was translated."""
    return [
        ct_load(CT_STATUS, REG_1),
        bitwise(REG_1, REG_1, u32_host(IPS_DST_NAT), u32_host(0)),
        cmp(CMP_NEQ, REG_1, u32_host(0)),
    ]


def match_oifname_prefix(prefix: str, negate: bool = False) -> list[Expr]:
    """oifname [!=] "prefix*": cmp compares only as many bytes as the prefix has."""
    return [
        meta_load(META_OIFNAME, REG_1),
        cmp(CMP_NEQ if negate else CMP_EQ, REG_1, prefix.encode()),
    ]


def match_l4proto(proto: int) -> list[Expr]:
    return [meta_load(META_L4PROTO, REG_1), cmp(CMP_EQ, REG_1, bytes([proto]))]


def reject_tcp_reset() -> Expr:
    return Expr("reject", attr_be32(1, REJECT_TCP_RST))


def reject_port_unreachable() -> Expr:
    return Expr("reject", attr_be32(1, REJECT_ICMP_UNREACH) + attr(2, bytes([ICMP_PORT_UNREACH])))
