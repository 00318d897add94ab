"""Encryption at rest of the Raft log and snapshot (orchestrator/raft/sealing.py, the WAL and
RaftStorage): round trips with and without autolock, nothing readable on disk, locked and
wrong-key refusals that change nothing, resealing, and tampering (altered, swapped, spliced
records; torn tails; snapshots). Real files, no mocks."""

from __future__ import annotations

import asyncio
import os
import re
import struct
import zlib
from pathlib import Path

import pytest

from orchestrator.raft import sealing
from orchestrator.raft.messages import ConfState, Entry, HardState, Snapshot, SnapshotMeta
from orchestrator.raft.node import RaftNode
from orchestrator.raft.storage import RaftStorage, on_disk
from orchestrator.raft.transport import MemoryNetwork
from orchestrator.raft.wal import HEADER_BYTES, OLD_MAGIC, WalCorrupt
from orchestrator.store.objects import Service
from orchestrator.store.store import Store, Tx

MARKER = b"plaintext-marker-7f3a9c"
KEY = bytes(range(32))  # an unlock key's raw bytes (UnlockKey.key)
OTHER_KEY = bytes(range(1, 33))
_HEAD = struct.Struct("<IIQ")


def ents(first: int, last: int, term: int = 1) -> list[Entry]:
    return [Entry(term, i, MARKER + b" %04d" % i) for i in range(first, last + 1)]


def fill(d: Path, key: bytes | None = None, n: int = 6) -> None:
    s = RaftStorage(d, key)
    for i in range(1, n + 1):
        s.save(HardState(1, 1, i - 1), ents(i, i))
    s.close()


def files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def records(raw: bytes) -> list[tuple[int, int]]:
    """(offset, total size) of each record in a WAL file."""
    out, off = [], HEADER_BYTES
    while off < len(raw):
        length = _HEAD.unpack_from(raw, off)[0]
        out.append((off, _HEAD.size + length))
        off += _HEAD.size + length
    return out


def with_crc(rec: bytes) -> bytes:
    """A record whose CRC is made valid again (what a deliberate tamperer would do)."""
    length, _, index = _HEAD.unpack_from(rec)
    sealed = rec[_HEAD.size :]
    crc = zlib.crc32(sealed, zlib.crc32(struct.pack("<Q", index)))
    return _HEAD.pack(length, crc, index) + sealed


@pytest.mark.parametrize("key", [None, KEY], ids=["clear-dek", "autolock"])
def test_round_trip_and_nothing_readable_on_disk(tmp_path: Path, key: bytes | None) -> None:
    s = RaftStorage(tmp_path, key)
    s.save(HardState(1, 1, 3), ents(1, 8))
    snap = Snapshot(SnapshotMeta(5, 1, ConfState(frozenset({1}))), MARKER + b" in the snapshot")
    s.compact(snap)
    s.save(HardState(2, 1, 9), ents(9, 9, term=2))
    s.close()

    st = RaftStorage(tmp_path, key).initial_state()
    assert st.snapshot == snap
    assert [(e.index, e.term, e.data) for e in st.entries] == [
        (e.index, e.term, e.data) for e in [*ents(6, 8), *ents(9, 9, term=2)]
    ]
    assert st.hard_state == HardState(2, 1, 9)

    on_disk = files(tmp_path)
    assert set(on_disk) == {"raft.dek", "raft.wal", "snapshot"}
    for name, raw in on_disk.items():
        assert MARKER not in raw, name
    dek = sealing.load(tmp_path, key)
    assert (dek.raw in on_disk["raft.dek"]) is (key is None)  # sealed: the DEK is not in it
    assert (tmp_path / "raft.dek").stat().st_mode & 0o777 == 0o600
    assert sealing.is_locked(tmp_path) is (key is not None)


def test_a_clear_dek_opens_with_or_without_a_key(tmp_path: Path) -> None:
    fill(tmp_path)
    before = files(tmp_path)
    st = RaftStorage(tmp_path, KEY).initial_state()  # autolock on while this one was down
    assert len(st.entries) == 6
    assert files(tmp_path)["raft.dek"] == before["raft.dek"]  # not resealed by opening


