"""Links, addresses and routes over rtnetlink, in batches: what plugging task endpoints in
(veth pairs) takes.

With one pyroute2 call per step an endpoint cost ~40 ms (some 15 calls, and an IPRoute opened
inside the task's namespace), and a dump of 1,000 links 0.5-1 s. Here every new endpoint of a
sync is one request of a batch sent in the node's namespace (the veth, its peer created
straight in the task's namespace with its final name, MAC and MTU, the host end already on the
bridge and up), and each task namespace gets a dump and one batch (address, up, default
route). A request's acknowledgement says whether it alone failed; dumps are parsed in place.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from mesh.netlink.attrs import NLA_TYPE_MASK, attr, attr_str, iter_attrs, nest
from mesh.netlink.core import (
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_EXCL,
    NLM_F_REPLACE,
    NLM_F_REQUEST,
    NetlinkSocket,
    OpError,
    message,
)

NETLINK_ROUTE = 0
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_GETADDR = 20, 22
RTM_NEWROUTE, RTM_GETROUTE = 24, 26
RTM_NEWNEIGH = 28
AF_UNSPEC, AF_INET, AF_BRIDGE = 0, 2, 7
IFF_UP = 0x1
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_MASTER = 1, 3, 4, 10
IFLA_OPERSTATE, IFLA_LINKINFO, IFLA_NET_NS_FD, IFLA_EXT_MASK = 16, 18, 28, 29
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
VETH_INFO_PEER = 1
RTEXT_FILTER_SKIP_STATS = 1 << 3  # a link dump without counters: a third of the bytes
IF_OPER_DOWN = 2
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_OIF, RTA_GATEWAY, RTA_TABLE = 4, 5, 15
RT_TABLE_MAIN, RTPROT_STATIC, RT_SCOPE_UNIVERSE, RTN_UNICAST = 254, 4, 0, 1
NDA_LLADDR = 2
NUD_NOARP = 0x40  # a static entry (NUD_PERMANENT would make the bridge take the frames itself)
NTF_MASTER = 0x04  # an entry in the bridge's own table, not the port's

_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBi")  # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct(
    "=BBBBBBBBI"
)  # family, dst/src len, tos, table, protocol, scope, type, flags
_NDMSG = struct.Struct("=BBHiHBB")
_U32 = struct.Struct("=I")
# Each veth request holds its task namespace's file descriptor open until it is sent.
_PER_SEND = 256


def _mac_text(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def _mac_bytes(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


_ATTR = struct.Struct("=HH")
_LINK_ATTRS = frozenset(
    (IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_MASTER, IFLA_OPERSTATE, IFLA_LINKINFO)
)


def _pick(data: bytes, start: int, end: int, wanted: frozenset[int]) -> dict[int, bytes]:
    """The wanted attributes of a message, copying no others (a link carries some 50)."""
    out = {}
    off = start
    while off + 4 <= end:
        length, kind = _ATTR.unpack_from(data, off)
        if length < 4:
            break
        kind &= NLA_TYPE_MASK
        if kind in wanted:
            out[kind] = data[off + 4 : off + length]
        off += (length + 3) & ~3
    return out


def _u32(attrs: dict[int, bytes], kind: int) -> int:
    raw = attrs.get(kind)
    return int(_U32.unpack(raw[:4])[0]) if raw and len(raw) >= 4 else 0


@dataclass(frozen=True)
class Link:
    """A link as a dump shows it: what reconcile compares."""

    index: int
    name: str
    kind: str | None  # IFLA_INFO_KIND: "veth", "bridge", "vxlan", ... None for plain devices
    mac: str | None
    mtu: int
    master: int  # 0: none
    flags: int
    operstate: int
    # IFLA_INFO_DATA, by attribute type (a VXLAN device's settings)
    info_data: dict[int, bytes] = field(default_factory=dict, compare=False, hash=False)

    @property
    def up(self) -> bool:
        return bool(self.flags & IFF_UP)


@dataclass(frozen=True)
class Address:
    index: int
    address: str
    prefixlen: int


@dataclass(frozen=True)
class Route:
    """A route of the main table to 0.0.0.0/0."""

    gateway: str | None
    oif: int


@dataclass(frozen=True)
class Request:
    """One request of a batch; `what` names it in errors."""

    what: str
    msg_type: int
    flags: int
    body: bytes


@dataclass(frozen=True)
class Veth:
    """A veth pair to create: the host end on a bridge, the peer in a task's namespace."""

    host: str
    master: int
    mtu: int
    peer: str
    peer_mac: str
    peer_netns: str  # the namespace's file, e.g. /run/netns/NAME


