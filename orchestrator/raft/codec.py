"""Raft messages on the wire: a compact binary encoding (entries carry raw bytes, so JSON with
base64 would cost a third more and a copy per entry).

Layout, little-endian: a fixed header, the context, the entries, then an optional snapshot.
Decoding checks every length against the buffer, so a malformed frame from the network raises
CodecError and never anything else.
"""

from __future__ import annotations

import struct

from orchestrator.raft.messages import (
    ConfState,
    Entry,
    EntryType,
    Message,
    MessageType,
    Snapshot,
    SnapshotMeta,
)

VERSION = 1
_TYPES = list(MessageType)
_ENTRY_TYPES = list(EntryType)
_HEAD = struct.Struct("<BBQQQQQQBQII")  # version, type, to, frm, term, log_term, index,
# commit, reject, reject_hint, len(context), number of entries
_ENTRY = struct.Struct("<QQBI")  # term, index, type, len(data)
_SNAP = struct.Struct("<QQIII")  # index, term, voters, learners, len(data)
_U64 = struct.Struct("<Q")


class CodecError(ValueError):
    pass


def encode(m: Message) -> bytes:
    parts = [
        _HEAD.pack(
            VERSION,
            _TYPES.index(m.type),
            m.to,
            m.frm,
            m.term,
            m.log_term,
            m.index,
            m.commit,
            int(m.reject),
            m.reject_hint,
            len(m.context),
            len(m.entries),
        ),
        m.context,
    ]
    for e in m.entries:
        parts.append(_ENTRY.pack(e.term, e.index, _ENTRY_TYPES.index(e.type), len(e.data)))
        parts.append(e.data)
    if m.snapshot is None:
        parts.append(b"\0")
    else:
        s = m.snapshot
        cs = s.meta.conf_state
        voters, learners = sorted(cs.voters), sorted(cs.learners)
        parts.append(b"\1")
        parts.append(_SNAP.pack(s.meta.index, s.meta.term, len(voters), len(learners), len(s.data)))
        parts.extend(_U64.pack(n) for n in voters + learners)
        parts.append(s.data)
    return b"".join(parts)


class _Reader:
    def __init__(self, raw: bytes):
        self.raw = memoryview(raw)
        self.off = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.off + n > len(self.raw):
            raise CodecError(f"frame too short: need {n} bytes at {self.off}")
        out = bytes(self.raw[self.off : self.off + n])
        self.off += n
        return out

    def unpack(self, st: struct.Struct) -> tuple[int, ...]:
        return st.unpack(self.take(st.size))


def decode(raw: bytes) -> Message:
    r = _Reader(raw)
    (
        version,
        mtype,
        to,
        frm,
        term,
        log_term,
        index,
        commit,
        reject,
        reject_hint,
        ctx_len,
        n_entries,
    ) = r.unpack(_HEAD)
    if version != VERSION:
        raise CodecError(f"unknown message version {version}")
    if mtype >= len(_TYPES):
        raise CodecError(f"unknown message type {mtype}")
    context = r.take(ctx_len)
    entries = []
    for _ in range(n_entries):
        eterm, eindex, etype, dlen = r.unpack(_ENTRY)
        if etype >= len(_ENTRY_TYPES):
            raise CodecError(f"unknown entry type {etype}")
        entries.append(Entry(eterm, eindex, r.take(dlen), _ENTRY_TYPES[etype]))
    snapshot = None
    flag = r.take(1)
    if flag == b"\1":
        sindex, sterm, nv, nl, dlen = r.unpack(_SNAP)
        ids = [r.unpack(_U64)[0] for _ in range(nv + nl)]
        conf = ConfState(frozenset(ids[:nv]), frozenset(ids[nv:]))
        snapshot = Snapshot(SnapshotMeta(sindex, sterm, conf), r.take(dlen))
    elif flag != b"\0":
        raise CodecError("bad snapshot flag")
    if r.off != len(raw):
        raise CodecError(f"{len(raw) - r.off} trailing bytes")
    return Message(
        type=_TYPES[mtype],
        to=to,
        frm=frm,
        term=term,
        log_term=log_term,
        index=index,
        entries=tuple(entries),
        commit=commit,
        reject=bool(reject),
        reject_hint=reject_hint,
        snapshot=snapshot,
        context=context,
    )
