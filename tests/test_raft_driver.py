"""The Raft node's driver (orchestrator/raft/node.py) without sockets: three members on the
in-memory transport (orchestrator/raft/transport.py), storage in memory, ticks by hand.

What the driver adds to the core, deterministically: proposals forwarded from a follower,
NotLeader from a node that no longer leads, read barriers that wait for the commit index,
proposals of a cut-off leader failing once its term is over, a broken invariant stopping the
node, and what the transport reports lost. Nothing here sleeps for the driver's sake: the
loop runs until a condition holds (bounded), and elections happen on ticks the test fires.
(The same node over gRPC and real disks: test_raft_grpc.py.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import random
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from orchestrator.raft import codec
from orchestrator.raft.core import Raft
from orchestrator.raft.log import LogError
from orchestrator.raft.messages import NONE, Message, MessageType
from orchestrator.raft.node import ID_LEN, NoQuorum, RaftNode, RaftSettings
from orchestrator.raft.progress import ProgressState
from orchestrator.raft.storage import MemoryStorage
from orchestrator.raft.transport import MemoryNetwork, MemoryTransport
from orchestrator.store import log as store_log

# tick only matters to how long a request waits for a leader; timeouts are generous guards,
# the tests never wait for them
SETTINGS = RaftSettings(tick=0.01, election_tick=10, propose_timeout=30.0)


class ManualTicker:
    """Ticks when the test says so."""

    def __init__(self) -> None:
        self._due = 0
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._due += 1
        self._event.set()

    async def wait(self) -> None:
        while not self._due:
            self._event.clear()
            await self._event.wait()
        self._due -= 1


class KV:
    """The state machine: `key=value` entries into a dict; applying answers `key@index`."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}

    def apply(self, index: int, entry: bytes) -> str:
        key, _, value = entry.decode().partition("=")
        self.data[key] = value
        return f"{key}@{index}"

    def snapshot(self) -> dict[str, str]:
        return dict(self.data)

    def restore(self, index: int, state: Any) -> None:
        self.data = dict(state)


@dataclasses.dataclass
class Member:
    id: int
    node: RaftNode
    kv: KV
    ticker: ManualTicker
    transport: MemoryTransport

    @property
    def raft(self) -> Raft:
        assert self.node.raft is not None
        return self.node.raft


async def turns(n: int = 100) -> None:
    """Let the loop run `n` turns: deliveries, Readies, applies."""
    for _ in range(n):
        await asyncio.sleep(0)


