"""Neighbour and FDB entries in batches over rtnetlink.

A node holds two static entries per remote endpoint of each overlay (ARP: IP -> MAC; FDB:
MAC -> remote node). With 10,000 services of 10 tasks that is 200,000 entries; one pyroute2
call each would take a minute, so they are sent here as many requests per sendmsg and read
back as a dump parsed with a few struct calls. Links and addresses (a handful per node) stay
with pyroute2.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterable, Iterator

from mesh.nft.wire import NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REQUEST, attr, iter_attrs

NETLINK_ROUTE = 0
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REPLACE = 0x100
NDA_DST, NDA_LLADDR = 1, 2
NUD_NOARP, NUD_PERMANENT = 0x40, 0x80
NTF_SELF = 0x02
AF_INET, AF_BRIDGE = 2, 7
_HDR = struct.Struct("=IHHII")
_NDMSG = struct.Struct("=BBHiHBB")
_IP = struct.Struct("!I")
_PER_SEND = 2048


class RtnlError(RuntimeError):
    def __init__(self, errors: list[tuple[str, int]]):
        self.errors = errors
        shown = "; ".join(f"{what}: {errno.errorcode.get(e, e)}" for what, e in errors[:5])
        super().__init__(f"{len(errors)} neighbour change(s) refused: {shown}")


# A static entry on a device, as a plain tuple (a node builds two per remote endpoint on every
# sync, and plain tuples are the cheapest thing Python makes):
#   ("arp", ifindex, ip as int, mac)   IP -> MAC
#   ("fdb", ifindex, mac, ip as int)   MAC -> the remote node's underlay address
Neigh = tuple[str, int, int | str, int | str]


def _text(v: int | str) -> str:
    return socket.inet_ntoa(_IP.pack(v)) if isinstance(v, int) else v


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def _encode(msg_type: int, flags: int, seq: int, n: Neigh) -> bytes:
    kind, ifindex, key, value = n
    if kind == "arp":
        head = _NDMSG.pack(AF_INET, 0, 0, ifindex, NUD_PERMANENT, 0, 0)
        body = attr(NDA_DST, _IP.pack(int(key))) + attr(NDA_LLADDR, _mac(str(value)))
    else:
        head = _NDMSG.pack(AF_BRIDGE, 0, 0, ifindex, NUD_PERMANENT | NUD_NOARP, NTF_SELF, 0)
        body = attr(NDA_LLADDR, _mac(str(key))) + attr(NDA_DST, _IP.pack(int(value)))
    payload = head + body
    return _HDR.pack(_HDR.size + len(payload), msg_type, flags, seq, 0) + payload


class RtnlSocket:
    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        self._sock.bind((0, 0))
        self._sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE
        self._sock.settimeout(30)
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> RtnlSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def change(self, add: Iterable[Neigh], delete: Iterable[Neigh]) -> int:
        """Delete, then add-or-replace, in batches; raises RtnlError listing what failed."""
        ops = [(RTM_DELNEIGH, NLM_F_REQUEST | NLM_F_ACK, n) for n in delete]
        ops += [
            (RTM_NEWNEIGH, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, n) for n in add
        ]
        errors: list[tuple[str, int]] = []
        for start in range(0, len(ops), _PER_SEND):
            chunk = ops[start : start + _PER_SEND]
            first = self._seq + 1
            buf = b"".join(_encode(t, f, first + i, n) for i, (t, f, n) in enumerate(chunk))
            self._seq += len(chunk)
            self._sock.send(buf)
            pending = set(range(first, first + len(chunk)))
            while pending:
                for seq, err in self._acks():
                    if seq in pending:
                        pending.discard(seq)
                        t, _, n = chunk[seq - first]
                        # deleting what is already gone is fine
                        if err and not (t == RTM_DELNEIGH and err == 2):
                            verb = "delete" if t == RTM_DELNEIGH else "add"
                            errors.append((f"{verb} {n[0]} {_text(n[2])} -> {_text(n[3])}", err))
        if errors:
            raise RtnlError(errors)
        return len(ops)

    def _acks(self) -> Iterator[tuple[int, int]]:
        data = self._sock.recv(1 << 20)
        off = 0
        while off + _HDR.size <= len(data):
            length, msg_type, _flags, seq, _pid = _HDR.unpack_from(data, off)
            if length < _HDR.size:
                return
            if msg_type == NLMSG_ERROR:
                yield seq, -struct.unpack_from("=i", data, off + _HDR.size)[0]
            off += (length + 3) & ~3

    def dump(self, kind: str, ifindex: int) -> set[Neigh]:
        """Our kind of entries on a device (static ARP entries; FDB entries with a remote)."""
        family = AF_INET if kind == "arp" else AF_BRIDGE
        self._seq += 1
        seq = self._seq
        req = _NDMSG.pack(family, 0, 0, 0, 0, 0, 0)
        self._sock.send(
            _HDR.pack(_HDR.size + len(req), RTM_GETNEIGH, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + req
        )
        out: set[Neigh] = set()
        while True:
            data = self._sock.recv(1 << 20)
            off = 0
            while off + _HDR.size <= len(data):
                length, msg_type, _flags, mseq, _pid = _HDR.unpack_from(data, off)
                if length < _HDR.size or (mseq == seq and msg_type in (NLMSG_DONE, NLMSG_ERROR)):
                    return out
                if mseq == seq and msg_type == RTM_NEWNEIGH:
                    fam, _, _, index, state, flags, _ = _NDMSG.unpack_from(data, off + _HDR.size)
                    if index == ifindex and fam == family:
                        attrs = dict(iter_attrs(data[off + _HDR.size + _NDMSG.size : off + length]))
                        n = self._decode(kind, index, state, flags, attrs)
                        if n is not None:
                            out.add(n)
                off += (length + 3) & ~3

    @staticmethod
    def _decode(
        kind: str, index: int, state: int, flags: int, attrs: dict[int, bytes]
    ) -> Neigh | None:
        dst, mac = attrs.get(NDA_DST), attrs.get(NDA_LLADDR)
        if mac is None or dst is None or len(dst) != 4:
            return None
        mac_text = ":".join(f"{b:02x}" for b in mac)
        if kind == "arp":
            return ("arp", index, _IP.unpack(dst)[0], mac_text)
        if not flags & NTF_SELF:
            return None
        return ("fdb", index, mac_text, _IP.unpack(dst)[0])
