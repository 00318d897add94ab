"""The Raft node a manager runs: the driver of the sans-I/O core, and the store's replicated log.

`RaftNode` drives `orchestrator.raft.core.Raft` with what it is given, as etcd-io/raft's Node
is driven by its application: a `Storage` (orchestrator/raft/storage.py: the encrypted WAL on
disk, or memory in tests), a `Transport` (orchestrator/raft/transport.py: gRPC between
managers, or an in-memory network in tests) and a `Ticker` (a fixed cadence, or a test's
hand). It runs a tick task, steps messages from peers as they arrive, and one loop taking each
Ready: persist (one fsync, in a thread, while the core keeps taking messages and proposals,
so writes batch up), send, apply, advance.

Proposals carry a random 16-byte id before the store's entry. The proposer remembers which
index its entry got; when that index is applied it gets the apply result if the entry there is
its own, or NotLeader if another leader's entry took the place (the write did not happen).
A follower forwards the entry to the leader (`Transport.forward`), learns the index, and waits
for its own store to apply it, so a caller always reads its own writes. Writes fail with
NoQuorum after `propose_timeout` without a commit.

Linearizable reads: `read_barrier()` runs ReadIndex and waits until the store has applied up
to the leader's commit index at the time of the request.

Members' addresses ride in the context of the membership entries and in snapshots, so every
manager knows where every other is.

A broken Raft invariant (the core's LogError, say a message that would overwrite a committed
entry) or a storage that fails stops the node, as etcd's panic stops etcd: it steps and sends
nothing more, every waiting caller gets NotLeader, and `wait()` raises the error, so its owner
(the manager runtime) stops serving. A malformed frame from the network is only dropped, by the
transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from orchestrator.raft.core import Config, NotLeader, ProposalDropped, Raft
from orchestrator.raft.messages import (
    NONE,
    ConfChange,
    ConfChangeType,
    Entry,
    EntryType,
    HardState,
    Message,
    MessageType,
    Ready,
    Snapshot,
    StorageState,
)
from orchestrator.raft.metrics import RaftCollector, RaftMetrics, RaftView
from orchestrator.raft.progress import ProgressState
from orchestrator.raft.storage import Resealable, Storage
from orchestrator.raft.transport import Transport

log = logging.getLogger(__name__)

ID_LEN = 16
RECENT_RESULTS = 4096
# Messages only a leader sends, asserting nothing about what its unpersisted Ready holds.
_SEND_BEFORE_PERSIST = frozenset({MessageType.APP, MessageType.HEARTBEAT, MessageType.SNAP})


class NoQuorum(NotLeader):
    """The write (or read) could not be committed in time: no leader, or no quorum."""


@dataclass(frozen=True)
class RaftSettings:
    tick: float = 0.1  # seconds per tick
    election_tick: int = 10  # an election timeout is 1-2 s
    heartbeat_tick: int = 1
    snapshot_every: int = 10_000  # entries applied between snapshots
    keep_entries: int = 500  # entries kept behind a snapshot for slow followers
    propose_timeout: float = 5.0

    @property
    def leaderless_wait(self) -> float:
        """How long a request waits for a leader to be elected before giving up."""
        return 2 * self.election_tick * self.tick


class Ticker(Protocol):
    async def wait(self) -> None:
        """Return at the next tick."""


class IntervalTicker:
    """Ticks on a fixed cadence, as Go's time.Ticker does: sleeping a tick after each tick
    let the work in between stretch every tick (and so every election timeout) on a busy
    machine. Ticks missed while the loop was stalled are dropped, not fired in a burst that
    would look like an election timeout."""

    def __init__(self, interval: float):
        self.interval = interval
        self._next: float | None = None

    async def wait(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._next is None:
            self._next = now + self.interval
        else:
            self._next += self.interval
            if self._next <= now:
                self._next = now + self.interval
        await asyncio.sleep(self._next - now)


@dataclass
class _Pending:
    pid: bytes
    future: asyncio.Future[Any]


def member_context(addr: str) -> bytes:
    return json.dumps({"addr": addr}).encode()


def _context_addr(context: bytes) -> str:
    try:
        doc = json.loads(context)
        return str(doc["addr"]) if isinstance(doc, dict) else ""
    except (ValueError, KeyError):
        return ""


def describe_failure(error: BaseException) -> str:
    """How a stopped node's error reads in a log line and in the NotLeader callers get."""
    if isinstance(error, AssertionError):  # LogError, StorageError, the core's assertions
        return f"raft invariant broken: {error}"
    return f"raft stopped: {type(error).__name__}: {error}"


