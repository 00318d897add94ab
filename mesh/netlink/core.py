"""A netlink socket: message framing, sequence numbers, acknowledgements and dumps.

What every family we speak ourselves shares (nf_tables and ctnetlink through nfnetlink.py,
rtnetlink neighbours through rtnl.py). Requests are pipelined: a caller sends many messages in
one sendmsg and reads the acknowledgements back, which is where the speed over one library
call per object comes from (docs/architecture.md, the data plane).
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar, Self

from mesh.netlink.attrs import attrs_dict, get_str, pad

SOL_NETLINK = 270
NETLINK_EXT_ACK = 11
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33

NLMSG_ERROR = 2
NLMSG_DONE = 3

# request flags
NLM_F_REQUEST = 0x01
NLM_F_ACK = 0x04
NLM_F_DUMP = 0x300
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_APPEND = 0x800
# flags of an acknowledgement (NLMSG_ERROR)
NLM_F_CAPPED = 0x100
NLM_F_ACK_TLVS = 0x200
NLMSGERR_ATTR_MSG = 1

HEADER = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_ERRNO = struct.Struct("=i")


def message(msg_type: int, flags: int, seq: int, payload: bytes) -> bytes:
    """One netlink message: the header, then the payload (the family's header and attributes)."""
    return HEADER.pack(HEADER.size + len(payload), msg_type, flags, seq, 0) + payload


@dataclass(frozen=True)
class OpError:
    """A request the kernel refused; `what` describes it, `detail` is the kernel's extended
    acknowledgement message, if it gave one."""

    what: str
    errno: int
    detail: str

    def __str__(self) -> str:
        extra = f" ({self.detail})" if self.detail else ""
        return f"{self.what}: {os.strerror(self.errno)}{extra}"


class NetlinkRefused(RuntimeError):
    """The kernel refused one or more requests."""

    prefix = "netlink request refused"

    def __init__(self, errors: Sequence[OpError]):
        self.errors = list(errors)
        super().__init__(self.describe())

    def describe(self) -> str:
        shown = "; ".join(str(e) for e in self.errors[:5])
        more = f" (+{len(self.errors) - 5} more)" if len(self.errors) > 5 else ""
        return f"{self.prefix}: {shown}{more}"

    @property
    def errnos(self) -> set[int]:
        return {e.errno for e in self.errors}


class NetlinkSocket:
    """A netlink socket of one protocol, in the namespace of the thread that creates it.

    Replies are read 1 MiB at a time, into an 8 MiB receive buffer; the send buffer grows with
    the largest batch sent. `error` is the exception raised for refused requests.
    """

    error: ClassVar[type[NetlinkRefused]] = NetlinkRefused

    def __init__(self, protocol: int, timeout: float):
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, protocol)
        self._sock.bind((0, 0))
        self._sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
        self._sock.settimeout(timeout)
        self._seq = int.from_bytes(os.urandom(3), "little") << 4
        self._sndbuf = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def next_seqs(self, n: int) -> range:
        """n consecutive sequence numbers, for requests sent together."""
        if self._seq + n > 0xFFFFFFFF:
            self._seq = 0
        first = self._seq + 1
        self._seq += n
        return range(first, first + n)

    def send(self, buf: bytes) -> None:
        """Send messages in one sendmsg (the kernel processes them in order)."""
        if len(buf) + 4096 > self._sndbuf:
            self._sndbuf = max(len(buf) * 2, 1 << 20)
            self._sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, self._sndbuf)
        self._sock.send(buf)

    def acks(self) -> Iterator[tuple[int, int, str]]:
        """(seq, errno, detail) of each acknowledgement in one read; errno 0 is success."""
        data = self._sock.recv(1 << 20)
        off = 0
        while off + HEADER.size <= len(data):
            length, msg_type, flags, seq, _pid = HEADER.unpack_from(data, off)
            if length < HEADER.size:
                break
            if msg_type == NLMSG_ERROR:
                (err,) = _ERRNO.unpack_from(data, off + HEADER.size)
                detail = ""
                if flags & NLM_F_ACK_TLVS:
                    # The echoed request follows (capped to its header when NLM_F_CAPPED).
                    inner_len = HEADER.size
                    if not flags & NLM_F_CAPPED:
                        (inner_len,) = struct.unpack_from("=I", data, off + HEADER.size + 4)
                    tlv_off = off + HEADER.size + 4 + pad(inner_len)
                    tlvs = attrs_dict(data[tlv_off : off + length])
                    detail = get_str(tlvs, NLMSGERR_ATTR_MSG)
                yield seq, -err, detail
            off += pad(length)

    def wait_ack(self, seq: int, what: str) -> None:
        """Read until the acknowledgement of `seq`; raise `error` if it is a refusal."""
        while True:
            for rseq, err, detail in self.acks():
                if rseq == seq:
                    if err:
                        raise self.error([OpError(what, err, detail)])
                    return

    def iter_dump(self, msg_type: int, payload: bytes) -> Iterator[tuple[int, bytes, int, int]]:
        """Send a dump request; yield each reply as (type, buffer, payload start, end), so a
        caller unpacks the family's header and attributes in place. Raises `error` if the
        kernel refuses the dump."""
        seq = self.next_seq()
        self._sock.send(message(msg_type, NLM_F_REQUEST | NLM_F_DUMP, seq, payload))
        while True:
            data = self._sock.recv(1 << 20)
            off = 0
            while off + HEADER.size <= len(data):
                length, mtype, _flags, mseq, _pid = HEADER.unpack_from(data, off)
                if length < HEADER.size:
                    return
                if mseq == seq:
                    if mtype == NLMSG_DONE:
                        return
                    if mtype == NLMSG_ERROR:
                        (err,) = _ERRNO.unpack_from(data, off + HEADER.size)
                        if err == 0:
                            return
                        raise self.error([OpError("dump", -err, "")])
                    yield mtype, data, off + HEADER.size, off + length
                off += pad(length)
