"""Helpers for unit tests of the Raft core: build nodes, drain Readies, a synchronous network.

Like etcd-io/raft's test helpers: messages are delivered at once, in order, unless a link is
cut or a message type is dropped; every Ready is "persisted" (in a MemoryStorage) and
advanced immediately.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from orchestrator.raft.core import Config, Raft
from orchestrator.raft.messages import (
    ConfState,
    Entry,
    HardState,
    Message,
    MessageType,
    ReadState,
    Ready,
    Snapshot,
    SnapshotMeta,
    StorageState,
)
from orchestrator.raft.storage import MemoryStorage


def entries(*terms: int, start: int = 1) -> tuple[Entry, ...]:
    """A log with these terms, from index `start` (figure-7 style: entries(1, 1, 4, 4, 5))."""
    return tuple(Entry(t, i) for i, t in enumerate(terms, start=start))


def new_raft(
    id: int,
    peers: Iterable[int],
    *,
    log: tuple[Entry, ...] = (),
    term: int = 0,
    vote: int = 0,
    commit: int = 0,
    learners: Iterable[int] = (),
    seed: int | None = None,
    **cfg: int | bool,
) -> Raft:
    """A node whose membership is `peers` (+ `learners`), with an optional log and hard state.

    Pre-vote and check-quorum are off unless asked for (the paper's plain Raft).
    """
    opts: dict[str, int | bool] = {"pre_vote": False, "check_quorum": False}
    opts.update(cfg)
    conf = ConfState(frozenset(peers), frozenset(learners))
    state = StorageState(
        HardState(term, vote, commit), Snapshot(SnapshotMeta(conf_state=conf)), log
    )
    return Raft(Config(id, **opts), random.Random(id if seed is None else seed), state)  # type: ignore[arg-type]


def drain(r: Raft, storage: MemoryStorage | None = None) -> list[Ready]:
    """Handle every Ready (persisting into `storage` if given) until there is none."""
    out = []
    while r.has_ready():
        rd = r.ready()
        if storage is not None:
            storage.save_ready(rd)
        r.advance(rd)
        out.append(rd)
    return out


def read_messages(r: Raft) -> list[Message]:
    """Every message the node wants sent (draining its Readies)."""
    return [m for rd in drain(r) for m in rd.messages]


def make_leader(r: Raft) -> None:
    """Elect `r`: campaign, then every other voter grants its vote."""
    r.campaign()
    for m in read_messages(r):
        if m.type in (MessageType.VOTE, MessageType.PRE_VOTE):
            resp = (
                MessageType.VOTE_RESP if m.type is MessageType.VOTE else MessageType.PRE_VOTE_RESP
            )
            r.step(Message(resp, r.id, m.to, m.term))
    if not r.is_leader:  # a pre-vote round won: the real vote is out now
        for m in read_messages(r):
            if m.type is MessageType.VOTE:
                r.step(Message(MessageType.VOTE_RESP, r.id, m.to, m.term))
    assert r.is_leader, r.role


@dataclass
class Network:
    """Synchronous delivery between in-process nodes, with cut links and dropped types."""

    nodes: dict[int, Raft]
    cut: set[tuple[int, int]] = field(default_factory=set)
    drop_types: set[MessageType] = field(default_factory=set)
    down: set[int] = field(default_factory=set)
    storages: dict[int, MemoryStorage] = field(default_factory=dict)
    delivered: list[Message] = field(default_factory=list)
    read_states: dict[int, list[ReadState]] = field(default_factory=dict)  # per node
    # Rewrite (or, returning None, drop) each message before it is delivered.
    transform: Callable[[Message], Message | None] | None = None

    @classmethod
    def of(cls, *nodes: Raft) -> Network:
        return cls({n.id: n for n in nodes})

    def isolate(self, node: int) -> None:
        for other in self.nodes:
            if other != node:
                self.cut.add((node, other))
                self.cut.add((other, node))

    def partition(self, *groups: Iterable[int]) -> None:
        sets = [set(g) for g in groups]
        for a in self.nodes:
            for b in self.nodes:
                if a != b and not any(a in g and b in g for g in sets):
                    self.cut.add((a, b))

    def heal(self) -> None:
        self.cut.clear()

    def _outbox(self, node: Raft) -> list[Message]:
        out: list[Message] = []
        while node.has_ready():
            rd = node.ready()
            if node.id in self.storages:  # tests that restart nodes give them storage
                self.storages[node.id].save_ready(rd)
            node.advance(rd)
            out.extend(rd.messages)
            self.read_states.setdefault(node.id, []).extend(rd.read_states)
        return out

    def send(self, *msgs: Message) -> None:
        """Deliver these messages and everything they cause, until the network is quiet."""
        queue = list(msgs)
        while queue:
            m: Message | None = queue.pop(0)
            if m is not None and self.transform is not None:
                m = self.transform(m)
            if (
                m is None
                or m.to not in self.nodes
                or m.to in self.down
                or m.frm in self.down
                or (m.frm, m.to) in self.cut
                or m.type in self.drop_types
            ):
                continue
            self.delivered.append(m)
            node = self.nodes[m.to]
            node.step(m)
            queue.extend(self._outbox(node))

    def flush(self, node_id: int) -> None:
        """Deliver what `node_id` has to send (after a local call like propose or tick)."""
        self.send(*self._outbox(self.nodes[node_id]))

    def campaign(self, node_id: int) -> None:
        self.nodes[node_id].campaign()
        self.flush(node_id)

    def propose(self, node_id: int, data: bytes) -> int:
        index = self.nodes[node_id].propose(data)
        self.flush(node_id)
        return index

    def tick(self, node_id: int, n: int = 1) -> None:
        for _ in range(n):
            self.nodes[node_id].tick()
            self.flush(node_id)

    def tick_all(self, n: int = 1) -> None:
        for _ in range(n):
            for i in sorted(self.nodes):
                if i not in self.down:
                    self.nodes[i].tick()
                    self.flush(i)