def test_locked_without_a_key_and_wrong_key_change_nothing(tmp_path: Path) -> None:
    fill(tmp_path, KEY)
    before = files(tmp_path)
    with pytest.raises(sealing.Locked, match=r"this manager is locked.*shoal swarm unlock"):
        RaftStorage(tmp_path)
    assert files(tmp_path) == before
    with pytest.raises(sealing.WrongUnlockKey, match="the unlock key is wrong"):
        RaftStorage(tmp_path, OTHER_KEY)
    assert files(tmp_path) == before
    assert sealing.is_locked(tmp_path)
    assert len(RaftStorage(tmp_path, KEY).initial_state().entries) == 6


def test_reseal_to_a_new_key_and_to_none(tmp_path: Path) -> None:
    fill(tmp_path, KEY)
    s = RaftStorage(tmp_path, KEY)
    wal_before = (tmp_path / "raft.wal").read_bytes()
    s.reseal(OTHER_KEY)  # the old key is not needed: the DEK is in memory
    s.save(None, ents(7, 7))  # the log goes on under the same DEK
    s.close()
    assert (tmp_path / "raft.wal").read_bytes().startswith(wal_before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raft.dek", "raft.wal"]
    assert (tmp_path / "raft.dek").stat().st_mode & 0o777 == 0o600
    with pytest.raises(sealing.WrongUnlockKey):
        RaftStorage(tmp_path, KEY)
    s = RaftStorage(tmp_path, OTHER_KEY)
    assert [e.index for e in s.initial_state().entries] == list(range(1, 8))

    s.reseal(None)  # autolock turned off
    s.close()
    assert not sealing.is_locked(tmp_path)
    assert [e.index for e in RaftStorage(tmp_path).initial_state().entries] == list(range(1, 8))
    with pytest.raises(ValueError, match="32 raw bytes"):
        RaftStorage(tmp_path).reseal(b"SWMKEY-1-not-the-raw-bytes")
    assert not sealing.is_locked(tmp_path)


def test_a_damaged_or_missing_key_file_is_not_a_wrong_key(tmp_path: Path) -> None:
    fill(tmp_path, KEY)
    dek = tmp_path / "raft.dek"
    raw = bytearray(dek.read_bytes())
    raw[-10] ^= 0x01
    dek.write_bytes(bytes(raw))
    with pytest.raises(sealing.KeyFileError, match="damaged"):
        RaftStorage(tmp_path, KEY)
    dek.unlink()
    with pytest.raises(sealing.KeyFileError, match=r"raft.dek: missing, but .*raft.wal"):
        RaftStorage(tmp_path, KEY)
    assert not dek.exists()  # no new key over data it cannot read


def test_tampered_middle_record_is_refused_with_its_offset(tmp_path: Path) -> None:
    fill(tmp_path)
    wal = tmp_path / "raft.wal"
    raw = wal.read_bytes()
    off, size = records(raw)[3]
    rec = bytearray(raw[off : off + size])
    rec[-20] ^= 0x01  # in the ciphertext, CRC made good again
    wal.write_bytes(raw[:off] + with_crc(bytes(rec)) + raw[off + size :])
    with pytest.raises(WalCorrupt, match=rf"raft.wal: corrupt record at offset {off} \(it fails"):
        RaftStorage(tmp_path)


def test_swapped_dropped_or_spliced_records_are_refused(tmp_path: Path) -> None:
    fill(tmp_path)
    wal = tmp_path / "raft.wal"
    raw = wal.read_bytes()
    recs = records(raw)
    (a, na), (b, nb) = recs[2], recs[4]  # two entries (E, H alternate): same size
    assert na == nb
    swapped = raw[:a] + raw[b : b + nb] + raw[a + na : b] + raw[a : a + na] + raw[b + nb :]
    wal.write_bytes(swapped)
    with pytest.raises(WalCorrupt, match=rf"offset {a} \(it fails authentication"):
        RaftStorage(tmp_path)

    wal.write_bytes(raw[:a] + raw[a + na :])  # one record dropped from the middle
    with pytest.raises(WalCorrupt, match=rf"offset {a} \(it fails authentication"):
        RaftStorage(tmp_path)

    # The same records under another file's header (another salt: an older or newer version
    # of the log, after a compaction) do not open either.
    wal.write_bytes(raw)
    s = RaftStorage(tmp_path)
    s.compact(Snapshot(SnapshotMeta(2, 1, ConfState(frozenset({1}))), b""))
    s.close()
    new = wal.read_bytes()
    assert new[:HEADER_BYTES] != raw[:HEADER_BYTES]
    wal.write_bytes(new[:HEADER_BYTES] + raw[HEADER_BYTES:])
    with pytest.raises(WalCorrupt, match=rf"offset {HEADER_BYTES} \(it fails authentication"):
        RaftStorage(tmp_path)


def test_torn_or_unopenable_tail_is_cut(tmp_path: Path) -> None:
    fill(tmp_path)
    wal = tmp_path / "raft.wal"
    raw = wal.read_bytes()
    off, size = records(raw)[-1]  # the last hard state
    wal.write_bytes(raw[:-5])  # torn mid-record
    st = RaftStorage(tmp_path).initial_state()
    assert [e.index for e in st.entries] == list(range(1, 7))
    assert st.hard_state == HardState(1, 1, 4)  # the previous hard state
    assert wal.read_bytes() == raw[:off]

    rec = bytearray(raw[off : off + size])
    rec[-1] ^= 0x01  # a last record that fails authentication counts as torn too
    wal.write_bytes(raw[:off] + with_crc(bytes(rec)))
    s = RaftStorage(tmp_path)
    assert s.initial_state().hard_state == HardState(1, 1, 4)
    assert wal.read_bytes() == raw[:off]
    s.save(HardState(1, 1, 5), [])  # appends at the cut, at the same position, and reads back
    s.close()
    assert RaftStorage(tmp_path).initial_state().hard_state == HardState(1, 1, 5)


def test_snapshot_is_encrypted_restored_and_authenticated(tmp_path: Path) -> None:
    fill(tmp_path, KEY)
    s = RaftStorage(tmp_path, KEY)
    snap = Snapshot(SnapshotMeta(4, 1, ConfState(frozenset({1, 2}))), MARKER * 100)
    s.compact(snap)
    s.close()
    path = tmp_path / "snapshot"
    raw = path.read_bytes()
    assert MARKER not in raw and b"conf_state" not in raw
    st = RaftStorage(tmp_path, KEY).initial_state()
    assert st.snapshot == snap and [e.index for e in st.entries] == [5, 6]
    bad = bytearray(raw)
    bad[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(bad))
    with pytest.raises(WalCorrupt, match=re.escape(f"{path}: snapshot fails authentication")):
        RaftStorage(tmp_path, KEY)


def test_unencrypted_data_of_an_older_version_is_refused(tmp_path: Path) -> None:
    old = OLD_MAGIC + _HEAD.pack(3, 0, 1) + b"abc"
    (tmp_path / "raft.wal").write_bytes(old)
    with pytest.raises(WalCorrupt, match=r"unencrypted .* older version of Shoal"):
        RaftStorage(tmp_path)
    assert files(tmp_path) == {"raft.wal": old}  # no key made for it
    sealing.create(tmp_path, None)  # and with a key file, the log itself is refused
    with pytest.raises(WalCorrupt, match=r"raft.wal: an unencrypted log .* older version"):
        RaftStorage(tmp_path)


def test_is_locked_without_a_key_file(tmp_path: Path) -> None:
    assert not sealing.is_locked(tmp_path / "nowhere")
    assert not sealing.is_locked(tmp_path)


def test_the_raft_node_takes_the_unlock_key_and_reseals(tmp_path: Path) -> None:
    def put(tx: Tx) -> None:
        tx.put(Service(id="svc", spec={"Name": MARKER.decode()}))

    async def opened(key: bytes | None) -> Store:
        lone = MemoryNetwork().transport(1)
        store = Store(RaftNode(1, "", on_disk(tmp_path, key), lone, bootstrap=True))
        await store.log.start()
        return store

    async def run() -> None:
        store = await opened(KEY)
        await store.update(put)
        await store.log.close()
        assert sealing.is_locked(tmp_path)
        with pytest.raises(sealing.Locked):
            await opened(None)
        store = await opened(KEY)
        assert store.get(Service, "svc") is not None
        assert isinstance(store.log, RaftNode)
        await store.log.reseal(None)
        await store.log.close()
        assert not sealing.is_locked(tmp_path)
        store = await opened(None)
        assert store.get(Service, "svc") is not None
        await store.log.close()

    asyncio.run(run())
    for name in os.listdir(tmp_path):
        assert MARKER not in (tmp_path / name).read_bytes(), name
