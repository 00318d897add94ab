"""A write-ahead log: encrypted, checksummed records, fsynced before anyone is told they are
durable.

File: MAGIC, a random 16-byte salt, then the records. The salt names the file's own key: the
log is given `cipher`, a function from a salt to a `RecordCipher` (for the Raft log,
orchestrator.raft.sealing.DataKey.file_cipher), and draws a new salt whenever it starts a file.

Record: u32 length of the sealed payload, u32 CRC-32 of (index, sealed payload), u64 index,
sealed payload. The cipher seals each payload bound to the record's ordinal (its position in
the file, 0 for the first) and its index, so a record cannot be altered, moved, swapped or
dropped from the middle without failing to open.

Opening a log checks every record. An incomplete, bad or unopenable *last* record is a write
torn by a crash and is cut off; a bad or unopenable record with good ones after it is
corruption (or tampering), and opening refuses with the file and offset, since silently
dropping acknowledged writes is worse than stopping. The CRC tells damage from tampering, and
finds the records after a bad one.

Logs written in the clear by earlier versions (header OLD_MAGIC) are refused, not migrated.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

_HEAD = struct.Struct("<IIQ")
MAGIC = b"SHOALWAL2\n"
OLD_MAGIC = b"SHOALWAL1\n"  # unencrypted, before at-rest encryption
SALT_BYTES = 16
HEADER_BYTES = len(MAGIC) + SALT_BYTES


class WalCorrupt(RuntimeError):
    pass


@dataclass(frozen=True)
class Record:
    index: int
    data: bytes


class RecordCipher(Protocol):
    """Seals record payloads for one file."""

    def seal(self, ordinal: int, index: int, data: bytes) -> bytes: ...

    def open(self, ordinal: int, index: int, data: bytes) -> bytes | None:
        """The payload, or None if `data` is not what `seal` made for this place."""
        ...


def _crc(index: int, data: bytes) -> int:
    return zlib.crc32(data, zlib.crc32(struct.pack("<Q", index)))


def _salt(raw: bytes, path: Path) -> bytes | None:
    """The file's salt; None for a file with nothing in it (empty, or a header torn by a crash
    while the file was made)."""
    if raw.startswith(MAGIC) and len(raw) >= HEADER_BYTES:
        return raw[len(MAGIC) : HEADER_BYTES]
    if raw.startswith(OLD_MAGIC):
        raise WalCorrupt(
            f"{path}: an unencrypted log written by an older version of Shoal, which this "
            "version does not read; refusing to start"
        )
    if len(raw) < HEADER_BYTES and MAGIC.startswith(raw[: len(MAGIC)]):
        return None
    raise WalCorrupt(f"{path}: not a Shoal write-ahead log (bad header)")


def _scan(raw: bytes, path: Path, cipher: RecordCipher) -> tuple[list[Record], int]:
    """The good records (payloads opened), and the offset where the good part of the file
    ends."""
    records: list[Record] = []
    off = HEADER_BYTES
    while off < len(raw):
        if off + _HEAD.size > len(raw):
            break  # torn header at the tail
        length, crc, index = _HEAD.unpack_from(raw, off)
        end = off + _HEAD.size + length
        sealed = raw[off + _HEAD.size : end]
        why = ""
        if end > len(raw) or _crc(index, sealed) != crc:
            data = None
        else:
            data = cipher.open(len(records), index, sealed)
            why = " (it fails authentication: altered, moved, or not sealed by this manager)"
        if data is None:
            if _later_record_ok(raw, off + 1):
                raise WalCorrupt(
                    f"{path}: corrupt record at offset {off}{why} with valid records after it; "
                    "refusing to start (restore this manager from a peer or a backup)"
                )
            break  # torn tail
        records.append(Record(index, data))
        off = end
    return records, off


def _encode(cipher: RecordCipher, records: list[Record], first: int) -> bytes:
    """The records as bytes on disk, the first at ordinal `first`."""
    parts = []
    for i, r in enumerate(records, first):
        data = cipher.seal(i, r.index, r.data)
        parts.append(_HEAD.pack(len(data), _crc(r.index, data), r.index) + data)
    return b"".join(parts)


def _later_record_ok(raw: bytes, start: int) -> bool:
    """Is there any checksummed record starting after `start`? (Distinguishes a torn tail.)"""
    for off in range(start, len(raw) - _HEAD.size):
        length, crc, index = _HEAD.unpack_from(raw, off)
        end = off + _HEAD.size + length
        if length and end <= len(raw) and _crc(index, raw[off + _HEAD.size : end]) == crc:
            return True
    return False


class Wal:
    def __init__(self, path: Path, cipher: Callable[[bytes], RecordCipher]):
        """`cipher(salt)`: the cipher of the file whose header holds `salt`."""
        self.path = path
        self._cipher_for = cipher
        path.parent.mkdir(parents=True, exist_ok=True)
        raw = path.read_bytes() if path.exists() else b""
        salt = _salt(raw, path)
        if salt is None:
            salt = os.urandom(SALT_BYTES)
            self._cipher = cipher(salt)
            self._records: list[Record] = []
            with open(path, "wb") as f:
                f.write(MAGIC + salt)
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(path.parent)
        else:
            self._cipher = cipher(salt)
            self._records, good = _scan(raw, path, self._cipher)
            if good < len(raw):
                with open(path, "r+b") as f:
                    f.truncate(good)
                    f.flush()
                    os.fsync(f.fileno())
        # the records in the file: the next one's ordinal
        self._count = len(self._records)
        # unbuffered: append() writes each batch with one write(2) of its own
        self._file = open(path, "ab", buffering=0)  # noqa: SIM115 - held open for the log's life

    def records(self) -> Iterator[Record]:
        """What the log held when it was opened (read once at start)."""
        yield from self._records
        self._records = []

    def append(self, records: list[Record], sync: bool = True) -> None:
        """Write, and with `sync` fdatasync: returns once the records (and any written before
        without sync) are durable. Without `sync` they reach the disk with the next synced
        append, or not at all if the machine crashes first: only for what may be lost (a new
        Raft commit index, which the leader tells again).

        One write(2) of the whole batch straight to the descriptor (the file object would
        copy it into its buffer first), then fdatasync: the file's size is flushed with the
        data, its timestamps are not worth a second journal write.
        """
        buf = _encode(self._cipher, records, self._count)
        fd = self._file.fileno()
        view = memoryview(buf)
        while view:  # a regular file takes it in one write but for a full disk or a signal
            view = view[os.write(fd, view) :]
        self._count += len(records)
        if sync:
            os.fdatasync(fd)

    def rewrite(self, records: list[Record]) -> None:
        """Atomically replace the whole log by `records` (compaction keeps only what is live),
        in a new file with a new salt, hence a new key.

        Written to a temporary file, fsynced, renamed over the log, and the directory fsynced:
        a crash leaves either the old log or the new one, never a mix.
        """
        salt = os.urandom(SALT_BYTES)
        cipher = self._cipher_for(salt)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(MAGIC + salt + _encode(cipher, records, 0))
            f.flush()
            os.fsync(f.fileno())
        self._file.close()
        tmp.replace(self.path)
        fsync_dir(self.path.parent)
        self._cipher = cipher
        self._count = len(records)
        self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115

    def close(self) -> None:
        self._file.close()


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
