"""How a Raft node talks to its peers: the `Transport` the driver is given, and one in memory.

As hashicorp/raft's Transport is, this is the driver's only way out of the process, so the
driver (orchestrator/raft/node.py) runs the same over gRPC between managers
(orchestrator/raft/grpc_transport.py) and over `MemoryNetwork` in tests, where nothing leaves
the event loop and a test decides what is delivered.

A transport carries two things:

- Raft messages, fire-and-forget: `send` never blocks nor fails; a message it cannot deliver
  is dropped (Raft resends what still matters), and the transport says so when it knows:
  `report_unreachable(peer)` when a peer's queue is full or its stream failed, and
  `report_snapshot(peer, ok)` once a snapshot was handed to the peer's connection or lost,
  as swarmkit's transport reports to etcd-io/raft. Received messages go to `step`; a frame
  that does not decode is logged and dropped there, never stepped.
- forwarded proposals: a follower's `forward(leader, data)` returns the index the leader's
  `propose_forwarded(data)` gave the entry, or raises NotLeader.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Protocol

from orchestrator.raft import codec
from orchestrator.raft.core import NotLeader, ProposalDropped
from orchestrator.raft.messages import NONE, Message, MessageType

log = logging.getLogger(__name__)


class TransportHandler(Protocol):
    """What a transport delivers to: the driver."""

    def step(self, m: Message) -> None:
        """A message from a peer."""

    def propose_forwarded(self, data: bytes) -> int:
        """A follower's proposal: its index in this leader's log. Raises NotLeader or
        ProposalDropped, ValueError for data that is no proposal."""
        ...

    def report_unreachable(self, peer: int) -> None:
        """A message to `peer` was lost: its queue was full, or its connection failed."""

    def report_snapshot(self, peer: int, ok: bool) -> None:
        """The snapshot sent to `peer` went out (ok) or was lost."""


class Transport(Protocol):
    def attach(self, handler: TransportHandler) -> None:
        """Where received messages and forwarded proposals go (once, before anything is sent)."""

    def set_peers(self, peers: Mapping[int, str]) -> None:
        """Raft ID -> address of every peer to talk to (not this node)."""

    def send(self, m: Message) -> None:
        """Queue `m` for `m.to`; never blocks. Undeliverable messages are dropped."""

    async def forward(self, to: int, data: bytes, within: float) -> int:
        """Have the leader `to` propose `data`: its index there. Raises NotLeader (the leader
        refused, or cannot be reached within `within` seconds)."""
        ...

    async def close(self) -> None: ...


def decode_frame(frame: bytes, frm: str) -> Message | None:
    """A received frame's message; None (logged) for a malformed one: a bad frame from the
    network is dropped, it says nothing about this node's state. (What a well-formed message
    makes the core raise, on the other hand, is a broken invariant: see node.py.)"""
    try:
        m = codec.decode(frame)
    except codec.CodecError as e:
        log.warning("dropping a malformed Raft message from %s: %s", frm, e)
        return None
    if m.type is MessageType.SNAP and m.snapshot is None:
        log.warning("dropping a malformed Raft message from %s: a snapshot without one", frm)
        return None
    return m


class MemoryNetwork:
    """Transports between drivers in one event loop, for tests (as orchestrator/raft/sim.py is
    for the core).

    A message is encoded, delivered on a later turn of the loop (in order per link), decoded
    and stepped. Links can be cut (`isolate`, `cut`, `heal`) and messages dropped by a
    predicate (`drop`); a message sent over a cut link, or to a peer without an address, is
    lost and reported unreachable, as the gRPC transport reports a failed stream."""

    def __init__(self) -> None:
        self.transports: dict[int, MemoryTransport] = {}
        self.cuts: set[tuple[int, int]] = set()  # (from, to): messages from -> to are lost
        self.drop: Callable[[Message], bool] | None = None
        self.sent: list[Message] = []  # everything delivered, in order (for assertions)

    def transport(self, raft_id: int) -> MemoryTransport:
        t = MemoryTransport(self, raft_id)
        self.transports[raft_id] = t
        return t

    def cut(self, a: int, b: int) -> None:
        self.cuts |= {(a, b), (b, a)}

    def isolate(self, node: int) -> None:
        for other in self.transports:
            if other != node:
                self.cut(node, other)

    def heal(self) -> None:
        """Every link back, and nothing dropped."""
        self.cuts.clear()
        self.drop = None

    def linked(self, frm: int, to: int) -> bool:
        t = self.transports.get(to)
        return t is not None and not t.closed and (frm, to) not in self.cuts

    def inject(self, to: int, frame: bytes) -> None:
        """A raw frame arrives at `to` as if from the network."""
        self._deliver(to, frame, "the test")

    def _deliver(self, to: int, frame: bytes, frm: str) -> None:
        t = self.transports.get(to)
        if t is None or t.closed or t.handler is None:
            return
        m = decode_frame(frame, frm)
        if m is not None:
            self.sent.append(m)
            t.handler.step(m)


class MemoryTransport:
    def __init__(self, network: MemoryNetwork, raft_id: int):
        self.network = network
        self.id = raft_id
        self.handler: TransportHandler | None = None
        self.peers: dict[int, str] = {}
        self.closed = False
        self.forwarded: list[int] = []  # to whom each forward() went (for assertions)

    def attach(self, handler: TransportHandler) -> None:
        self.handler = handler

    def set_peers(self, peers: Mapping[int, str]) -> None:
        self.peers = dict(peers)

    def send(self, m: Message) -> None:
        net = self.network
        if self.closed:
            return
        if m.to not in self.peers or not net.linked(self.id, m.to):
            self._lost(m)
            return
        if net.drop is not None and net.drop(m):
            return  # lost on the way, unnoticed (as a packet is)
        frame = codec.encode(m)
        loop = asyncio.get_running_loop()
        loop.call_soon(net._deliver, m.to, frame, str(self.id))
        if m.type is MessageType.SNAP and self.handler is not None:
            loop.call_soon(self.handler.report_snapshot, m.to, True)

    def _lost(self, m: Message) -> None:
        if self.handler is None:
            return
        self.handler.report_unreachable(m.to)
        if m.type is MessageType.SNAP:
            self.handler.report_snapshot(m.to, False)

    async def forward(self, to: int, data: bytes, within: float) -> int:
        await asyncio.sleep(0)  # a request and its answer take turns of the loop
        self.forwarded.append(to)
        net = self.network
        target = net.transports.get(to)
        if (
            to not in self.peers
            or target is None
            or target.handler is None
            or not (net.linked(self.id, to) and net.linked(to, self.id))
        ):
            raise NotLeader(f"cannot reach the leader at {self.peers.get(to, to)}")
        try:
            index = target.handler.propose_forwarded(data)
        except (NotLeader, ProposalDropped, ValueError) as e:
            # as the gRPC transport answers: the refusal's text, on the follower's side
            raise NotLeader(str(e), e.leader if isinstance(e, NotLeader) else NONE) from None
        await asyncio.sleep(0)
        return index

    async def close(self) -> None:
        self.closed = True
