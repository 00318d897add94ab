"""The replicated log the store is written through.

Every change to the cluster store is an entry proposed to a ReplicatedLog; once the log has
made it durable (and, with Raft, replicated to a quorum) it is applied to every manager's store
in log order, and the proposer gets the result of applying it. Callers never write the store
directly, so swapping the one-member LocalLog for Raft (issue #4) changes no caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.store.wal import Record, Wal

# apply(index, entry) -> result; snapshot() -> state; restore(index, state)
ApplyFn = Callable[[int, bytes], Any]


class NotLeader(RuntimeError):
    """This manager cannot accept writes (not the leader, or no quorum)."""


class ReplicatedLog(ABC):
    def __init__(self) -> None:
        self._apply: ApplyFn | None = None
        self._snapshot: Callable[[], Any] | None = None
        self._restore: Callable[[int, Any], None] | None = None

    def bind(
        self, apply: ApplyFn, snapshot: Callable[[], Any], restore: Callable[[int, Any], None]
    ) -> None:
        self._apply, self._snapshot, self._restore = apply, snapshot, restore

    @abstractmethod
    async def start(self) -> None:
        """Recover what is durable and replay it into the store."""

    @abstractmethod
    async def propose(self, entry: bytes) -> Any:
        """Commit an entry; returns what applying it returned. Raises NotLeader."""

    @property
    @abstractmethod
    def is_leader(self) -> bool: ...

    @property
    @abstractmethod
    def term(self) -> int:
        """Leadership epoch: leader-only work checks it has not changed under it."""

    @abstractmethod
    async def close(self) -> None: ...


class LocalLog(ReplicatedLog):
    """A log with one member, durable on disk: a snapshot file plus a write-ahead log.

    Proposals arriving together are written with one fsync (group commit).
    """

    def __init__(self, directory: Path, snapshot_every: int = 10_000):
        super().__init__()
        self.dir = directory
        self.snapshot_every = snapshot_every
        self._wal: Wal | None = None
        self._index = 0
        self._since_snapshot = 0
        self._queue: list[tuple[bytes, asyncio.Future[Any]]] = []
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None

    @property
    def is_leader(self) -> bool:
        return True

    @property
    def term(self) -> int:
        return 1

    @property
    def last_index(self) -> int:
        return self._index

    async def start(self) -> None:
        assert self._apply and self._restore
        self.dir.mkdir(parents=True, exist_ok=True)
        snap = self.dir / "snapshot.json"
        if snap.exists():
            doc = json.loads(snap.read_text())
            self._restore(doc["index"], doc["state"])
            self._index = doc["index"]
        self._wal = Wal(self.dir / "wal")
        for rec in self._wal.records():
            if rec.index <= self._index:
                continue  # already in the snapshot
            self._index = rec.index
            self._apply(rec.index, rec.data)
            self._since_snapshot += 1
        self._writer = asyncio.create_task(self._write_loop())

    async def propose(self, entry: bytes) -> Any:
        if self._writer is None:
            raise NotLeader("the store is not open")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((entry, fut))
        self._wake.set()
        return await fut

    async def _write_loop(self) -> None:
        assert self._wal and self._apply
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._queue = self._queue, []
            if not batch:
                continue
            records = []
            for entry, _ in batch:
                self._index += 1
                records.append(Record(self._index, entry))
            try:
                await asyncio.to_thread(self._wal.append, records)
            except OSError as e:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(NotLeader(f"cannot write the store's log: {e}"))
                continue
            for rec, (_, fut) in zip(records, batch, strict=True):
                try:
                    result = self._apply(rec.index, rec.data)
                except Exception as e:  # the proposer gets the failure
                    if not fut.done():
                        fut.set_exception(e)
                    continue
                if not fut.done():
                    fut.set_result(result)
            self._since_snapshot += len(records)
            if self._since_snapshot >= self.snapshot_every:
                await asyncio.to_thread(self._take_snapshot)

    def _take_snapshot(self) -> None:
        assert self._snapshot and self._wal
        doc = json.dumps({"index": self._index, "state": self._snapshot()})
        tmp = self.dir / "snapshot.tmp"
        with open(tmp, "w") as f:
            f.write(doc)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.dir / "snapshot.json")
        self._wal.reset()
        self._since_snapshot = 0

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None
        if self._wal is not None:
            self._wal.close()
            self._wal = None
