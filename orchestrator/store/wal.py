"""A write-ahead log: checksummed records, fsynced before anyone is told they are durable.

Record: u32 length of the payload, u32 CRC-32 of (index, payload), u64 index, payload.
Opening a log checks every record. An incomplete or bad *last* record is a write torn by a
crash and is cut off; a bad record with good ones after it is corruption, and opening refuses
with the file and offset, since silently dropping acknowledged writes is worse than stopping.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_HEAD = struct.Struct("<IIQ")
MAGIC = b"SHOALWAL1\n"


class WalCorrupt(RuntimeError):
    pass


@dataclass(frozen=True)
class Record:
    index: int
    data: bytes


def _crc(index: int, data: bytes) -> int:
    return zlib.crc32(data, zlib.crc32(struct.pack("<Q", index)))


def _scan(raw: bytes, path: Path) -> tuple[list[Record], int]:
    """The good records, and the offset where the good part of the file ends."""
    if not raw.startswith(MAGIC):
        if raw and not MAGIC.startswith(raw):
            raise WalCorrupt(f"{path}: not a Shoal write-ahead log (bad header)")
        return [], 0
    records: list[Record] = []
    off = len(MAGIC)
    while off < len(raw):
        if off + _HEAD.size > len(raw):
            break  # torn header at the tail
        length, crc, index = _HEAD.unpack_from(raw, off)
        end = off + _HEAD.size + length
        data = raw[off + _HEAD.size : end]
        if end > len(raw) or _crc(index, data) != crc:
            if _later_record_ok(raw, off + 1):
                raise WalCorrupt(
                    f"{path}: corrupt record at offset {off} with valid records after it; "
                    "refusing to start (restore this manager from a peer or a backup)"
                )
            break  # torn tail
        records.append(Record(index, data))
        off = end
    return records, off


def _later_record_ok(raw: bytes, start: int) -> bool:
    """Is there any checksummed record starting after `start`? (Distinguishes a torn tail.)"""
    for off in range(start, len(raw) - _HEAD.size):
        length, crc, index = _HEAD.unpack_from(raw, off)
        end = off + _HEAD.size + length
        if length and end <= len(raw) and _crc(index, raw[off + _HEAD.size : end]) == crc:
            return True
    return False


class Wal:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        raw = path.read_bytes() if path.exists() else b""
        self._records, good = _scan(raw, path)
        if good < len(raw) or not raw:
            with open(path, "r+b" if raw else "wb") as f:
                if not raw or good == 0:
                    f.write(MAGIC)
                    good = len(MAGIC)
                f.truncate(good)
                f.flush()
                os.fsync(f.fileno())
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
        buf = b"".join(
            [_HEAD.pack(len(r.data), _crc(r.index, r.data), r.index) + r.data for r in records]
        )
        fd = self._file.fileno()
        view = memoryview(buf)
        while view:  # a regular file takes it in one write but for a full disk or a signal
            view = view[os.write(fd, view) :]
        if sync:
            os.fdatasync(fd)

    def reset(self) -> None:
        """Empty the log (after a snapshot has made its records redundant)."""
        self._file.close()
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(MAGIC)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        tmp.replace(self.path)
        self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115

    def rewrite(self, records: list[Record]) -> None:
        """Atomically replace the whole log by `records` (compaction keeps only what is live).

        Written to a temporary file, fsynced, renamed over the log, and the directory fsynced:
        a crash leaves either the old log or the new one, never a mix.
        """
        self._file.close()
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(MAGIC)
            f.write(
                b"".join(
                    _HEAD.pack(len(r.data), _crc(r.index, r.data), r.index) + r.data
                    for r in records
                )
            )
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)
        fsync_dir(self.path.parent)
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
