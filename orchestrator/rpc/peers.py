"""Message streams between managers: what Raft's messages travel on.

Raft wants fire-and-forget delivery: a message that cannot be sent now is better dropped than
queued without bound (the protocol retries by itself), and a slow or dead peer must never stall
the others. So each peer gets its own bounded queue and its own sender task holding one
client-streaming gRPC call open; frames queued together go out packed in one gRPC message;
a broken call is reopened with exponential backoff, and what was queued for it is dropped.

Frames are opaque bytes (the Raft codec's); this module only moves them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
from grpc import aio

from orchestrator.rpc.jsonrpc import OPTIONS

log = logging.getLogger("shoal.peers")

_LEN = struct.Struct("<I")
MAX_PACK = 4 << 20  # bytes of frames packed into one gRPC message
# Makes a channel to a manager; a factory for real clusters (mutual TLS, issue #5) should pass
# LINK_OPTIONS as its channel options.
ChannelFactory = Callable[[str], aio.Channel]

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
    task: asyncio.Task[None] | None = None
    stats: PeerStats = field(default_factory=PeerStats)


class Peers:
    """Outgoing streams to a set of peers, each with a bounded queue."""

    def __init__(
        self,
        service: str,
        method: str = "Stream",
        queue_size: int = 4096,
        channel_factory: ChannelFactory = insecure_channel,
        backoff: tuple[float, float] = (0.05, 1.0),
    ):
        self.path = f"/{service}/{method}"
        self.queue_size = queue_size
        self.channel_factory = channel_factory
        self.backoff = backoff
        self._links: dict[str, _Link] = {}

    def set_peers(self, targets: dict[str, str]) -> None:
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
                await call(self._packs(link, link.stream))
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
            link.stats.dropped += len(link.frames)
            link.frames.clear()
            await channel.close()
            link.stats.reconnects += 1
            # A stream that lasted is a fresh failure: retry at once. (Counting frames sent
            # instead would reset the backoff on every heartbeat to a dead peer.)
            if loop.time() - opened >= self.backoff[1]:
                delay = self.backoff[0]
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff[1])

    async def _packs(self, link: _Link, stream: int) -> AsyncIterator[bytes]:
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
            yield pack(batch)
