"""The Raft transport between managers: message streams and forwarded proposals over gRPC.

Raft wants fire-and-forget delivery: a message that cannot be sent now is better dropped than
queued without bound (the protocol retries by itself), and a slow or dead peer must never stall
the others. So each peer gets its own bounded queue and its own sender task holding one
client-streaming gRPC call open (`Peers`); frames queued together go out packed in one gRPC
message; a broken call is reopened with exponential backoff, and what was queued for it is
dropped. The transport tells the driver what it lost (orchestrator/raft/transport.py): a full
queue or a broken stream reports the peer unreachable, and a snapshot is reported sent once
gRPC has taken its frame, or failed if it was dropped.

`GrpcTransport` is what the driver is given: the streams for Raft's messages (service
`shoal.Raft`, frames in the codec's format), and `shoal.RaftControl/Propose`, a unary call by
which a follower hands its proposal to the leader. Its `handlers()` go on the manager's gRPC
server, behind the same mutual TLS and authorization as every manager service
(docs/security.md).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import struct
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field

import grpc
from grpc import aio

from orchestrator.raft import codec
from orchestrator.raft.core import NotLeader, ProposalDropped
from orchestrator.raft.messages import NONE, Message, MessageType
from orchestrator.raft.transport import TransportHandler, decode_frame
from orchestrator.rpc import jsonrpc
from orchestrator.rpc.jsonrpc import OPTIONS

log = logging.getLogger(__name__)

RAFT_SERVICE = "shoal.Raft"
CONTROL_SERVICE = "shoal.RaftControl"

_LEN = struct.Struct("<I")
MAX_PACK = 4 << 20  # bytes of frames packed into one gRPC message
# Makes a channel to a manager; a factory for real clusters (mutual TLS, docs/security.md)
# should pass LINK_OPTIONS as its channel options.
ChannelFactory = Callable[[str], aio.Channel]
# What a link reports: the peer, and the frames concerned.
FramesCallback = Callable[[str, list[bytes]], None]

# Channel options for links between managers. By default gRPC shares one connection
# ("subchannel") among all channels to an address, and with it that connection's reconnect
# backoff, which grows to 120 s: with a forwarding client to the same manager failing its
# calls while that manager was down for 2-4 s, our link to it came back 1.5-3.5 s after the
# manager did, instead of within our own backoff (0.5 s). Each channel gets a connection of
# its own, and gRPC's backoff is capped at ours.
LINK_OPTIONS = (
    *OPTIONS,
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


def insecure_channel(target: str) -> aio.Channel:
    return aio.insecure_channel(target, options=LINK_OPTIONS)


def _identity(b: bytes) -> bytes:
    return b


def pack(frames: list[bytes]) -> bytes:
    return b"".join(_LEN.pack(len(f)) + f for f in frames)


def unpack(raw: bytes) -> list[bytes]:
    """The frames of a packed message; ValueError when it is malformed."""
    out, off = [], 0
    while off < len(raw):
        if off + _LEN.size > len(raw):
            raise ValueError("truncated frame header")
        (n,) = _LEN.unpack_from(raw, off)
        off += _LEN.size
        if off + n > len(raw):
            raise ValueError("truncated frame")
        out.append(raw[off : off + n])
        off += n
    return out


def handler(
    service: str, on_frame: Callable[[bytes], None], method: str = "Stream"
) -> grpc.GenericRpcHandler:
    """The receiving side: every frame of every incoming stream goes to on_frame, in order."""

    async def stream(requests: AsyncIterator[bytes], context: object) -> bytes:
        async for raw in requests:
            try:
                frames = unpack(raw)
            except ValueError as e:
                log.warning("dropping a malformed message from a peer: %s", e)
                continue
            for frame in frames:
                on_frame(frame)
        return b""

    return grpc.method_handlers_generic_handler(
        service,
        {
            method: grpc.stream_unary_rpc_method_handler(
                stream, request_deserializer=_identity, response_serializer=_identity
            )
        },
    )


@dataclass
class PeerStats:
    sent: int = 0
    dropped: int = 0
    reconnects: int = 0


@dataclass
class _Link:
    target: str
    # Our own queue rather than an asyncio.Queue: gRPC keeps consuming a stream's request
    # iterator after the call has failed (until its next frame, which it then drops), so each
    # broken stream left a getter waiting on the queue that swallowed the next frame. After a
    # peer had been down through a few reconnects, its first several messages once it was
    # back (votes among them) vanished, and a failover took 5 s instead of 1. Here only the
    # current stream (`stream`) takes frames; older iterators see they are stale and end.
    frames: deque[bytes] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    stream: int = 0
    # the frames of the last message handed to gRPC, until it asks for the next one (then
    # they are written) or the stream breaks (then they may be lost)
    inflight: list[bytes] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    stats: PeerStats = field(default_factory=PeerStats)


class Peers:
    """Outgoing streams to a set of peers, each with a bounded queue.

    `on_sent(peer, frames)`: gRPC took those frames (wrote them to the connection).
    `on_lost(peer, frames)`: the peer's stream broke; those frames were dropped (possibly
    none: the peer is unreachable all the same). A full queue is `send`'s False."""

    def __init__(
        self,
        service: str,
        method: str = "Stream",
        queue_size: int = 4096,
        channel_factory: ChannelFactory = insecure_channel,
        backoff: tuple[float, float] = (0.05, 1.0),
        on_sent: FramesCallback | None = None,
        on_lost: FramesCallback | None = None,
    ):
        self.path = f"/{service}/{method}"
        self.queue_size = queue_size
        self.channel_factory = channel_factory
        self.backoff = backoff
        self.on_sent = on_sent
        self.on_lost = on_lost
        self._links: dict[str, _Link] = {}

    def set_peers(self, targets: Mapping[str, str]) -> None:
        """Peer ID -> host:port. Links to peers gone or moved are closed; new ones opened."""
        for pid in list(self._links):
            if targets.get(pid) != self._links[pid].target:
                self._close_link(pid)
        for pid, target in targets.items():
            if pid not in self._links:
                link = _Link(target)
                link.task = asyncio.create_task(self._run(pid, link), name=f"peer-{pid}")
                self._links[pid] = link

    def send(self, peer: str, frame: bytes) -> bool:
        """Queue a frame; False (and counted) when the peer is unknown or its queue is full."""
        link = self._links.get(peer)
        if link is None:
            return False
        if len(link.frames) >= self.queue_size:
            link.stats.dropped += 1
            return False
        link.frames.append(frame)
        link.wake.set()
        return True

    def stats(self) -> dict[str, PeerStats]:
        return {pid: link.stats for pid, link in self._links.items()}

    def _close_link(self, pid: str) -> None:
        link = self._links.pop(pid)
        link.stream += 1
        link.wake.set()
        if link.task is not None:
            link.task.cancel()

    async def close(self) -> None:
        tasks = [link.task for link in self._links.values() if link.task is not None]
        for pid in list(self._links):
            self._close_link(pid)
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    async def _run(self, pid: str, link: _Link) -> None:
        loop = asyncio.get_running_loop()
        delay = self.backoff[0]
        while True:
            opened = loop.time()
            link.stream += 1
            channel = self.channel_factory(link.target)
            try:
                call = channel.stream_unary(
                    self.path, request_serializer=_identity, response_deserializer=_identity
                )
                await call(self._packs(pid, link, link.stream))
            except asyncio.CancelledError:
                link.stream += 1
                link.wake.set()
                await channel.close()
                raise
            except grpc.RpcError as e:
                code = e.code() if isinstance(e, aio.AioRpcError) else None
                log.debug("stream to %s (%s) broke: %s", pid, link.target, code)
            # Retire this stream's iterator, and drop what waited for a peer that was not
            # there: those messages are stale by now, and Raft resends what still matters
            # (a burst of old heartbeats and appends would only delay the fresh ones).
            link.stream += 1
            link.wake.set()
            lost = [*link.inflight, *link.frames]
            link.inflight = []
            link.stats.dropped += len(link.frames)
            link.frames.clear()
            if self.on_lost is not None:
                self.on_lost(pid, lost)
            await channel.close()
            link.stats.reconnects += 1
            # A stream that lasted is a fresh failure: retry at once. (Counting frames sent
            # instead would reset the backoff on every heartbeat to a dead peer.)
            if loop.time() - opened >= self.backoff[1]:
                delay = self.backoff[0]
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff[1])

    async def _packs(self, pid: str, link: _Link, stream: int) -> AsyncIterator[bytes]:
        """The messages of stream number `stream`: everything queued, packed, until a newer
        stream replaces it."""
        frames = link.frames
        while True:
            while not frames and link.stream == stream:
                link.wake.clear()
                await link.wake.wait()
            if link.stream != stream:
                return
            batch = [frames.popleft()]
            size = len(batch[0])
            while frames and size < MAX_PACK:
                batch.append(frames.popleft())
                size += len(batch[-1])
            link.stats.sent += len(batch)
            link.inflight = batch
            yield pack(batch)
            # gRPC asks for the next message once it has written this one
            if link.stream != stream:
                return  # the stream broke meanwhile; what it took is reported lost
            link.inflight = []
            if self.on_sent is not None:
                self.on_sent(pid, batch)


