"""The store, its transactions and its log (a one-member Raft group here): durability,
recovery, conflicts."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator.raft.node import RaftNode, RaftSettings
from orchestrator.raft.storage import on_disk
from orchestrator.raft.transport import MemoryNetwork
from orchestrator.raft.wal import WalCorrupt
from orchestrator.store.objects import Service, Task, TaskState
from orchestrator.store.store import Store, Tx


async def opened(path: Path, snapshot_every: int = 10_000) -> Store:
    settings = RaftSettings(snapshot_every=snapshot_every)
    lone = MemoryNetwork().transport(1)
    store = Store(RaftNode(1, "", on_disk(path), lone, settings, bootstrap=True))
    await store.log.start()
    return store


def create(name: str) -> Callable[[Tx], str]:
    def fn(tx: Tx) -> str:
        tx.put(Service(id=name, spec={"Name": name}))
        return name

    return fn


def test_writes_survive_a_restart_and_versions_are_log_indexes(tmp_path: Path) -> None:
    async def run() -> None:
        store = await opened(tmp_path)
        await store.update(create("a"))
        await store.update(create("b"))
        a = store.get(Service, "a")
        # index 1 is the membership, 2 the leader's first (empty) entry
        assert a is not None and a.meta.version == 3 and a.meta.created_at
        await store.update(lambda tx: tx.put(dataclasses.replace(a, spec={"Name": "a2"})))
        await store.log.close()
        again = await opened(tmp_path)
        a2 = again.get(Service, "a")
        assert a2 is not None and a2.spec == {"Name": "a2"} and a2.meta.version == 5
        assert a2.meta.created_at == a.meta.created_at
        assert {s.id for s in again.list(Service)} == {"a", "b"}
        await again.log.close()

    asyncio.run(run())


def test_a_transaction_on_stale_data_is_retried(tmp_path: Path) -> None:
    async def run() -> None:
        store = await opened(tmp_path)
        await store.update(lambda tx: tx.put(Task(id="t", state=TaskState.NEW)))
        calls = 0

        def bump(tx: Tx) -> None:
            nonlocal calls
            calls += 1
            t = tx.get(Task, "t")
            assert t is not None
            tx.put(dataclasses.replace(t, slot=t.slot + 1))

        await asyncio.gather(*(store.update(bump) for _ in range(10)))
        t = store.get(Task, "t")
        assert t is not None and t.slot == 10  # none lost
        assert calls >= 10
        await store.log.close()

    asyncio.run(run())


def test_watchers_see_changes(tmp_path: Path) -> None:
    async def run() -> None:
        store = await opened(tmp_path)
        q = store.watch()
        await store.update(create("a"))
        await store.update(lambda tx: tx.delete(Service, "a"))
        events = [q.get_nowait(), q.get_nowait()]
        assert [(e.kind, e.action, e.obj.id) for e in events] == [
            ("service", "create", "a"),
            ("service", "delete", "a"),
        ]
        await store.log.close()

    asyncio.run(run())


def test_a_torn_tail_is_cut_and_a_corrupt_middle_refused(tmp_path: Path) -> None:
    async def fill() -> None:
        store = await opened(tmp_path)
        for name in "abcd":
            await store.update(create(name))
        await store.log.close()

    asyncio.run(fill())
    wal = tmp_path / "raft.wal"
    raw = wal.read_bytes()
    wal.write_bytes(raw[:-7])  # a crash in the middle of the last write

    async def reopen() -> set[str]:
        store = await opened(tmp_path)
        ids = {s.id for s in store.list(Service)}
        await store.log.close()
        return ids

    # the torn record is cut off; "d" survives if its entry was whole (a lone member commits
    # what it has durably logged)
    assert {"a", "b", "c"} <= asyncio.run(reopen()) <= {"a", "b", "c", "d"}
    flipped = bytearray(wal.read_bytes())
    flipped[40] ^= 0xFF  # inside the first record
    wal.write_bytes(bytes(flipped))
    with pytest.raises(WalCorrupt, match=r"raft.wal: corrupt record at offset \d+"):
        asyncio.run(reopen())


def test_snapshots_compact_the_log(tmp_path: Path) -> None:
    async def run() -> None:
        store = await opened(tmp_path, snapshot_every=5)
        for i in range(12):
            await store.update(create(f"s{i}"))
        await store.log.close()
        assert (tmp_path / "snapshot").exists()
        assert (tmp_path / "raft.wal").stat().st_size < 4000
        again = await opened(tmp_path)
        assert len(again.list(Service)) == 12 and again.index == 14
        await again.log.close()

    asyncio.run(run())
