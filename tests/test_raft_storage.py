"""Durable Raft storage on the WAL: recovery, torn tails, corruption, snapshots, compaction."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from orchestrator.raft.core import Config, Raft, bootstrap
from orchestrator.raft.messages import (
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    Snapshot,
    SnapshotMeta,
)
from orchestrator.raft.storage import RaftStorage
from orchestrator.raft.wal import WalCorrupt


def ents(*spec: tuple[int, int]) -> list[Entry]:
    return [Entry(t, i, b"d%d.%d" % (i, t)) for i, t in spec]


def test_recovers_entries_hard_state_and_conf_entries(tmp_path: Path) -> None:
    s = RaftStorage(tmp_path)
    boot = bootstrap([1, 2, 3])
    s.save(boot.hard_state, list(boot.entries))
    s.save(HardState(2, 1, 4), ents((4, 2), (5, 2)))
    s.close()
    st = RaftStorage(tmp_path).initial_state()
    assert st.hard_state == HardState(2, 1, 4)
    assert [(e.index, e.term) for e in st.entries] == [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2)]
    assert st.entries[0].type is EntryType.CONF_CHANGE
    r = Raft(Config(1), random.Random(0), st)
    assert r.conf.voters == {1, 2, 3} and r.term == 2 and r.vote == 1


def test_a_conflicting_suffix_is_replaced(tmp_path: Path) -> None:
    s = RaftStorage(tmp_path)
    s.save(HardState(1, 0, 1), ents((1, 1), (2, 1), (3, 1)))
    s.save(HardState(2, 0, 1), ents((2, 2)))
    s.save(None, ents((3, 2), (4, 2)))
    s.close()
    st = RaftStorage(tmp_path).initial_state()
    assert [(e.index, e.term) for e in st.entries] == [(1, 1), (2, 2), (3, 2), (4, 2)]


def test_torn_tail_is_cut_off(tmp_path: Path) -> None:
    s = RaftStorage(tmp_path)
    s.save(HardState(1, 0, 0), ents((1, 1), (2, 1)))
    s.close()
    wal = tmp_path / "raft.wal"
    size = wal.stat().st_size
    with open(wal, "ab") as f:
        f.write(b"\x40\x00\x00\x00partial")  # a record header the crash interrupted
    st = RaftStorage(tmp_path).initial_state()
    assert [e.index for e in st.entries] == [1, 2]
    assert wal.stat().st_size == size
    # A torn last record (its bytes cut short) loses only that record.
    raw = wal.read_bytes()
    wal.write_bytes(raw[:-3])
    st = RaftStorage(tmp_path).initial_state()
    assert st.hard_state == HardState()
    assert [e.index for e in st.entries] == [1, 2]


def test_corrupt_middle_is_refused_naming_file_and_offset(tmp_path: Path) -> None:
    s = RaftStorage(tmp_path)
    for i in range(1, 6):
        s.save(HardState(1, 0, i - 1), ents((i, 1)))
    s.close()
    wal = tmp_path / "raft.wal"
    raw = bytearray(wal.read_bytes())
    offset = 10 + 40  # inside the first few records, with good records after
    raw[offset] ^= 0xFF
    wal.write_bytes(bytes(raw))
    with pytest.raises(WalCorrupt) as e:
        RaftStorage(tmp_path)
    assert str(wal) in str(e.value) and "offset" in str(e.value)


def test_corrupt_snapshot_is_refused(tmp_path: Path) -> None:
    s = RaftStorage(tmp_path)
    s.save(HardState(1, 0, 2), ents((1, 1), (2, 1)))
    s.compact(Snapshot(SnapshotMeta(2, 1, ConfState(frozenset({1}))), b"state"))
    s.close()
    snap = tmp_path / "snapshot"
    raw = bytearray(snap.read_bytes())
    raw[-1] ^= 0x01
    snap.write_bytes(bytes(raw))
    with pytest.raises(WalCorrupt, match=str(snap)):
        RaftStorage(tmp_path)


def test_compaction_keeps_the_snapshot_and_later_entries(tmp_path: Path) -> None:
    s = RaftStorage(tmp_path)
    s.save(HardState(1, 0, 3), ents(*[(i, 1) for i in range(1, 11)]))
    before = (tmp_path / "raft.wal").stat().st_size
    snap = Snapshot(SnapshotMeta(6, 1, ConfState(frozenset({1, 2}))), b"at six")
    s.compact(snap)
    assert (tmp_path / "raft.wal").stat().st_size < before
    s.save(None, ents((11, 1)))
    s.close()
    st = RaftStorage(tmp_path).initial_state()
    assert st.snapshot == snap
    assert [e.index for e in st.entries] == [7, 8, 9, 10, 11]
    assert st.hard_state.commit == 6  # a snapshot is committed, whatever the hard state said
    r = Raft(Config(1), random.Random(0), st)
    assert r.log.offset == 6 and r.conf.voters == {1, 2} and r.applied == 6


def test_received_snapshot_replaces_a_conflicting_log(tmp_path: Path) -> None:
    s = RaftStorage(tmp_path)
    s.save(HardState(3, 0, 1), ents((1, 1), (2, 3), (3, 3)))
    snap = Snapshot(SnapshotMeta(5, 4, ConfState(frozenset({1, 2, 3}))), b"five")
    s.save(HardState(4, 0, 5), ents((6, 4)), snap)
    s.close()
    st = RaftStorage(tmp_path).initial_state()
    assert st.snapshot == snap and [(e.index, e.term) for e in st.entries] == [(6, 4)]
    # Entries written after the snapshot survive the stale ones written before it.
    s = RaftStorage(tmp_path)
    s.save(None, ents((7, 4)))
    s.close()
    st = RaftStorage(tmp_path).initial_state()
    assert [(e.index, e.term) for e in st.entries] == [(6, 4), (7, 4)]


def test_crash_between_snapshot_file_and_log_uses_the_snapshot(tmp_path: Path) -> None:
    s = RaftStorage(tmp_path)
    s.save(HardState(1, 0, 4), ents(*[(i, 1) for i in range(1, 6)]))
    s._write_snapshot(Snapshot(SnapshotMeta(4, 1, ConfState(frozenset({1}))), b"four"))
    s.close()  # ... and the crash: the WAL was never rewritten
    st = RaftStorage(tmp_path).initial_state()
    assert st.snapshot.meta.index == 4 and [e.index for e in st.entries] == [5]


def test_a_node_restarts_from_disk_and_keeps_its_promises(tmp_path: Path) -> None:
    """Vote and log survive a restart: the node does not vote twice in a term."""
    s = RaftStorage(tmp_path / "n2")
    boot = bootstrap([1, 2, 3])
    s.save(boot.hard_state, list(boot.entries))
    r = Raft(Config(2, pre_vote=False), random.Random(0), s.initial_state())
    r.step(Message(MessageType.VOTE, 2, 1, term=2, index=3, log_term=1))
    rd = r.ready()
    s.save_ready(rd)
    r.advance(rd)
    s.close()
    again = Raft(
        Config(2, pre_vote=False), random.Random(1), RaftStorage(tmp_path / "n2").initial_state()
    )
    again.step(Message(MessageType.VOTE, 2, 3, term=2, index=3, log_term=1))
    rd = again.ready()
    assert [(m.type, m.to, m.reject) for m in rd.messages] == [(MessageType.VOTE_RESP, 3, True)]