async def until(cond: Callable[[], bool], what: str, within: float = 10.0) -> None:
    """Run the loop until cond() holds. `within` (seconds) only bounds a failing test; the
    storage's compaction is the one thing here that leaves the loop (a thread)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not cond():
        assert loop.time() < deadline, f"never happened: {what}"
        await asyncio.sleep(0)


class Group:
    def __init__(self, settings: RaftSettings = SETTINGS):
        self.settings = settings
        self.net = MemoryNetwork()
        self.members: dict[int, Member] = {}

    async def start(
        self, rid: int, bootstrap: bool = False, known: dict[int, str] | None = None
    ) -> Member:
        storage = MemoryStorage()
        ticker = ManualTicker()
        transport = self.net.transport(rid)
        node = RaftNode(
            rid,
            f"m{rid}",
            lambda: storage,
            transport,
            self.settings,
            random.Random(rid),
            bootstrap=bootstrap,
            known=known,
            ticker=ticker,
        )
        kv = KV()
        node.bind(kv.apply, kv.snapshot, kv.restore)
        await node.start()
        m = Member(rid, node, kv, ticker, transport)
        self.members[rid] = m
        return m

    async def form(self) -> None:
        """As managers form: the first bootstraps alone, the others join as learners and are
        promoted once caught up."""
        first = await self.start(1, bootstrap=True)
        await until(lambda: first.node.is_leader, "a lone first member leads")
        for rid in (2, 3):
            await self.start(rid, known={1: "m1"})
            await first.node.add_learner(rid, f"m{rid}")
            # what went to it before the leader had applied its address was lost: the next
            # heartbeat's answer gets it the log
            await self.tick_until(functools.partial(first.node.caught_up, rid), f"{rid} caught up")
            await first.node.promote(rid)
        assert first.node.voters() == {1, 2, 3}

    async def tick(self, n: int = 1) -> None:
        for _ in range(n):
            for m in self.members.values():
                m.ticker.fire()
            await turns()

    async def tick_until(self, cond: Callable[[], bool], what: str, ticks: int = 100) -> None:
        for _ in range(ticks):
            if cond():
                return
            await self.tick()
        raise AssertionError(f"not after {ticks} ticks: {what}")

    def leader(self) -> Member | None:
        leaders = [m for m in self.members.values() if m.node.is_leader]
        return leaders[0] if len(leaders) == 1 else None

    def the_leader(self) -> Member:
        leader = self.leader()
        assert leader is not None
        return leader

    def follower(self, not_: Member) -> Member:
        return next(m for m in self.members.values() if m.id != not_.id)

    async def close(self) -> None:
        for m in self.members.values():
            await m.node.close()


def run(body: Callable[[Group], Awaitable[None]], settings: RaftSettings = SETTINGS) -> None:
    async def main() -> None:
        group = Group(settings)
        try:
            await group.form()
            await body(group)
        finally:
            await group.close()

    asyncio.run(main())


def test_there_is_one_not_leader() -> None:
    """The core's NotLeader is the store's (and so the API's 503), NoQuorum one of it."""
    from orchestrator.raft import core  # noqa: PLC0415

    assert store_log.NotLeader is core.NotLeader
    assert issubclass(NoQuorum, core.NotLeader)


def test_a_proposal_on_a_follower_is_forwarded_and_committed() -> None:
    async def body(g: Group) -> None:
        leader = g.the_leader()
        follower = g.follower(leader)
        result = await follower.node.propose(b"a=1")
        assert follower.transport.forwarded == [leader.id]
        # committed at the index the leader gave it, and the proposer reads its own write
        key, _, index = result.partition("@")
        assert key == "a" and int(index) <= leader.raft.committed
        assert follower.kv.data == {"a": "1"}
        await until(lambda: all(m.kv.data == {"a": "1"} for m in g.members.values()), "applied")
        # every member's log holds it once
        logs = [m.raft.log for m in g.members.values()]
        assert all(log.entry(int(index)).data.endswith(b"a=1") for log in logs)

    run(body)


def test_a_node_that_lost_leadership_answers_not_leader() -> None:
    async def body(g: Group) -> None:
        old = g.the_leader()
        term = old.node.term
        target = g.follower(old)
        await old.node.transfer_leadership(target.id)
        await until(lambda: old.node.leader == target.id, "the transfer, and its first append")
        assert target.node.is_leader and not old.node.is_leader
        # its leader-only writes are fenced by the term they started in
        with pytest.raises(store_log.NotLeader, match=f"no longer the leader of term {term}"):
            await old.node.propose(b"fenced=1", term=term)
        # a follower that still asked it is told so, through the transport as over gRPC
        data = bytes(ID_LEN) + b"late=1"
        with pytest.raises(store_log.NotLeader, match="not the leader") as err:
            old.node.propose_forwarded(data)
        assert err.value.leader == target.id
        third = next(m for m in g.members.values() if m.id not in (old.id, target.id))
        with pytest.raises(store_log.NotLeader, match="not the leader"):
            await third.node.transport.forward(old.id, data, 1.0)
        # while the old leader itself forwards to the new one
        assert (await old.node.propose(b"after=1")).startswith("after@")
        assert old.transport.forwarded == [target.id]
        await until(lambda: all("after" in m.kv.data for m in g.members.values()), "applied")
        assert all(
            "fenced" not in m.kv.data and "late" not in m.kv.data for m in g.members.values()
        )

    run(body)


def test_a_read_barrier_waits_for_the_commit_index() -> None:
    async def body(g: Group) -> None:
        leader = g.the_leader()
        lagging = g.follower(leader)
        # the lagging member hears heartbeats (so it can ask the leader) but no entries
        g.net.drop = lambda m: m.to == lagging.id and m.type is MessageType.APP
        await leader.node.propose(b"r=1")
        committed = leader.raft.committed
        barrier = asyncio.create_task(lagging.node.read_barrier())
        await turns(300)
        # the leader answered with its commit index, which this member has not applied
        assert not barrier.done()
        assert lagging.node.applied < committed and "r" not in lagging.kv.data
        g.net.drop = None
        await g.tick()  # a heartbeat: the leader finds the member behind and sends the entries
        await asyncio.wait_for(barrier, 5)
        assert lagging.node.applied >= committed and lagging.kv.data["r"] == "1"
        # and with nothing to wait for, it returns after one round trip
        await lagging.node.read_barrier()

    run(body)


def test_a_partitioned_leaders_proposals_fail_after_its_term_ends() -> None:
    async def body(g: Group) -> None:
        old = g.the_leader()
        term = old.node.term
        g.net.isolate(old.id)
        lost = asyncio.create_task(old.node.propose(b"lost=1"))
        await turns()
        assert not lost.done()  # appended at the old leader, which cannot commit it
        others = [m for m in g.members.values() if m.id != old.id]
        await g.tick_until(
            lambda: any(m.node.is_leader for m in others) and not old.node.is_leader,
            "a new leader among the majority, the cut-off one stepped down",
        )
        new = g.the_leader()
        assert new.node.term > term
        # its term is over: leader-only work is refused at once
        with pytest.raises(store_log.NotLeader):
            await old.node.propose(b"fenced=1", term=term)
        assert (await new.node.propose(b"won=1")).startswith("won@")
        assert not lost.done()  # still cut off: it cannot know yet
        g.net.heal()
        await g.tick_until(lost.done, "the old leader hears from the new one")
        # the new leader's entries replaced its uncommitted one: the write was not made
        with pytest.raises(store_log.NotLeader, match="leadership changed"):
            await lost
        await until(lambda: old.kv.data.get("won") == "1", "the old leader caught up")
        for m in g.members.values():
            assert "lost" not in m.kv.data and "fenced" not in m.kv.data

    run(body)


def test_a_broken_invariant_stops_the_node() -> None:
    async def body(g: Group) -> None:
        leader = g.the_leader()
        victim = g.follower(leader)
        # a write the victim forwarded and waits to apply (it gets no entries)
        g.net.drop = lambda m: m.to == victim.id and m.type is MessageType.APP
        waiting = asyncio.create_task(victim.node.propose(b"w=1"))
        await until(lambda: leader.kv.data.get("w") == "1", "the write committed elsewhere")
        assert not waiting.done()
        # the leader says more is committed than the victim's log holds: its log was lost or
        # truncated (etcd panics: "Was the raft log corrupted, truncated, or lost?")
        raft = victim.node.raft
        assert raft is not None
        bad = Message(
            MessageType.HEARTBEAT,
            to=victim.id,
            frm=leader.id,
            term=leader.node.term,
            commit=raft.log.last_index() + 5,
        )
        g.net.inject(victim.id, codec.encode(bad))
        with pytest.raises(LogError, match="beyond the last index"):
            await asyncio.wait_for(victim.node.wait(), 5)
        assert victim.node.failure is not None
        assert victim.node.failure.startswith("raft invariant broken: commit")
        # whoever waited on it learns it, and it takes nothing more
        with pytest.raises(store_log.NotLeader, match="raft invariant broken"):
            await waiting
        with pytest.raises(store_log.NotLeader, match="raft invariant broken"):
            await victim.node.propose(b"more=1")
        with pytest.raises(store_log.NotLeader, match="raft invariant broken"):
            await victim.node.read_barrier()
        assert not victim.node.is_leader and victim.node.leader == NONE
        stepped = len(g.net.sent)
        g.net.drop = None
        await g.tick(3)
        assert raft.log.committed < bad.commit and raft.term == leader.node.term
        assert len(g.net.sent) > stepped  # the others go on
        assert (await leader.node.propose(b"still=1")).startswith("still@")

    run(body)


def test_a_malformed_frame_is_dropped_and_the_node_goes_on() -> None:
    async def body(g: Group) -> None:
        leader = g.the_leader()
        follower = g.follower(leader)
        g.net.inject(follower.id, b"\x01not a raft message")
        raft = follower.raft
        snap = Message(MessageType.SNAP, to=follower.id, frm=leader.id, term=raft.term)
        g.net.inject(follower.id, codec.encode(snap))  # a snapshot message without one
        g.net.inject(follower.id, codec.encode(Message(MessageType.APP, to=99, frm=1, term=99)))
        await turns()
        assert follower.node.failure is None
        assert (await follower.node.propose(b"ok=1")).startswith("ok@")

    run(body)


def test_the_transport_reports_unreachable_followers() -> None:
    async def body(g: Group) -> None:
        leader = g.the_leader()
        away = g.follower(leader)
        raft = leader.node.raft
        assert raft is not None
        assert raft.prs[away.id].state is ProgressState.REPLICATE
        g.net.cut(leader.id, away.id)
        await leader.node.propose(b"x=1")  # the other follower makes the quorum
        # the append to it was lost and said so: the leader stops pipelining to it
        assert raft.prs[away.id].state is ProgressState.PROBE
        g.net.heal()
        await g.tick_until(
            lambda: raft.prs[away.id].state is ProgressState.REPLICATE, "replicating again"
        )
        await until(lambda: away.kv.data.get("x") == "1", "caught up")

    run(body)


def test_a_lagging_follower_gets_a_snapshot_and_the_leader_hears_it_went_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = dataclasses.replace(SETTINGS, snapshot_every=5, keep_entries=0)

    async def body(g: Group) -> None:
        leader = g.the_leader()
        away = g.follower(leader)
        raft = leader.node.raft
        assert raft is not None
        reports: list[tuple[int, bool]] = []
        report = leader.node.report_snapshot

        def spy(peer: int, ok: bool) -> None:
            reports.append((peer, ok))
            report(peer, ok)

        monkeypatch.setattr(leader.node, "report_snapshot", spy)
        g.net.isolate(away.id)
        for i in range(12):
            await leader.node.propose(f"s{i}={i}".encode())
        await until(lambda: raft.log.first_index() > away.node.applied + 1, "compacted")
        g.net.heal()
        await g.tick_until(lambda: away.kv.data == leader.kv.data, "caught up by snapshot")
        assert (away.id, True) in reports
        await until(lambda: raft.prs[away.id].state is ProgressState.REPLICATE, "replicating")

    run(body, settings)
