"""nf_tables over raw netlink: attribute encoding, batched commits and dumps.

Shoal speaks to nf_tables directly instead of through the `nft` tool. `nft` reads the whole
ruleset of the namespace into its cache before every command, which costs ~0.4 s once 10,000
services are loaded; a batch sent here costs what it changes (docs/benchmarks.md).

All integers inside nf_tables attributes are big-endian (the kernel reads them with ntohl).
"""

from __future__ import annotations

import errno as errno_mod
import os
import socket
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

NETLINK_NETFILTER = 12
NETLINK_EXT_ACK = 11
SOL_NETLINK = 270
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x01
NLM_F_MULTI = 0x02
NLM_F_ACK = 0x04
NLM_F_DUMP = 0x300
NLM_F_CREATE = 0x400
NLM_F_APPEND = 0x800
NLM_F_CAPPED = 0x100
NLM_F_ACK_TLVS = 0x200
NLMSGERR_ATTR_MSG = 1

NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF

NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN = 16
NFNL_MSG_BATCH_END = 17

_HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_NFGEN = struct.Struct("=BBH")  # nfgenmsg: family, version, res_id (big-endian)
_ATTR = struct.Struct("=HH")


def _pad(n: int) -> int:
    return (n + 3) & ~3


def attr(kind: int, payload: bytes) -> bytes:
    length = _ATTR.size + len(payload)
    return _ATTR.pack(length, kind) + payload + b"\0" * (_pad(length) - length)


def attr_u32(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack(">I", value & 0xFFFFFFFF))


def attr_u64(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack(">Q", value))


def attr_str(kind: int, value: str) -> bytes:
    return attr(kind, value.encode() + b"\0")


def nest(kind: int, *parts: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(parts))


def iter_attrs(data: bytes | memoryview) -> Iterator[tuple[int, bytes]]:
    """(type, payload) for each attribute in a buffer; flags are stripped from the type."""
    view = memoryview(data)
    off = 0
    while off + _ATTR.size <= len(view):
        length, kind = _ATTR.unpack_from(view, off)
        if length < _ATTR.size or off + length > len(view):
            return
        yield kind & NLA_TYPE_MASK, bytes(view[off + _ATTR.size : off + length])
        off += _pad(length)


def attrs_dict(data: bytes) -> dict[int, bytes]:
    return dict(iter_attrs(data))


def get_str(attrs: dict[int, bytes], kind: int) -> str:
    return attrs.get(kind, b"").rstrip(b"\0").decode(errors="replace")


def get_u32(attrs: dict[int, bytes], kind: int) -> int:
    raw = attrs.get(kind)
    return struct.unpack(">I", raw)[0] if raw and len(raw) >= 4 else 0


def get_u64(attrs: dict[int, bytes], kind: int) -> int:
    raw = attrs.get(kind)
    return struct.unpack(">Q", raw)[0] if raw and len(raw) >= 8 else 0


@dataclass(frozen=True)
class Message:
    """One nf_tables request inside a batch; `what` describes it for error messages."""

    msg_type: int
    flags: int
    family: int
    body: bytes
    what: str


@dataclass(frozen=True)
class OpError:
    what: str
    errno: int
    detail: str

    def __str__(self) -> str:
        extra = f" ({self.detail})" if self.detail else ""
        return f"{self.what}: {os.strerror(self.errno)}{extra}"


class NftError(RuntimeError):
    """The kernel refused a batch; nothing of it was applied."""

    def __init__(self, errors: Sequence[OpError]):
        self.errors = list(errors)
        shown = "; ".join(str(e) for e in self.errors[:5])
        more = f" (+{len(self.errors) - 5} more)" if len(self.errors) > 5 else ""
        super().__init__(f"nftables transaction refused: {shown}{more}")

    @property
    def errnos(self) -> set[int]:
        return {e.errno for e in self.errors}


def _nlmsg(msg_type: int, flags: int, seq: int, family: int, res_id: int, body: bytes) -> bytes:
    payload = _NFGEN.pack(family, 0, socket.htons(res_id)) + body
    return _HDR.pack(_HDR.size + len(payload), msg_type, flags, seq, 0) + payload


