"""Message streams between managers: what Raft's messages travel on.

Raft wants fire-and-forget delivery: a message that cannot be sent now is better dropped than
queued without bound (the protocol retries by itself), and a slow or dead peer must never stall
the others. So each peer gets its own bounded queue and its own sender task holding one
client-streaming gRPC call open; frames queued together go out packed in one gRPC message;
a broken call is reopened with exponential backoff.

Frames are opaque bytes (the Raft codec's); this module only moves them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
from grpc import aio

from orchestrator.rpc.jsonrpc import OPTIONS

log = logging.getLogger("shoal.peers")

_LEN = struct.Struct("<I")
MAX_PACK = 4 << 20  # bytes of frames packed into one gRPC message
ChannelFactory = Callable[[str], aio.Channel]


def insecure_channel(target: str) -> aio.Channel:
    return aio.insecure_channel(target, options=OPTIONS)


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
    queue: asyncio.Queue[bytes]
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
                link = _Link(target, asyncio.Queue(self.queue_size))
                link.task = asyncio.create_task(self._run(pid, link), name=f"peer-{pid}")
                self._links[pid] = link

    def send(self, peer: str, frame: bytes) -> bool:
        """Queue a frame; False (and counted) when the peer is unknown or its queue is full."""
        link = self._links.get(peer)
        if link is None:
            return False
        try:
            link.queue.put_nowait(frame)
        except asyncio.QueueFull:
            link.stats.dropped += 1
            return False
        return True

    def stats(self) -> dict[str, PeerStats]:
        return {pid: link.stats for pid, link in self._links.items()}

    def _close_link(self, pid: str) -> None:
        link = self._links.pop(pid)
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
        delay = self.backoff[0]
        while True:
            sent_before = link.stats.sent
            channel = self.channel_factory(link.target)
            try:
                call = channel.stream_unary(
                    self.path, request_serializer=_identity, response_deserializer=_identity
                )
                await call(self._packs(link))
            except asyncio.CancelledError:
                await channel.close()
                raise
            except grpc.RpcError as e:
                code = e.code() if isinstance(e, aio.AioRpcError) else None
                log.debug("stream to %s (%s) broke: %s", pid, link.target, code)
            await channel.close()
            link.stats.reconnects += 1
            if link.stats.sent > sent_before:
                delay = self.backoff[0]  # the stream worked for a while: a fresh failure
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff[1])

    async def _packs(self, link: _Link) -> AsyncIterator[bytes]:
        while True:
            frames = [await link.queue.get()]
            size = len(frames[0])
            while size < MAX_PACK and not link.queue.empty():
                frames.append(link.queue.get_nowait())
                size += len(frames[-1])
            link.stats.sent += len(frames)
            yield pack(frames)