class RaftNode:
    def __init__(
        self,
        raft_id: int,
        addr: str,
        storage: Callable[[], Storage],
        transport: Transport,
        settings: RaftSettings | None = None,
        rng: random.Random | None = None,
        *,
        bootstrap: bool = False,
        known: dict[int, str] | None = None,
        ticker: Ticker | None = None,
        registry: CollectorRegistry | None = None,
    ):
        """`storage` opens the node's storage (`start` calls it in a thread: opening may read
        a disk, and raise, e.g. sealing.Locked; see storage.on_disk).
        `transport`: how it reaches its peers; this node attaches itself to it.
        `bootstrap`: this is the first manager of a new cluster (empty storage only).
        `known`: members' addresses to start with (a joining manager has no log yet to learn
        them from, and must be able to answer the leader).
        `ticker`: when to tick (default: every `settings.tick` seconds).
        `registry`: where its metrics go (raft/metrics.py; default: a registry of its own)."""
        self.id = raft_id
        self.addr = addr
        self.settings = settings or RaftSettings()
        self._rng = rng or random.Random()
        self._bootstrap = bootstrap
        self._open_storage = storage
        self.transport = transport
        self._ticker = ticker or IntervalTicker(self.settings.tick)
        self.members: dict[int, str] = {}
        self._known = dict(known or {})
        self.raft: Raft | None = None
        self._storage: Storage | None = None
        self._apply: Callable[[int, bytes], Any] | None = None
        self._snapshot: Callable[[], Any] | None = None
        self._restore: Callable[[int, Any], None] | None = None
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._pending: dict[int, _Pending] = {}
        self._recent: OrderedDict[int, tuple[bytes, Any, BaseException | None]] = OrderedDict()
        self._reads: dict[bytes, asyncio.Future[None]] = {}
        self._read_waits: list[tuple[int, asyncio.Future[None]]] = []
        self._applied_waits: list[tuple[int, asyncio.Future[None]]] = []
        self._applied = 0
        self._snapshot_index = 0
        self._leader_seen: tuple[bool, int] = (False, 0)
        self._lead_seen = NONE
        # resolved when this manager learns of a new leader; requests waiting for one retry
        self._lead_changed: asyncio.Future[None] | None = None
        self._leadership_listeners: list[Callable[[bool, int], None]] = []
        self._failure: BaseException | None = None
        self._stopped = asyncio.Event()
        registry = registry if registry is not None else CollectorRegistry()
        self.metrics = RaftMetrics.register(registry)
        registry.register(
            RaftCollector(
                RaftView(
                    term=lambda: self.term,
                    applied=lambda: self._applied,
                    voters=lambda: len(self.voters()),
                    learners=lambda: len(self.learners()),
                    has_leader=lambda: self.leader != NONE,
                )
            )
        )
        transport.attach(self)

    # ---- the store's ReplicatedLog (orchestrator/store/log.py) --------------------------

    def bind(
        self,
        apply: Callable[[int, bytes], Any],
        snapshot: Callable[[], Any],
        restore: Callable[[int, Any], None],
    ) -> None:
        """apply(index, entry) -> result; snapshot() -> state; restore(index, state)."""
        self._apply, self._snapshot, self._restore = apply, snapshot, restore

    @property
    def is_leader(self) -> bool:
        return self.raft is not None and self.raft.is_leader and self._failure is None

    @property
    def term(self) -> int:
        return self.raft.term if self.raft is not None else 0

    @property
    def leader(self) -> int:
        return self.raft.lead if self.raft is not None and self._failure is None else NONE

    @property
    def applied(self) -> int:
        return self._applied

    @property
    def failure(self) -> str | None:
        """Why the node stopped on its own (see describe_failure); None while it runs."""
        return describe_failure(self._failure) if self._failure is not None else None

    def on_leadership(self, fn: Callable[[bool, int], None]) -> None:
        """fn(is_leader, term) on every change of leadership as this manager sees it."""
        self._leadership_listeners.append(fn)

    async def start(self) -> None:
        assert self._apply and self._restore
        # raises sealing.Locked / WrongUnlockKey before anything is written
        storage = await asyncio.to_thread(self._open_storage)
        state = storage.initial_state()
        if self._bootstrap and _empty(state):
            cc = ConfChange(ConfChangeType.ADD_NODE, self.id, member_context(self.addr))
            entry = Entry(1, 1, cc.encode(), EntryType.CONF_CHANGE)
            hs = HardState(term=1, commit=1)
            await asyncio.to_thread(storage.save, hs, [entry])
            state = storage.initial_state()
        self._storage = storage
        if not state.snapshot.is_empty():
            self._install(state.snapshot)
        cfg = Config(
            id=self.id,
            election_tick=self.settings.election_tick,
            heartbeat_tick=self.settings.heartbeat_tick,
        )
        self.raft = Raft(cfg, self._rng, state)
        if self.raft.conf.voters == {self.id}:
            self.raft.campaign()  # alone: no one to wait for
        self._update_peers()
        self._tasks = [
            asyncio.create_task(self._guard(self._ready_loop()), name="raft-ready"),
            asyncio.create_task(self._guard(self._tick_loop()), name="raft-tick"),
        ]
        self._wake.set()
        # what was committed before a restart is in the store before anyone reads it
        recovered = state.hard_state.commit
        if recovered > self._applied:
            await self._wait_applied(recovered, asyncio.get_running_loop().time() + 60)

    async def propose(self, entry: bytes, term: int | None = None) -> Any:
        """Commit an entry; `term`: only as the leader of that term (leader-only loops)."""
        raft = self._running()
        if term is not None and (not raft.is_leader or raft.term != term):
            raise NotLeader(f"no longer the leader of term {term}")
        started = asyncio.get_running_loop().time()
        try:
            result = await self._propose(entry)
        except Exception:
            self.metrics.proposals.labels("failed").inc()
            raise
        self.metrics.proposals.labels("committed").inc()
        self.metrics.transaction_latency.observe(asyncio.get_running_loop().time() - started)
        return result

    async def _propose(self, entry: bytes) -> Any:
        pid = os.urandom(ID_LEN)
        data = pid + entry
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.propose_timeout
        # an election normally ends within two timeouts; past that, there is no quorum to find
        find_leader_by = loop.time() + self.settings.leaderless_wait
        while True:
            try:
                if self._running().is_leader:
                    index = self._propose_local(data)
                else:
                    index = await self._forward(data, deadline)
                break
            except (NotLeader, ProposalDropped) as e:
                if self._failure is not None:
                    raise self._stopped_error() from e
                if loop.time() >= min(deadline, find_leader_by) or isinstance(e, NoQuorum):
                    raise NoQuorum(
                        "the managers have no leader or no quorum: the write was not made"
                    ) from e
                await self._leader_change(self.settings.tick)
        return await self._wait_result(index, pid, deadline)

    async def read_barrier(self) -> None:
        """Return once this manager's store holds every write committed before the call."""
        self._running()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.propose_timeout
        find_leader_by = loop.time() + self.settings.leaderless_wait
        while True:
            raft = self._running()
            ctx = os.urandom(8)
            fut: asyncio.Future[None] = loop.create_future()
            self._reads[ctx] = fut
            try:
                raft.read_index(ctx)
                self._wake.set()
                await asyncio.wait_for(asyncio.shield(fut), min(1.0, deadline - loop.time()))
                return
            except NotLeader:
                if self._failure is not None:
                    raise
                if loop.time() >= min(deadline, find_leader_by):
                    raise NoQuorum(
                        "the managers have no leader or no quorum: cannot read the latest state"
                    ) from None
                await self._leader_change(self.settings.tick)
            except TimeoutError:
                if loop.time() >= deadline:
                    raise NoQuorum(
                        "the managers have no leader or no quorum: cannot read the latest state"
                    ) from None
                await asyncio.sleep(self.settings.tick)
            finally:
                self._reads.pop(ctx, None)

    async def reseal(self, unlock_key: bytes | None) -> None:
        """Seal this manager's Raft data key under `unlock_key` (32 raw bytes), or store it in
        the clear for None (unlock key rotated, autolock turned on or off). Only the key file
        changes; the old key is not needed."""
        if self._storage is None:
            raise RuntimeError("the Raft log is not open")
        if not isinstance(self._storage, Resealable):
            raise RuntimeError("this Raft storage has no data key to seal")
        await asyncio.to_thread(self._storage.reseal, unlock_key)

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
        await self.transport.close()
        for p in self._pending.values():
            if not p.future.done():
                p.future.set_exception(NotLeader("the manager is shutting down"))
        if self._storage is not None:
            self._storage.close()
            self._storage = None
        self._stopped.set()

    async def wait(self) -> None:
        """Until the node stops: returns once it was closed; raises the error that stopped it
        otherwise (a broken Raft invariant, a storage that failed)."""
        await self._stopped.wait()
        if self._failure is not None:
            raise self._failure

    # ---- membership ---------------------------------------------------------------------

    async def add_learner(self, raft_id: int, addr: str) -> None:
        await self._conf_change(
            ConfChange(ConfChangeType.ADD_LEARNER, raft_id, member_context(addr))
        )

    async def promote(self, raft_id: int) -> None:
        addr = self.members.get(raft_id, "")
        await self._conf_change(ConfChange(ConfChangeType.ADD_NODE, raft_id, member_context(addr)))

    async def remove(self, raft_id: int) -> None:
        await self._conf_change(ConfChange(ConfChangeType.REMOVE_NODE, raft_id))

    def caught_up(self, raft_id: int, slack: int = 50) -> bool:
        """Leader only: the member's log is within `slack` entries of the leader's."""
        if self.raft is None or not self.is_leader:
            return False
        pr = self.raft.prs.get(raft_id)
        # REPLICATE: the follower acknowledged appends in a row (not merely probed)
        return (
            pr is not None
            and pr.state is ProgressState.REPLICATE
            and pr.match + slack >= self.raft.log.last_index()
        )

    def reachable(self, raft_id: int) -> bool | None:
        """Leader only: the member answered within an election timeout (None: unknown here)."""
        if self.raft is None or not self.is_leader:
            return None
        if raft_id == self.id:
            return True
        pr = self.raft.prs.get(raft_id)
        return pr is not None and pr.inactive_ticks < self.settings.election_tick

    def voters(self) -> set[int]:
        return set(self.raft.conf.voters) if self.raft is not None else set()

    def learners(self) -> set[int]:
        return set(self.raft.conf.learners) if self.raft is not None else set()

    async def transfer_leadership(self, target: int) -> None:
        self._running().transfer_leadership(target)
        self._wake.set()

    async def _conf_change(self, cc: ConfChange) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.propose_timeout
        while True:
            try:
                index = self._running().propose_conf_change(cc)
                break
            except ProposalDropped:
                if loop.time() >= deadline:
                    raise
                await asyncio.sleep(self.settings.tick)
        self._wake.set()
        await self._wait_applied(index, deadline)

    # ---- what the transport delivers (orchestrator/raft/transport.py) --------------------

    def step(self, m: Message) -> None:
        """A message from a peer. Whatever the core raises here is a broken invariant: the
        node stops (a malformed frame never gets here: the transport drops it)."""
        if self.raft is None or self._failure is not None or m.to != self.id:
            return
        try:
            self.raft.step(m)
        except Exception as e:
            self._fail(e)
            return
        self._wake.set()

    def propose_forwarded(self, data: bytes) -> int:
        """A follower's proposal (id and entry): its index in this leader's log."""
        if self.raft is None or not self.is_leader:
            raise NotLeader("not the leader", self.leader)
        if len(data) < ID_LEN:
            raise ValueError("bad data")
        return self._propose_local(data)

    def report_unreachable(self, peer: int) -> None:
        if self.raft is not None and self._failure is None:
            self.raft.report_unreachable(peer)

    def report_snapshot(self, peer: int, ok: bool) -> None:
        if self.raft is not None and self._failure is None:
            self.raft.report_snapshot(peer, ok)

    # ---- internals ----------------------------------------------------------------------

    def _running(self) -> Raft:
        """The core, if the node runs; NotLeader otherwise."""
        if self._failure is not None:
            raise self._stopped_error()
        if self.raft is None:
            raise NotLeader("the store is not open")
        return self.raft

    def _stopped_error(self) -> NotLeader:
        return NotLeader(f"this manager stopped: {self.failure}")

    async def _guard(self, loop: Coroutine[Any, Any, None]) -> None:
        """Run one of the node's loops; an error out of it stops the node."""
        try:
            await loop
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._fail(e)

    def _fail(self, error: BaseException) -> None:
        """Stop on a broken invariant: nothing more is stepped, persisted or sent; waiters
        learn it; wait() raises it."""
        if self._failure is not None:
            return
        self._failure = error
        current = asyncio.current_task()
        for t in self._tasks:
            if t is not current:
                t.cancel()
        self._fail_waiters(self._stopped_error())
        self._stopped.set()

    def _fail_waiters(self, error: NotLeader) -> None:
        for p in self._pending.values():
            if not p.future.done():
                p.future.set_exception(error)
        self._pending = {}
        for waits in (self._read_waits, self._applied_waits):
            for _, fut in waits:
                if not fut.done():
                    fut.set_exception(error)
            waits.clear()
        for fut in self._reads.values():
            if not fut.done():
                fut.set_exception(error)

    def _propose_local(self, data: bytes) -> int:
        index = self._running().propose(data)
        self._wake.set()
        return index

    async def _forward(self, data: bytes, deadline: float) -> int:
        loop = asyncio.get_running_loop()
        lead = self.leader
        if lead == NONE or not self.members.get(lead):
            raise NotLeader("no leader known")
        return await self.transport.forward(lead, data, max(0.1, deadline - loop.time()))

    async def _wait_result(self, index: int, pid: bytes, deadline: float) -> Any:
        recent = self._recent.get(index)
        if recent is not None or index <= self._applied:
            if recent is None:
                raise NotLeader("the write's outcome is unknown: it was applied long ago")
            return self._outcome(index, pid, recent)
        self._running()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[index] = _Pending(pid, fut)
        try:
            remaining = deadline - asyncio.get_running_loop().time()
            return await asyncio.wait_for(asyncio.shield(fut), max(remaining, 0.01))
        except TimeoutError:
            raise NoQuorum(
                "the write was not committed in time: the managers may have lost their quorum; "
                "it may still be made once they recover"
            ) from None
        finally:
            if self._pending.get(index) is not None and self._pending[index].future is fut:
                del self._pending[index]

    @staticmethod
    def _outcome(index: int, pid: bytes, recent: tuple[bytes, Any, BaseException | None]) -> Any:
        applied_pid, result, error = recent
        if applied_pid != pid:
            raise NotLeader("leadership changed before the write committed: it was not made")
        if error is not None:
            raise error
        return result

    async def _wait_applied(self, index: int, deadline: float) -> None:
        if self._applied >= index:
            return
        self._running()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._applied_waits.append((index, fut))
        try:
            remaining = deadline - asyncio.get_running_loop().time()
            await asyncio.wait_for(asyncio.shield(fut), max(remaining, 0.01))
        except TimeoutError:
            raise NoQuorum("the change was not committed in time") from None

    async def _tick_loop(self) -> None:
        assert self.raft is not None
        while True:
            await self._ticker.wait()
            self.raft.tick()
            self._wake.set()

    async def _ready_loop(self) -> None:
        """Take each Ready; while its fsync runs in a thread, do what need not wait for it.

        - A leader's appends and heartbeats go out first (Raft thesis §10.2.1, as etcd does):
          they promise nothing about the leader's disk (the core counts the leader's own log
          toward a commit only after advance()), so followers write while the leader writes.
          Acks and votes, which do promise what this Ready persists, wait for the fsync.
        - Committed entries are applied meanwhile (as etcd's apply loop does): committed
          means already durable on a quorum, whether or not this manager's copy is yet.
          A snapshot to install is the exception: it is installed after it is persisted.
        """
        assert self.raft is not None and self._storage is not None
        raft, storage = self.raft, self._storage
        send = self.transport.send
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while raft.has_ready():
                rd = raft.ready()
                persist = None
                if storage.must_sync(rd.hard_state, rd.entries, rd.snapshot):
                    persist = loop.run_in_executor(None, storage.save_ready, rd)
                else:
                    storage.save_ready(rd)  # nothing to wait for (the commit index alone)
                late = []
                for m in rd.messages:
                    if m.type in _SEND_BEFORE_PERSIST:
                        send(m)
                    else:
                        late.append(m)
                if rd.snapshot is None:
                    self._apply_committed(rd)
                if persist is not None:
                    await persist
                if rd.snapshot is not None:
                    self._install(rd.snapshot)
                    self._apply_committed(rd)
                for m in late:
                    send(m)
                self._serve_reads(rd)
                raft.advance(rd)
                self._notify_leadership()
            await self._maybe_snapshot()

    def _apply_committed(self, rd: Ready) -> None:
        for e in rd.committed_entries:
            self._apply_entry(e)

    def _serve_reads(self, rd: Ready) -> None:
        for rs in rd.read_states:
            fut = self._reads.get(rs.context)
            if fut is None or fut.done():
                continue
            if rs.index <= self._applied:
                fut.set_result(None)
            else:
                self._read_waits.append((rs.index, fut))
        self._release_waits()

    def _apply_entry(self, e: Entry) -> None:
        self._applied = e.index
        if e.type is EntryType.CONF_CHANGE:
            cc = ConfChange.decode(e.data)
            if cc.type is ConfChangeType.REMOVE_NODE:
                self.members.pop(cc.node_id, None)
            else:
                addr = _context_addr(cc.context) or self.members.get(cc.node_id, "")
                self.members[cc.node_id] = addr
            self._update_peers()
            return
        if len(e.data) < ID_LEN:  # a new leader's empty entry
            self._resolve(e.index, b"", None, None)
            return
        assert self._apply is not None
        pid, payload = e.data[:ID_LEN], e.data[ID_LEN:]
        try:
            result, error = self._apply(e.index, payload), None
        except Exception as exc:  # deterministic: every manager fails the same entry alike
            log.warning("entry %d could not be applied: %s", e.index, exc)
            result, error = None, exc
        self._resolve(e.index, pid, result, error)

    def _resolve(self, index: int, pid: bytes, result: Any, error: BaseException | None) -> None:
        self._recent[index] = (pid, result, error)
        while len(self._recent) > RECENT_RESULTS:
            self._recent.popitem(last=False)
        pending = self._pending.pop(index, None)
        if pending is None or pending.future.done():
            return
        try:
            pending.future.set_result(self._outcome(index, pending.pid, (pid, result, error)))
        except Exception as exc:  # handed to the waiter
            pending.future.set_exception(exc)

    def _release_waits(self) -> None:
        for waits in (self._read_waits, self._applied_waits):
            keep = []
            for index, fut in waits:
                if fut.done():
                    continue
                if index <= self._applied:
                    fut.set_result(None)
                else:
                    keep.append((index, fut))
            waits[:] = keep

    def _install(self, snap: Snapshot) -> None:
        assert self._restore is not None
        doc = json.loads(snap.data) if snap.data else {"members": {}, "store": None}
        self.members = {int(k): str(v) for k, v in doc["members"].items()}
        if doc["store"] is not None:
            self._restore(snap.meta.index, doc["store"])
        self._applied = snap.meta.index
        self._snapshot_index = snap.meta.index
        self._update_peers()
        for index in [i for i in self._pending if i <= snap.meta.index]:
            # the entries came as a snapshot: whose write sits at that index is not known here
            pending = self._pending.pop(index)
            if not pending.future.done():
                pending.future.set_exception(
                    NotLeader("the write's outcome is unknown (this manager caught up by snapshot)")
                )

    async def _maybe_snapshot(self) -> None:
        if self._applied - self._snapshot_index < self.settings.snapshot_every:
            return
        assert self.raft is not None and self._storage is not None and self._snapshot
        index = self._applied
        started = asyncio.get_running_loop().time()
        data = json.dumps(
            {"members": {str(k): v for k, v in self.members.items()}, "store": self._snapshot()},
            separators=(",", ":"),
        ).encode()
        snap = self.raft.compact(index, data, keep=self.settings.keep_entries)
        await asyncio.to_thread(self._storage.compact, snap)
        self._snapshot_index = index
        self.metrics.snapshot_latency.observe(asyncio.get_running_loop().time() - started)
        self.metrics.snapshot_size.set(len(data))

    def _update_peers(self) -> None:
        addrs = {**self._known, **self.members}
        self.transport.set_peers(
            {rid: addr for rid, addr in addrs.items() if rid != self.id and addr}
        )

    async def _leader_change(self, within: float) -> None:
        """Wait up to `within` seconds, less if this manager learns of a new leader meanwhile (a
        request that found no leader retries as soon as there is one, not a tick later)."""
        if self._lead_changed is None or self._lead_changed.done():
            self._lead_changed = asyncio.get_running_loop().create_future()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._lead_changed), within)

    def _notify_leadership(self) -> None:
        assert self.raft is not None
        lead = self.raft.lead
        if lead != self._lead_seen:
            self._lead_seen = lead
            if lead != NONE:
                self.metrics.leader_changes.inc()
            if lead != NONE and self._lead_changed is not None and not self._lead_changed.done():
                self._lead_changed.set_result(None)
        now = (self.raft.is_leader, self.raft.term)
        if now == self._leader_seen:
            return
        was_leader = self._leader_seen[0]
        self._leader_seen = now
        if now[0] != was_leader:
            log.info("raft %d: %s in term %d", self.id, "leader" if now[0] else "follower", now[1])
            for fn in self._leadership_listeners:
                fn(*now)


def _empty(state: StorageState) -> bool:
    return state.snapshot.is_empty() and not state.entries and state.hard_state == HardState()