class GrpcTransport:
    """The driver's Transport between managers (see the module docstring)."""

    def __init__(
        self,
        channel_factory: ChannelFactory = insecure_channel,
        queue_size: int = 4096,
        backoff: tuple[float, float] = (0.05, 1.0),
    ):
        self.channel_factory = channel_factory
        self.peers = Peers(
            RAFT_SERVICE,
            queue_size=queue_size,
            channel_factory=channel_factory,
            backoff=backoff,
            on_sent=self._sent,
            on_lost=self._lost,
        )
        self._handler: TransportHandler | None = None
        self._addrs: dict[int, str] = {}
        self._controls: dict[str, jsonrpc.Client] = {}
        # peer -> the frame of the snapshot on its way there (one at a time, as Raft sends)
        self._snapshots: dict[str, bytes] = {}

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        """What the manager's gRPC server must serve for this transport."""
        return [
            handler(RAFT_SERVICE, self._receive),
            jsonrpc.service(CONTROL_SERVICE, unary={"Propose": self._rpc_propose}),
        ]

    def attach(self, handler: TransportHandler) -> None:
        self._handler = handler

    def set_peers(self, peers: Mapping[int, str]) -> None:
        self._addrs = dict(peers)
        for peer in [p for p in self._snapshots if int(p) not in peers]:
            del self._snapshots[peer]
        self.peers.set_peers({str(rid): addr for rid, addr in peers.items()})

    def send(self, m: Message) -> None:
        frame = codec.encode(m)
        peer = str(m.to)
        if m.type is MessageType.SNAP:
            self._snapshots[peer] = frame
        if not self.peers.send(peer, frame):
            self._lost(peer, [frame])

    def stats(self) -> dict[str, PeerStats]:
        return self.peers.stats()

    async def forward(self, to: int, data: bytes, within: float) -> int:
        addr = self._addrs.get(to)
        if not addr:
            raise NotLeader("no leader known")
        client = self._controls.get(addr)
        if client is None:
            client = jsonrpc.Client(addr, self.channel_factory(addr))
            self._controls[addr] = client
        try:
            reply = await client.call(
                CONTROL_SERVICE,
                "Propose",
                {"data": base64.b64encode(data).decode()},
                deadline=within,
            )
        except grpc.RpcError as e:
            raise NotLeader(f"cannot reach the leader at {addr}") from e
        if "index" not in reply:
            raise NotLeader(str(reply.get("error", "the leader refused the write")))
        return int(reply["index"])

    async def close(self) -> None:
        await self.peers.close()
        for c in self._controls.values():
            await c.close()
        self._controls = {}

    # ---- callbacks ----------------------------------------------------------------------

    def _receive(self, frame: bytes) -> None:
        if self._handler is None:
            return
        m = decode_frame(frame, "a peer")
        if m is not None:
            self._handler.step(m)

    def _sent(self, peer: str, frames: list[bytes]) -> None:
        if self._took_snapshot(peer, frames) and self._handler is not None:
            self._handler.report_snapshot(int(peer), True)

    def _lost(self, peer: str, frames: list[bytes]) -> None:
        if self._handler is None:
            return
        self._handler.report_unreachable(int(peer))
        if self._took_snapshot(peer, frames):
            self._handler.report_snapshot(int(peer), False)

    def _took_snapshot(self, peer: str, frames: list[bytes]) -> bool:
        snap = self._snapshots.get(peer)
        if snap is None or not any(f is snap for f in frames):
            return False
        del self._snapshots[peer]
        return True

    async def _rpc_propose(self, msg: jsonrpc.Message, context: jsonrpc.Context) -> jsonrpc.Message:
        if self._handler is None:
            return {"error": "not the leader", "leader": NONE}
        try:
            data = base64.b64decode(str(msg.get("data", "")), validate=True)
        except ValueError:
            return {"error": "bad data"}
        try:
            index = self._handler.propose_forwarded(data)
        except NotLeader as e:
            return {"error": str(e), "leader": e.leader}
        except ProposalDropped as e:
            return {"error": str(e)}
        except ValueError as e:
            return {"error": str(e)}
        return {"index": index}