def set_link(
    index: int, *, up: bool | None = None, master: int | None = None, mtu: int | None = None
) -> Request:
    flags, change = (IFF_UP if up else 0, IFF_UP) if up is not None else (0, 0)
    body = _IFINFOMSG.pack(AF_UNSPEC, 0, index, flags, change)
    if master is not None:
        body += attr(IFLA_MASTER, _U32.pack(master))
    if mtu is not None:
        body += attr(IFLA_MTU, _U32.pack(mtu))
    return Request(f"set link {index}", RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, body)


def delete_link(index: int, name: str) -> Request:
    body = _IFINFOMSG.pack(AF_UNSPEC, 0, index, 0, 0)
    return Request(f"delete link {name}", RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK, body)


def add_address(index: int, address: str, prefixlen: int) -> Request:
    ip = socket.inet_aton(address)
    body = _IFADDRMSG.pack(AF_INET, prefixlen, 0, RT_SCOPE_UNIVERSE, index)
    body += attr(IFA_LOCAL, ip) + attr(IFA_ADDRESS, ip)
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    return Request(f"add address {address}/{prefixlen}", RTM_NEWADDR, flags, body)


def replace_default_route(gateway: str, oif: int) -> Request:
    body = _RTMSG.pack(
        AF_INET, 0, 0, 0, RT_TABLE_MAIN, RTPROT_STATIC, RT_SCOPE_UNIVERSE, RTN_UNICAST, 0
    )
    body += attr(RTA_GATEWAY, socket.inet_aton(gateway)) + attr(RTA_OIF, _U32.pack(oif))
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
    return Request(f"default route via {gateway}", RTM_NEWROUTE, flags, body)


def bridge_entry(port: int, mac: str) -> Request:
    """A static entry for `mac` on a bridge port, in the bridge's own table."""
    body = _NDMSG.pack(AF_BRIDGE, 0, 0, port, NUD_NOARP, NTF_MASTER, 0)
    body += attr(NDA_LLADDR, _mac_bytes(mac))
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
    return Request(f"bridge entry {mac}", RTM_NEWNEIGH, flags, body)


def _create_veth(veth: Veth, netns_fd: int) -> Request:
    peer = _IFINFOMSG.pack(AF_UNSPEC, 0, 0, 0, 0) + b"".join(
        (
            attr_str(IFLA_IFNAME, veth.peer),
            attr(IFLA_ADDRESS, _mac_bytes(veth.peer_mac)),
            attr(IFLA_MTU, _U32.pack(veth.mtu)),
            attr(IFLA_NET_NS_FD, _U32.pack(netns_fd)),
        )
    )
    body = _IFINFOMSG.pack(AF_UNSPEC, 0, 0, IFF_UP, IFF_UP) + b"".join(
        (
            attr_str(IFLA_IFNAME, veth.host),
            attr(IFLA_MTU, _U32.pack(veth.mtu)),
            attr(IFLA_MASTER, _U32.pack(veth.master)),
            nest(
                IFLA_LINKINFO,
                attr_str(IFLA_INFO_KIND, "veth"),
                # VETH_INFO_PEER is not flagged nested: its payload starts with an ifinfomsg
                nest(IFLA_INFO_DATA, attr(VETH_INFO_PEER, peer)),
            ),
        )
    )
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    return Request(f"create veth {veth.host}", RTM_NEWLINK, flags, body)


