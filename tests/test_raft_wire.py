"""Raft messages on the wire (orchestrator/raft/codec.py): every message survives the round
trip, and no malformed frame raises anything but CodecError."""

from __future__ import annotations

import contextlib

from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.raft import codec
from orchestrator.raft.messages import (
    ConfState,
    Entry,
    EntryType,
    Message,
    MessageType,
    Snapshot,
    SnapshotMeta,
)

u64 = st.integers(0, 2**64 - 1)
ids = st.frozensets(st.integers(1, 2**64 - 1), max_size=5)

entries = st.builds(
    Entry, term=u64, index=u64, data=st.binary(max_size=64), type=st.sampled_from(list(EntryType))
)
snapshots = st.builds(
    Snapshot,
    meta=st.builds(SnapshotMeta, index=u64, term=u64, conf_state=st.builds(ConfState, ids, ids)),
    data=st.binary(max_size=64),
)
messages = st.builds(
    Message,
    type=st.sampled_from(list(MessageType)),
    to=u64,
    frm=u64,
    term=u64,
    log_term=u64,
    index=u64,
    entries=st.lists(entries, max_size=4).map(tuple),
    commit=u64,
    reject=st.booleans(),
    reject_hint=u64,
    snapshot=st.none() | snapshots,
    context=st.binary(max_size=16),
)


@settings(max_examples=300, deadline=None)
@given(messages)
def test_round_trip(m: Message) -> None:
    assert codec.decode(codec.encode(m)) == m


@settings(max_examples=300, deadline=None)
@given(messages, st.data())
def test_truncated_or_extended_frames_are_refused(m: Message, data: st.DataObject) -> None:
    raw = codec.encode(m)
    cut = data.draw(st.integers(0, len(raw) - 1))
    for bad in (raw[:cut], raw + b"x"):
        try:
            codec.decode(bad)
        except codec.CodecError:
            continue
        raise AssertionError(f"accepted a malformed frame: {bad!r}")


@settings(max_examples=500, deadline=None)
@given(messages, st.data())
def test_corrupted_frames_raise_only_codec_error(m: Message, data: st.DataObject) -> None:
    raw = bytearray(codec.encode(m))
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    with contextlib.suppress(codec.CodecError):
        codec.decode(bytes(raw))