class NftSocket:
    """A netfilter netlink socket (nf_tables, conntrack) in the namespace that created it."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self._sock.bind((0, 0))
        self._sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
        self._sock.settimeout(120.0)
        self._seq = int.from_bytes(os.urandom(3), "little") << 4
        self._sndbuf = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> NftSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def commit(self, messages: Sequence[Message]) -> None:
        """Apply messages as one atomic batch, or raise NftError and apply nothing."""
        if not messages:
            return
        begin_seq = self._next_seq()
        parts = [
            _nlmsg(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, begin_seq, 0, NFNL_SUBSYS_NFTABLES, b"")
        ]
        whats: dict[int, str] = {begin_seq: "batch"}
        last = len(messages) - 1
        last_seq = 0
        for i, m in enumerate(messages):
            seq = self._next_seq()
            whats[seq] = m.what
            flags = NLM_F_REQUEST | m.flags | (NLM_F_ACK if i == last else 0)
            parts.append(
                _nlmsg((NFNL_SUBSYS_NFTABLES << 8) | m.msg_type, flags, seq, m.family, 0, m.body)
            )
            last_seq = seq
        parts.append(
            _nlmsg(
                NFNL_MSG_BATCH_END, NLM_F_REQUEST, self._next_seq(), 0, NFNL_SUBSYS_NFTABLES, b""
            )
        )
        buf = b"".join(parts)
        if len(buf) + 4096 > self._sndbuf:
            self._sndbuf = max(len(buf) * 2, 1 << 20)
            self._sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, self._sndbuf)
        self._sock.send(buf)
        errors: list[OpError] = []
        done = False
        while not done:
            for seq, err, detail in self._read_acks():
                if seq not in whats:
                    continue  # a late reply to an earlier request
                if err:
                    errors.append(OpError(whats.get(seq, f"seq {seq}"), err, detail))
                    if seq == begin_seq:
                        done = True
                if seq == last_seq:
                    done = True
        if errors:
            raise NftError(errors)

    def _read_acks(self) -> Iterator[tuple[int, int, str]]:
        data = self._sock.recv(1 << 20)
        off = 0
        while off + _HDR.size <= len(data):
            length, msg_type, flags, seq, _pid = _HDR.unpack_from(data, off)
            if length < _HDR.size:
                break
            if msg_type == NLMSG_ERROR:
                (err,) = struct.unpack_from("=i", data, off + _HDR.size)
                detail = ""
                if flags & NLM_F_ACK_TLVS:
                    # The echoed request follows (capped to its header when NLM_F_CAPPED).
                    inner_len = _HDR.size
                    if not flags & NLM_F_CAPPED:
                        (inner_len,) = struct.unpack_from("=I", data, off + _HDR.size + 4)
                    tlv_off = off + _HDR.size + 4 + _pad(inner_len)
                    tlvs = attrs_dict(data[tlv_off : off + length])
                    detail = get_str(tlvs, NLMSGERR_ATTR_MSG)
                yield seq, -err, detail
            off += _pad(length)

    def dump(
        self, msg_type: int, family: int, body: bytes = b"", subsys: int = NFNL_SUBSYS_NFTABLES
    ) -> list[bytes]:
        """A GET request with NLM_F_DUMP; returns each reply's attribute payload."""
        seq = self._next_seq()
        self._sock.send(
            _nlmsg((subsys << 8) | msg_type, NLM_F_REQUEST | NLM_F_DUMP, seq, family, 0, body)
        )
        out: list[bytes] = []
        while True:
            data = self._sock.recv(1 << 20)
            off = 0
            while off + _HDR.size <= len(data):
                length, mtype, _flags, mseq, _pid = _HDR.unpack_from(data, off)
                if length < _HDR.size:
                    return out
                if mseq == seq:
                    if mtype == NLMSG_DONE:
                        return out
                    if mtype == NLMSG_ERROR:
                        (err,) = struct.unpack_from("=i", data, off + _HDR.size)
                        if err == 0:
                            return out
                        if -err == errno_mod.ENOENT:
                            return []
                        raise NftError([OpError("dump", -err, "")])
                    out.append(data[off + _HDR.size + _NFGEN.size : off + length])
                off += _pad(length)

    def request(self, subsys: int, msg_type: int, family: int, body: bytes, what: str) -> None:
        """One acknowledged request outside a batch (conntrack deletes)."""
        seq = self._next_seq()
        self._sock.send(
            _nlmsg((subsys << 8) | msg_type, NLM_F_REQUEST | NLM_F_ACK, seq, family, 0, body)
        )
        while True:
            for rseq, err, detail in self._read_acks():
                if rseq == seq:
                    if err:
                        raise NftError([OpError(what, err, detail)])
                    return
