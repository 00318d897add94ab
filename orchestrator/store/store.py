"""The cluster store: typed objects in memory, written only through the replicated log.

A write is a transaction: a function reads what it needs through a Tx and stages puts and
deletes; the Tx becomes a log entry carrying the versions it read. Applying an entry checks
those versions first, so a transaction computed on stale data is refused (a conflict) rather
than applied, and `update` runs the function again on fresh data. Applying is deterministic:
timestamps travel in the entry, and Version.Index is the entry's log index.

Readers see the in-memory state directly and can watch for changes.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Histogram

from orchestrator.store.ids import now_rfc3339
from orchestrator.store.log import ReplicatedLog
from orchestrator.store.objects import KINDS, Meta, Object, decode, encode

log = logging.getLogger("shoal.store")

MAX_RETRIES = 20


class Stored(Protocol):
    """What the store keeps: objects of a kind, by ID, with the version of their last write."""

    KIND: ClassVar[str]
    id: str
    meta: Meta


T = TypeVar("T", bound=Stored)  # a kind of object
R = TypeVar("R")  # what a transaction returns


class Conflict(RuntimeError):
    """An object changed between reading it and writing it."""


@dataclass(frozen=True)
class Event:
    kind: str
    action: str  # create | update | delete
    obj: Object
    old: Object | None
    index: int


class Tx:
    """Reads and staged writes of one transaction."""

    def __init__(self, store: Store):
        self._store = store
        self._reads: dict[tuple[str, str], int] = {}
        self._writes: dict[tuple[str, str], Object | None] = {}

    def get(self, cls: type[T], obj_id: str) -> T | None:
        key = (cls.KIND, obj_id)
        if key in self._writes:
            staged = self._writes[key]
            # always true (the key holds the kind); it tells the type checker so
            if staged is None or isinstance(staged, cls):
                return staged
        obj = self._store.get(cls, obj_id)
        self._reads[key] = obj.meta.version if obj is not None else 0
        return obj

    def list(self, cls: type[T]) -> list[T]:
        """Every object of a kind (staged writes included). Not tracked as a read."""
        kind = cls.KIND
        out: dict[str, Any] = dict(self._store._objects[kind])
        for (k, obj_id), obj in self._writes.items():
            if k == kind:
                if obj is None:
                    out.pop(obj_id, None)
                else:
                    out[obj_id] = obj
        return list(out.values())

    def put(self, obj: Object) -> None:
        key = (obj.KIND, obj.id)
        if key not in self._reads and key not in self._writes:
            current = self._store.get(KINDS[obj.KIND], obj.id)
            # A blind write: it must not overwrite a newer version than the one it copied.
            self._reads[key] = obj.meta.version if current is not None else 0
        self._writes[key] = obj

    def delete(self, cls: type[Stored], obj_id: str) -> None:
        key = (cls.KIND, obj_id)
        if key not in self._reads and key not in self._writes:
            current = self._store.get(cls, obj_id)
            self._reads[key] = current.meta.version if current is not None else 0
        self._writes[key] = None

    @property
    def empty(self) -> bool:
        return not self._writes

    def entry(self) -> bytes:
        return json.dumps(
            {
                "time": now_rfc3339(),
                "reads": [[k, i, v] for (k, i), v in self._reads.items()],
                "writes": [
                    [k, i, encode(o) if o is not None else None]
                    for (k, i), o in self._writes.items()
                ],
            },
            separators=(",", ":"),
        ).encode()


class Store:
    def __init__(self, replicated_log: ReplicatedLog, registry: CollectorRegistry | None = None):
        """`registry`: where its metrics go (default: a registry of its own)."""
        self.log = replicated_log
        # swarmkit's name: a write transaction from its start to its entry committed
        self.write_latency = Histogram(
            "swarm_store_write_tx_latency_seconds",
            "Raft store write tx latency: a transaction's function and its proposal, "
            "retries included.",
            registry=registry if registry is not None else CollectorRegistry(),
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self._objects: dict[str, dict[str, Any]] = {k: {} for k in KINDS}
        self._watchers: set[asyncio.Queue[Event]] = set()
        self.index = 0
        replicated_log.bind(self._apply, self._snapshot, self._restore)

    # ---- reads --------------------------------------------------------------------------

    def get(self, cls: type[T], obj_id: str) -> T | None:
        obj: T | None = self._objects[cls.KIND].get(obj_id)
        return obj

    def list(self, cls: type[T]) -> list[T]:
        return list(self._objects[cls.KIND].values())

    def find(self, cls: type[T], pred: Callable[[T], bool]) -> Iterator[T]:
        return (o for o in self._objects[cls.KIND].values() if pred(o))

    # ---- writes -------------------------------------------------------------------------

    async def update(self, fn: Callable[[Tx], R], term: int | None = None) -> R:
        """Run fn in a transaction and commit it; fn is re-run on conflicts.

        fn must only read through the Tx and stage writes; whatever it returns is returned
        once the writes are committed. Raises the exception fn raises (nothing is written),
        NotLeader when the log refuses, or Conflict after many retries. `term`: write only as
        the leader of that term (leader-only loops pass the term they started in).
        """
        with self.write_latency.time():
            return await self._update(fn, term)

    async def _update(self, fn: Callable[[Tx], R], term: int | None) -> R:
        for attempt in range(MAX_RETRIES):
            tx = Tx(self)
            result = fn(tx)
            if tx.empty:
                return result
            outcome = await self.log.propose(tx.entry(), term)
            if outcome == "ok":
                return result
            # writers that collided spread out, so one of them wins each round
            await asyncio.sleep(random.uniform(0, 0.002 * 2 ** min(attempt, 6)))
        raise Conflict("too many concurrent changes; try again")

    def _apply(self, index: int, data: bytes) -> str:
        entry = json.loads(data)
        self.index = index
        for kind, obj_id, version in entry["reads"]:
            current = self._objects[kind].get(obj_id)
            if (current.meta.version if current is not None else 0) != version:
                return "conflict"
        events: list[Event] = []
        for kind, obj_id, raw in entry["writes"]:
            old = self._objects[kind].get(obj_id)
            if raw is None:
                if old is not None:
                    del self._objects[kind][obj_id]
                    events.append(Event(kind, "delete", old, old, index))
                continue
            obj = decode(raw)
            created = old.meta.created_at if old is not None else entry["time"]
            obj = replace(
                obj, meta=Meta(version=index, created_at=created, updated_at=entry["time"])
            )
            self._objects[kind][obj_id] = obj
            events.append(Event(kind, "update" if old is not None else "create", obj, old, index))
        for q in self._watchers:
            for e in events:
                q.put_nowait(e)
        return "ok"

    def _snapshot(self) -> dict[str, builtins.list[dict[str, Any]]]:
        return {kind: [encode(o) for o in objs.values()] for kind, objs in self._objects.items()}

    def _restore(self, index: int, state: dict[str, builtins.list[dict[str, Any]]]) -> None:
        self._objects = {k: {} for k in KINDS}
        for kind, objs in state.items():
            for raw in objs:
                obj = decode(raw)
                self._objects[kind][obj.id] = obj
        self.index = index

    # ---- watching -----------------------------------------------------------------------

    def watch(self) -> asyncio.Queue[Event]:
        """A queue receiving every change from now on; release it with unwatch()."""
        q: asyncio.Queue[Event] = asyncio.Queue()
        self._watchers.add(q)
        return q

    def unwatch(self, q: asyncio.Queue[Event]) -> None:
        self._watchers.discard(q)
