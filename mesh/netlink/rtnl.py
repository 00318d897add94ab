"""Neighbour and FDB entries in batches over rtnetlink.

A node holds two static entries per remote endpoint of each overlay (ARP: IP -> MAC; FDB:
MAC -> remote node). With 10,000 services of 10 tasks that is 200,000 entries; one pyroute2
call each would take a minute, so they are sent here as many requests per sendmsg and read
back as a dump parsed with a few struct calls. Links and addresses (a handful per node) stay
with pyroute2 (mesh/overlay.py).
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterable

from mesh.netlink.attrs import attr, iter_attrs
from mesh.netlink.core import (
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_REPLACE,
    NLM_F_REQUEST,
    NetlinkRefused,
    NetlinkSocket,
    OpError,
    message,
)

NETLINK_ROUTE = 0
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30
NDA_DST, NDA_LLADDR = 1, 2
NUD_NOARP, NUD_PERMANENT = 0x40, 0x80
NTF_SELF = 0x02
AF_INET, AF_BRIDGE = 2, 7
_NDMSG = struct.Struct("=BBHiHBB")
_IP = struct.Struct("!I")
_PER_SEND = 2048


class RtnlError(NetlinkRefused):
    """The kernel refused some neighbour changes; the others were applied."""

    def describe(self) -> str:
        shown = "; ".join(
            f"{e.what}: {errno.errorcode.get(e.errno, e.errno)}" for e in self.errors[:5]
        )
        return f"{len(self.errors)} neighbour change(s) refused: {shown}"


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
    return message(msg_type, flags, seq, head + body)


class RtnlSocket(NetlinkSocket):
    error = RtnlError

    def __init__(self) -> None:
        super().__init__(NETLINK_ROUTE, timeout=30.0)

    def change(self, add: Iterable[Neigh], delete: Iterable[Neigh]) -> int:
        """Delete, then add-or-replace, in batches; raises RtnlError listing what failed."""
        ops = [(RTM_DELNEIGH, NLM_F_REQUEST | NLM_F_ACK, n) for n in delete]
        ops += [
            (RTM_NEWNEIGH, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, n) for n in add
        ]
        errors: list[OpError] = []
        for start in range(0, len(ops), _PER_SEND):
            chunk = ops[start : start + _PER_SEND]
            seqs = self.next_seqs(len(chunk))
            self.send(
                b"".join(_encode(t, f, s, n) for s, (t, f, n) in zip(seqs, chunk, strict=True))
            )
            pending = set(seqs)
            while pending:
                for seq, err, detail in self.acks():
                    if seq not in pending:
                        continue
                    pending.discard(seq)
                    t, _, n = chunk[seq - seqs.start]
                    # deleting what is already gone is fine
                    if err and not (t == RTM_DELNEIGH and err == errno.ENOENT):
                        verb = "delete" if t == RTM_DELNEIGH else "add"
                        what = f"{verb} {n[0]} {_text(n[2])} -> {_text(n[3])}"
                        errors.append(OpError(what, err, detail))
        if errors:
            raise RtnlError(errors)
        return len(ops)

    def dump(self, kind: str, ifindex: int) -> set[Neigh]:
        """Our kind of entries on a device (static ARP entries; FDB entries with a remote)."""
        family = AF_INET if kind == "arp" else AF_BRIDGE
        out: set[Neigh] = set()
        request = _NDMSG.pack(family, 0, 0, 0, 0, 0, 0)
        head = _NDMSG.size
        try:
            for msg_type, data, start, end in self.iter_dump(RTM_GETNEIGH, request):
                if msg_type != RTM_NEWNEIGH:
                    continue
                fam, _, _, index, _state, flags, _ = _NDMSG.unpack_from(data, start)
                if index == ifindex and fam == family:
                    n = self._decode(kind, index, flags, dict(iter_attrs(data[start + head : end])))
                    if n is not None:
                        out.add(n)
        except RtnlError:
            pass  # a refused dump: what arrived before the refusal is what we know
        return out

    @staticmethod
    def _decode(kind: str, index: int, flags: int, attrs: dict[int, bytes]) -> Neigh | None:
        dst, mac = attrs.get(NDA_DST), attrs.get(NDA_LLADDR)
        if mac is None or dst is None or len(dst) != 4:
            return None
        mac_text = ":".join(f"{b:02x}" for b in mac)
        if kind == "arp":
            return ("arp", index, _IP.unpack(dst)[0], mac_text)
        if not flags & NTF_SELF:
            return None
        return ("fdb", index, mac_text, _IP.unpack(dst)[0])
