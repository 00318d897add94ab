"""Durable storage for a Raft node: its log and hard state in the WAL, plus one snapshot file.

`Storage` is what the driver (orchestrator/raft/node.py) needs of a node's storage, as
etcd-io/raft's Storage is what its Node needs: `RaftStorage` on disk for managers,
`MemoryStorage` in memory for tests and the simulator.

`RaftStorage(directory, unlock_key)` recovers what is on disk (`initial_state()`, to build the
`Raft` from) and then persists each Ready with `save(...)`: one WAL append, one fsync (none when
only the commit index moved). Compaction writes the snapshot file and rewrites the WAL with only
the entries after it.

Everything is encrypted at rest (AES-256-GCM) under the manager's data key (DEK), made on the
first start and kept in `raft.dek`, in the clear or, with autolock, sealed under the unlock key
(orchestrator.raft.sealing). Opening needs the key when the DEK is sealed (`sealing.Locked`,
`sealing.WrongUnlockKey`, before anything is written); `reseal` re-seals it under a new
unlock key, or stores it in the clear.

On disk, in `directory`:

- `raft.dek`: the data key (orchestrator.raft.sealing).
- `raft.wal`: orchestrator.raft.wal records (length, CRC, index, sealed payload), one per
    - entry ("E" + term + type + data; the record index is the entry's) — an entry at index i
      replaces any earlier-written entries from i on, so a conflicting suffix is cut simply by
      writing the new entries;
    - hard state ("H" + term + vote + commit; record index 0);
    - snapshot marker ("S" + term; record index = snapshot index): the log restarts after it.
- `snapshot`: magic, a random salt (naming the file's key, derived from the DEK), then sealed
  (nonce, AES-GCM with the header as associated data): u32 length of a JSON header (index,
  term, membership), the header, the application's data. Written to a temporary file,
  fsynced, renamed, directory fsynced.

Recovery reuses the WAL's rules: a torn last record is cut off; a corrupt record (or one that
fails authentication) with good ones after it stops the node with an error naming the file and
offset. A snapshot file that fails authentication is refused the same way.

Raft data written unencrypted by earlier versions is refused (WalCorrupt), not migrated.

`MemoryStorage` is the same contract in memory (for tests and the simulator).
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from orchestrator.raft import sealing
from orchestrator.raft.log import LogError
from orchestrator.raft.messages import (
    ConfState,
    Entry,
    EntryType,
    HardState,
    Ready,
    Snapshot,
    SnapshotMeta,
    StorageState,
)
from orchestrator.raft.sealing import DataKey
from orchestrator.raft.wal import OLD_MAGIC as OLD_WAL_MAGIC
from orchestrator.raft.wal import Record, Wal, WalCorrupt, fsync_dir

WAL_FILE = "raft.wal"
SNAP_FILE = "snapshot"
_ENTRY = struct.Struct("<QB")  # term, type
_HARD = struct.Struct("<QQQ")  # term, vote, commit
_SNAPMARK = struct.Struct("<Q")  # term
SNAP_MAGIC = b"SHOALSNAP2\n"
OLD_SNAP_MAGIC = b"SHOALSNAP1\n"  # unencrypted, before at-rest encryption
_SNAP_HEADER = len(SNAP_MAGIC) + sealing.SALT_BYTES
_TYPES = [EntryType.NORMAL, EntryType.CONF_CHANGE]


class StorageError(LogError):
    """The driver handed storage entries that do not follow its log: a Raft invariant broken."""


class Storage(Protocol):
    """A Raft node's durable state, as the driver uses it.

    `initial_state()` once, to build the core from; then `save`/`save_ready` for each Ready
    (returning once it is durable), `compact` for each snapshot the application makes.
    """

    def initial_state(self) -> StorageState: ...

    def save(
        self,
        hard_state: HardState | None,
        entries: list[Entry],
        snapshot: Snapshot | None = None,
    ) -> None: ...

    def save_ready(self, rd: Ready) -> None: ...

    def must_sync(
        self, hard_state: HardState | None, entries: list[Entry], snapshot: Snapshot | None
    ) -> bool:
        """Would saving this wait for a disk? (If not, the driver saves on its event loop.)"""
        ...

    def compact(self, snapshot: Snapshot) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class Resealable(Protocol):
    """Storage encrypted under a data key that can be sealed under an unlock key."""

    def reseal(self, unlock_key: bytes | None) -> None: ...


@dataclass
class _Durable:
    """The log as the storage holds it: the snapshot, the entries after it, the hard state."""

    snapshot: Snapshot = field(default_factory=Snapshot)
    offset: int = 0  # index just before entries[0]
    entries: list[Entry] = field(default_factory=list)
    hard_state: HardState = field(default_factory=HardState)

    def put_entries(self, entries: list[Entry]) -> None:
        if not entries:
            return
        first = entries[0].index
        last = self.offset + len(self.entries)
        if first > last + 1 or first <= self.offset:
            raise StorageError(
                f"entries from {first} do not follow the log ({self.offset}, {last}]"
            )
        del self.entries[first - self.offset - 1 :]
        self.entries.extend(entries)

    def restart_at(self, index: int) -> None:
        self.offset = index
        self.entries = []

    def install(self, snap: Snapshot) -> None:
        """Adopt `snap`: keep our entries after it only if our log agrees with it there."""
        i = snap.meta.index
        last = self.offset + len(self.entries)
        if self.offset < i <= last and self.entries[i - self.offset - 1].term == snap.meta.term:
            del self.entries[: i - self.offset]
            self.offset = i
        elif i != self.offset:
            self.restart_at(i)
        self.snapshot = snap
        hs = self.hard_state
        self.hard_state = HardState(hs.term, hs.vote, max(hs.commit, i))

    def state(self) -> StorageState:
        return StorageState(self.hard_state, self.snapshot, tuple(self.entries))


class MemoryStorage:
    """In-memory storage with the same contract as RaftStorage (nothing survives the process)."""

    def __init__(self, initial: StorageState | None = None):
        initial = initial if initial is not None else StorageState()
        self._d = _Durable(
            initial.snapshot,
            initial.snapshot.meta.index,
            list(initial.entries),
            initial.hard_state,
        )

    def initial_state(self) -> StorageState:
        return self._d.state()

    def save(
        self,
        hard_state: HardState | None,
        entries: list[Entry],
        snapshot: Snapshot | None = None,
    ) -> None:
        if snapshot is not None:
            self._d.restart_at(snapshot.meta.index)
            self._d.install(snapshot)
        self._d.put_entries(entries)
        if hard_state is not None:
            self._d.hard_state = hard_state

    def save_ready(self, rd: Ready) -> None:
        self.save(rd.hard_state, rd.entries, rd.snapshot)

    def must_sync(
        self, hard_state: HardState | None, entries: list[Entry], snapshot: Snapshot | None
    ) -> bool:
        return False  # no disk to wait for

    def compact(self, snapshot: Snapshot) -> None:
        self._d.install(snapshot)

    def last_index(self) -> int:
        return self._d.offset + len(self._d.entries)

    def close(self) -> None:
        pass


def _encode_snapshot(snap: Snapshot, key: DataKey) -> bytes:
    head = json.dumps(
        {
            "index": snap.meta.index,
            "term": snap.meta.term,
            "conf_state": snap.meta.conf_state.to_json(),
        },
        sort_keys=True,
    ).encode()
    body = struct.pack("<I", len(head)) + head + snap.data
    salt = os.urandom(sealing.SALT_BYTES)
    header = SNAP_MAGIC + salt
    return header + key.file_cipher(salt).encrypt(body, header)


def _decode_snapshot(raw: bytes, path: Path, key: DataKey) -> Snapshot:
    if raw.startswith(OLD_SNAP_MAGIC):
        raise WalCorrupt(_old_format(path))
    if not raw.startswith(SNAP_MAGIC) or len(raw) < _SNAP_HEADER:
        raise WalCorrupt(f"{path}: not a Shoal snapshot (bad header at offset 0)")
    header = raw[:_SNAP_HEADER]
    body = key.file_cipher(header[len(SNAP_MAGIC) :]).decrypt(raw[_SNAP_HEADER:], header)
    if body is None:
        raise WalCorrupt(
            f"{path}: snapshot fails authentication (body at offset {_SNAP_HEADER}: damaged, "
            "altered, or not sealed by this manager); refusing to start"
        )
    (hlen,) = struct.unpack_from("<I", body)
    head = json.loads(body[4 : 4 + hlen])
    meta = SnapshotMeta(head["index"], head["term"], ConfState.from_json(head["conf_state"]))
    return Snapshot(meta, bytes(body[4 + hlen :]))


def _old_format(path: Path) -> str:
    return (
        f"{path}: unencrypted Raft data written by an older version of Shoal, which this "
        "version does not read; refusing to start (move the Raft directory aside and join "
        "this manager again, its peers have the data)"
    )


def _data_key(directory: Path, unlock_key: bytes | None) -> DataKey:
    """The DEK of this directory, made on a first start. The key file is written before any
    Raft data, so data without it is an older version's or has lost its key."""
    if sealing.key_path(directory).exists():
        return sealing.load(directory, unlock_key)
    for path, old in (
        (directory / WAL_FILE, OLD_WAL_MAGIC),
        (directory / SNAP_FILE, OLD_SNAP_MAGIC),
    ):
        if path.exists():
            with open(path, "rb") as f:
                if f.read(len(old)) == old:
                    raise WalCorrupt(_old_format(path))
            raise sealing.KeyFileError(
                f"{sealing.key_path(directory)}: missing, but {path} holds Raft data encrypted "
                "under it; restore the key file from a backup, or move the Raft directory "
                "aside and join this manager again"
            )
    return sealing.create(directory, unlock_key)


