"""nfnetlink: the netfilter netlink protocol, shared by nf_tables and ctnetlink.

Every message starts with struct nfgenmsg (family, version, resource id) and its type is the
subsystem's number << 8 | the subsystem's message type. nf_tables changes go in batches
(BATCH_BEGIN ... BATCH_END) that the kernel applies atomically or not at all.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from mesh.netlink.core import NLM_F_ACK, NLM_F_REQUEST, NetlinkSocket, OpError, message

NETLINK_NETFILTER = 12

NFNL_SUBSYS_CTNETLINK = 1
NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN = 16
NFNL_MSG_BATCH_END = 17

_NFGEN = struct.Struct("=BBH")  # nfgenmsg: family, version, res_id (big-endian)


@dataclass(frozen=True)
class Message:
    """One request inside a batch; `what` describes it for error messages."""

    msg_type: int
    flags: int
    family: int
    body: bytes
    what: str


def _nlmsg(msg_type: int, flags: int, seq: int, family: int, res_id: int, body: bytes) -> bytes:
    return message(msg_type, flags, seq, _NFGEN.pack(family, 0, socket.htons(res_id)) + body)


class NfnlSocket(NetlinkSocket):
    """A netfilter netlink socket speaking to one subsystem (nf_tables, ctnetlink)."""

    def __init__(self, subsys: int):
        super().__init__(NETLINK_NETFILTER, timeout=120.0)
        self.subsys = subsys

    def commit(self, messages: Sequence[Message]) -> None:
        """Apply messages as one atomic batch, or raise `error` and apply nothing."""
        if not messages:
            return
        subsys = self.subsys
        begin_seq = self.next_seq()
        parts = [_nlmsg(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, begin_seq, 0, subsys, b"")]
        whats: dict[int, str] = {begin_seq: "batch"}
        last = len(messages) - 1
        last_seq = 0
        for i, m in enumerate(messages):
            seq = self.next_seq()
            whats[seq] = m.what
            flags = NLM_F_REQUEST | m.flags | (NLM_F_ACK if i == last else 0)
            parts.append(_nlmsg((subsys << 8) | m.msg_type, flags, seq, m.family, 0, m.body))
            last_seq = seq
        parts.append(_nlmsg(NFNL_MSG_BATCH_END, NLM_F_REQUEST, self.next_seq(), 0, subsys, b""))
        self.send(b"".join(parts))
        errors: list[OpError] = []
        done = False
        while not done:
            for seq, err, detail in self.acks():
                if seq not in whats:
                    continue  # a late reply to an earlier request
                if err:
                    errors.append(OpError(whats[seq], err, detail))
                    if seq == begin_seq:
                        done = True
                if seq == last_seq:
                    done = True
        if errors:
            raise self.error(errors)

    def dump(self, msg_type: int, family: int, body: bytes = b"") -> list[bytes]:
        """A GET request with NLM_F_DUMP; returns each reply's attributes (after nfgenmsg).
        Nothing to dump (ENOENT, as for the objects of a missing table) is an empty list."""
        payload = _NFGEN.pack(family, 0, 0) + body
        skip = _NFGEN.size
        try:
            return [
                data[start + skip : end]
                for _type, data, start, end in self.iter_dump(
                    (self.subsys << 8) | msg_type, payload
                )
            ]
        except self.error as e:
            if e.errnos == {errno.ENOENT}:
                return []
            raise

    def request(self, msg_type: int, family: int, body: bytes, what: str) -> None:
        """One acknowledged request outside a batch (conntrack deletes)."""
        seq = self.next_seq()
        self.send(
            _nlmsg((self.subsys << 8) | msg_type, NLM_F_REQUEST | NLM_F_ACK, seq, family, 0, body)
        )
        self.wait_ack(seq, what)
