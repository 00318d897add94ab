"""Deleting conntrack entries that pin clients to removed backends (ctnetlink).

Only a connection's first packet meets the NAT rules; conntrack carries the rest. So when a
backend leaves, entries that still point at it keep sending traffic there: UDP "connections"
indefinitely (each datagram refreshes the entry), TCP ones that never completed their handshake
until they time out. We delete those, so the next packet is balanced afresh. Established TCP
connections are left to finish (a graceful drain); if their backend is gone they fail as any
connection to a dead host does. Closing and closed ones are left to expire.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from mesh.netlink.attrs import attr, attrs_dict, nest
from mesh.netlink.core import NetlinkRefused
from mesh.netlink.nfnetlink import NFNL_SUBSYS_CTNETLINK, NfnlSocket
from mesh.netns import run_in_netns

IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2
CTA_TUPLE_ORIG = 1
CTA_TUPLE_REPLY = 2
CTA_PROTOINFO = 4
CTA_ID = 12
CTA_TUPLE_IP = 1
CTA_TUPLE_PROTO = 2
CTA_IP_V4_SRC = 1
CTA_IP_V4_DST = 2
CTA_PROTO_NUM = 1
CTA_PROTO_SRC_PORT = 2
CTA_PROTO_DST_PORT = 3
CTA_PROTOINFO_TCP = 1
CTA_PROTOINFO_TCP_STATE = 1
# A TCP entry in one of these states has not completed its handshake. The others carry a
# connection that is open (left to finish) or closing or closed (nothing left to send
# anywhere): deleting those would cost a request each (hundreds per second of load on a busy
# node, mostly TIME_WAIT) and save nothing.
_TCP_HANDSHAKE = {0, 1, 2, 9}  # NONE, SYN_SENT, SYN_RECV, SYN_SENT2
AF_INET = 2
_PROTO = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}


@dataclass(frozen=True)
class Target:
    ip: ipaddress.IPv4Address
    port: int
    protocol: str


@dataclass(frozen=True)
class _Tuple:
    src: str
    dst: str
    proto: int
    sport: int
    dport: int


def _parse_tuple(raw: bytes) -> _Tuple | None:
    a = attrs_dict(raw)
    ip = attrs_dict(a.get(CTA_TUPLE_IP, b""))
    proto = attrs_dict(a.get(CTA_TUPLE_PROTO, b""))
    if CTA_IP_V4_SRC not in ip or CTA_PROTO_NUM not in proto:
        return None

    def port(kind: int) -> int:
        value: int = struct.unpack(">H", proto[kind])[0] if kind in proto else 0
        return value

    return _Tuple(
        socket.inet_ntoa(ip[CTA_IP_V4_SRC]),
        socket.inet_ntoa(ip[CTA_IP_V4_DST]),
        proto[CTA_PROTO_NUM][0],
        port(CTA_PROTO_SRC_PORT),
        port(CTA_PROTO_DST_PORT),
    )


def _tcp_state(raw: bytes) -> int | None:
    info = attrs_dict(raw)
    tcp = attrs_dict(info.get(CTA_PROTOINFO_TCP, b""))
    state = tcp.get(CTA_PROTOINFO_TCP_STATE)
    return state[0] if state else None


def _encode_tuple(t: _Tuple) -> bytes:
    ip = nest(
        CTA_TUPLE_IP,
        attr(CTA_IP_V4_SRC, socket.inet_aton(t.src)),
        attr(CTA_IP_V4_DST, socket.inet_aton(t.dst)),
    )
    proto = nest(
        CTA_TUPLE_PROTO,
        attr(CTA_PROTO_NUM, bytes([t.proto])),
        attr(CTA_PROTO_SRC_PORT, struct.pack(">H", t.sport)),
        attr(CTA_PROTO_DST_PORT, struct.pack(">H", t.dport)),
    )
    return ip + proto


def delete_stale(netns: str | None, targets: Iterable[Target]) -> int:
    """Delete entries whose traffic goes to a removed backend; returns how many."""
    # Port 0 is a VIP backend that takes every port: match the address and protocol only.
    wanted = {(str(t.ip), t.port, _PROTO[t.protocol]) for t in targets}
    if not wanted:
        return 0

    def work() -> int:
        deleted = 0
        with NfnlSocket(NFNL_SUBSYS_CTNETLINK) as sock:
            for raw in sock.dump(IPCTNL_MSG_CT_GET, AF_INET):
                a = attrs_dict(raw)
                orig = _parse_tuple(a.get(CTA_TUPLE_ORIG, b""))
                reply = _parse_tuple(a.get(CTA_TUPLE_REPLY, b""))
                if orig is None or reply is None:
                    continue
                # After DNAT the reply comes from the backend: reply.src is where traffic goes.
                if (reply.src, reply.sport, reply.proto) not in wanted and (
                    reply.src,
                    0,
                    reply.proto,
                ) not in wanted:
                    continue
                if (
                    reply.proto == socket.IPPROTO_TCP
                    and _tcp_state(a.get(CTA_PROTOINFO, b"")) not in _TCP_HANDSHAKE
                ):
                    continue
                try:
                    sock.request(
                        IPCTNL_MSG_CT_DELETE,
                        AF_INET,
                        nest(CTA_TUPLE_ORIG, _encode_tuple(orig)),
                        "delete conntrack entry",
                    )
                    deleted += 1
                except NetlinkRefused as e:
                    if e.errnos != {errno.ENOENT}:  # already gone
                        raise
        return deleted

    return run_in_netns(netns, work)