class RaftStorage:
    """A node's Raft state on disk (see the module docstring for the layout)."""

    def __init__(self, directory: Path, unlock_key: bytes | None = None):
        """`unlock_key`: the 32 raw bytes of the unlock key (`UnlockKey.key`), needed if the
        data key is sealed (autolock), and used to seal it if this is the first start.
        Raises sealing.Locked or sealing.WrongUnlockKey, having written nothing, if the data
        key is sealed and the key is missing or wrong."""
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._key = _data_key(directory, unlock_key)
        self._reseal_lock = threading.Lock()
        self._snap_path = directory / SNAP_FILE
        d = _Durable()
        if self._snap_path.exists():
            snap = _decode_snapshot(self._snap_path.read_bytes(), self._snap_path, self._key)
        else:
            snap = Snapshot()
        self._wal = Wal(directory / WAL_FILE, self._key.file_cipher)
        for rec in self._wal.records():
            kind, body = rec.data[:1], rec.data[1:]
            if kind == b"E":
                term, t = _ENTRY.unpack_from(body)
                e = Entry(term, rec.index, bytes(body[_ENTRY.size :]), _TYPES[t])
                try:
                    d.put_entries([e])
                except StorageError as exc:
                    raise WalCorrupt(f"{self._wal.path}: {exc}") from exc
            elif kind == b"H":
                d.hard_state = HardState(*_HARD.unpack(body))
            elif kind == b"S":
                d.restart_at(rec.index)
            else:
                raise WalCorrupt(f"{self._wal.path}: unknown record kind {kind!r}")
        if snap.meta.index < d.offset:
            raise WalCorrupt(
                f"{self._snap_path}: snapshot at {snap.meta.index} is older than the log, "
                f"which starts after {d.offset}"
            )
        # The snapshot file is written before the marker: a crash in between leaves a newer
        # snapshot than the log says, and install() sorts that out.
        d.install(snap)
        self._d = d

    def initial_state(self) -> StorageState:
        return self._d.state()

    def save(
        self,
        hard_state: HardState | None,
        entries: list[Entry],
        snapshot: Snapshot | None = None,
    ) -> None:
        """Persist a Ready's snapshot, entries and hard state; returns once durable.

        Except a change of the commit index alone, which is written but not synced (as etcd
        does): it can be learnt again from the leader, and an fsync per commit would double
        the syncs of every write. It becomes durable with the next synced save.
        """
        sync = self.must_sync(hard_state, entries, snapshot)
        records: list[Record] = []
        if snapshot is not None:
            self._write_snapshot(snapshot)
            records.append(Record(snapshot.meta.index, b"S" + _SNAPMARK.pack(snapshot.meta.term)))
            self._d.restart_at(snapshot.meta.index)
            self._d.install(snapshot)
        self._d.put_entries(entries)
        records += [
            Record(e.index, b"E" + _ENTRY.pack(e.term, _TYPES.index(e.type)) + e.data)
            for e in entries
        ]
        if hard_state is not None:
            self._d.hard_state = hard_state
            hs = hard_state
            records.append(Record(0, b"H" + _HARD.pack(hs.term, hs.vote, hs.commit)))
        if records:
            self._wal.append(records, sync=sync)

    def save_ready(self, rd: Ready) -> None:
        self.save(rd.hard_state, rd.entries, rd.snapshot)

    def must_sync(
        self, hard_state: HardState | None, entries: list[Entry], snapshot: Snapshot | None
    ) -> bool:
        """Would saving this wait for the disk? (Not for a new commit index alone: a driver
        may then save from its event loop rather than hand a tiny write to a thread.)"""
        prev = self._d.hard_state
        return (
            snapshot is not None
            or bool(entries)
            or (
                hard_state is not None
                and (hard_state.term, hard_state.vote) != (prev.term, prev.vote)
            )
        )

    def compact(self, snapshot: Snapshot) -> None:
        """The application made `snapshot` (from Raft.compact): store it, shrink the WAL."""
        if snapshot.meta.index <= self._d.snapshot.meta.index:
            return
        self._write_snapshot(snapshot)
        self._d.install(snapshot)
        d = self._d
        records = [Record(d.offset, b"S" + _SNAPMARK.pack(snapshot.meta.term))]
        records += [
            Record(e.index, b"E" + _ENTRY.pack(e.term, _TYPES.index(e.type)) + e.data)
            for e in d.entries
        ]
        hs = d.hard_state
        records.append(Record(0, b"H" + _HARD.pack(hs.term, hs.vote, hs.commit)))
        self._wal.rewrite(records)

    def _write_snapshot(self, snap: Snapshot) -> None:
        tmp = self._snap_path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(_encode_snapshot(snap, self._key))
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self._snap_path)
        fsync_dir(self.dir)

    def reseal(self, unlock_key: bytes | None) -> None:
        """Seal the data key under `unlock_key` (32 raw bytes), or store it in the clear for
        None: an unlock key rotation, or autolock turned on or off. Only the key file is
        replaced (atomically); the old unlock key is not needed. Safe from any thread."""
        with self._reseal_lock:
            sealing.write_key(self.dir, self._key, unlock_key)

    def close(self) -> None:
        self._wal.close()


def on_disk(directory: Path, unlock_key: bytes | None = None) -> Callable[[], RaftStorage]:
    """What opens a manager's storage in `directory` (the driver opens it in `start`, off its
    event loop; opening raises sealing.Locked or WrongUnlockKey, see RaftStorage)."""
    return lambda: RaftStorage(directory, unlock_key)