class LinkSocket(NetlinkSocket):
    """An rtnetlink socket in the namespace of the thread that creates it."""

    def __init__(self) -> None:
        super().__init__(NETLINK_ROUTE, timeout=30.0)

    def run(self, requests: Sequence[Request]) -> list[OpError | None]:
        """Send requests in order, many per sendmsg; each one's outcome (None: done). A
        refused request fails alone: the kernel goes on with the next."""
        out: list[OpError | None] = []
        for start in range(0, len(requests), _PER_SEND):
            out += self._exchange(requests[start : start + _PER_SEND])
        return out

    def create_veths(self, veths: Sequence[Veth]) -> list[OpError | None]:
        """Create veth pairs; each one's outcome. A peer whose name is taken in its namespace
        fails with EEXIST."""
        out: list[OpError | None] = []
        for start in range(0, len(veths), _PER_SEND):
            chunk = veths[start : start + _PER_SEND]
            fds: list[int | OpError] = []
            try:
                for veth in chunk:
                    try:
                        fds.append(os.open(veth.peer_netns, os.O_RDONLY | os.O_CLOEXEC))
                    except OSError as e:
                        fds.append(OpError(f"open {veth.peer_netns}", e.errno or 0, ""))
                sent = [
                    _create_veth(v, fd)
                    for v, fd in zip(chunk, fds, strict=True)
                    if isinstance(fd, int)
                ]
                # The kernel handles a batch within sendmsg: the descriptors may close after.
                results = iter(self._exchange(sent))
            finally:
                for fd in fds:
                    if isinstance(fd, int):
                        os.close(fd)
            out += [fd if isinstance(fd, OpError) else next(results) for fd in fds]
        return out

    def _exchange(self, chunk: Sequence[Request]) -> list[OpError | None]:
        if not chunk:
            return []
        seqs = self.next_seqs(len(chunk))
        self.send(
            b"".join(
                message(r.msg_type, r.flags, seq, r.body)
                for seq, r in zip(seqs, chunk, strict=True)
            )
        )
        out: list[OpError | None] = [None] * len(chunk)
        pending = set(seqs)
        while pending:
            for seq, err, detail in self.acks():
                if seq in pending:
                    pending.discard(seq)
                    if err:
                        out[seq - seqs.start] = OpError(chunk[seq - seqs.start].what, err, detail)
        return out

    def links(self) -> list[Link]:
        request = _IFINFOMSG.pack(AF_UNSPEC, 0, 0, 0, 0) + attr(
            IFLA_EXT_MASK, _U32.pack(RTEXT_FILTER_SKIP_STATS)
        )
        out = []
        for msg_type, data, start, end in self.iter_dump(RTM_GETLINK, request):
            if msg_type != RTM_NEWLINK:
                continue
            _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(data, start)
            attrs = _pick(data, start + _IFINFOMSG.size, end, _LINK_ATTRS)
            kind, info_data = None, {}
            if IFLA_LINKINFO in attrs:
                info = dict(iter_attrs(attrs[IFLA_LINKINFO]))
                if IFLA_INFO_KIND in info:
                    kind = info[IFLA_INFO_KIND].rstrip(b"\0").decode()
                if IFLA_INFO_DATA in info and kind == "vxlan":  # the only settings we compare
                    info_data = dict(iter_attrs(info[IFLA_INFO_DATA]))
            mac = attrs.get(IFLA_ADDRESS)
            operstate = attrs.get(IFLA_OPERSTATE, b"\0")
            out.append(
                Link(
                    index=index,
                    name=attrs.get(IFLA_IFNAME, b"").rstrip(b"\0").decode(errors="replace"),
                    kind=kind,
                    mac=_mac_text(mac) if mac is not None else None,
                    mtu=_u32(attrs, IFLA_MTU),
                    master=_u32(attrs, IFLA_MASTER),
                    flags=flags,
                    operstate=operstate[0] if operstate else 0,
                    info_data=info_data,
                )
            )
        return out

    def addresses(self) -> list[Address]:
        """IPv4 addresses of every link."""
        out = []
        request = _IFADDRMSG.pack(AF_INET, 0, 0, 0, 0)
        for msg_type, data, start, end in self.iter_dump(RTM_GETADDR, request):
            if msg_type != RTM_NEWADDR:
                continue
            family, prefixlen, _flags, _scope, index = _IFADDRMSG.unpack_from(data, start)
            attrs = dict(iter_attrs(memoryview(data)[start + _IFADDRMSG.size : end]))
            ip = attrs.get(IFA_ADDRESS)
            if family == AF_INET and ip is not None and len(ip) == 4:
                out.append(Address(index, socket.inet_ntoa(ip), prefixlen))
        return out

    def default_routes(self) -> list[Route]:
        """IPv4 routes of the main table to 0.0.0.0/0."""
        out = []
        request = _RTMSG.pack(AF_INET, 0, 0, 0, 0, 0, 0, 0, 0)
        for msg_type, data, start, end in self.iter_dump(RTM_GETROUTE, request):
            if msg_type != RTM_NEWROUTE:
                continue
            family, dst_len, _src, _tos, table, *_rest = _RTMSG.unpack_from(data, start)
            attrs = dict(iter_attrs(memoryview(data)[start + _RTMSG.size : end]))
            if RTA_TABLE in attrs:
                table = _u32(attrs, RTA_TABLE)
            if family != AF_INET or dst_len != 0 or table != RT_TABLE_MAIN:
                continue
            gateway = attrs.get(RTA_GATEWAY)
            out.append(
                Route(
                    socket.inet_ntoa(gateway) if gateway and len(gateway) == 4 else None,
                    _u32(attrs, RTA_OIF),
                )
            )
        return out
