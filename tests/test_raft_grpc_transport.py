"""The Raft transport between managers (orchestrator/raft/grpc_transport.py) over real gRPC on
loopback: its message streams, and what it reports lost."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from grpc import aio

from orchestrator.raft import codec
from orchestrator.raft import grpc_transport as peers
from orchestrator.raft.core import NotLeader
from orchestrator.raft.messages import ConfState, Message, MessageType, Snapshot, SnapshotMeta

SERVICE = "shoal.test.Peers"


async def start_server(received: list[bytes], port: int = 0) -> tuple[aio.Server, int]:
    server = aio.server()
    server.add_generic_rpc_handlers((peers.handler(SERVICE, received.append),))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, bound


async def until(cond: Callable[[], bool], within: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_pack_round_trip_and_malformed() -> None:
    frames = [b"", b"a", b"x" * 70000]
    assert peers.unpack(peers.pack(frames)) == frames
    with pytest.raises(ValueError):
        peers.unpack(peers.pack([b"abc"])[:-1])
    with pytest.raises(ValueError):
        peers.unpack(b"\x01\x00")


def test_frames_arrive_in_order_and_a_dead_peer_does_not_stall_others() -> None:
    async def main() -> None:
        received: list[bytes] = []
        server, port = await start_server(received)
        out = peers.Peers(SERVICE, queue_size=1000)
        # "dead" points at a port nobody listens on
        out.set_peers({"live": f"127.0.0.1:{port}", "dead": "127.0.0.1:1"})
        try:
            for i in range(1000):
                out.send("live", f"m{i}".encode())
                out.send("dead", b"lost")
                out.send("dead", b"lost")
                if i % 50 == 0:
                    await asyncio.sleep(0)
            await until(lambda: len(received) == 1000)
            assert received == [f"m{i}".encode() for i in range(1000)]
            stats = out.stats()
            assert stats["dead"].dropped > 0 and stats["live"].dropped == 0
            assert not out.send("nobody", b"x")
        finally:
            await out.close()
            await server.stop(None)

    asyncio.run(main())


def test_a_peer_that_restarts_gets_frames_again() -> None:
    async def main() -> None:
        received: list[bytes] = []
        server, port = await start_server(received)
        out = peers.Peers(SERVICE, backoff=(0.02, 0.1))
        out.set_peers({"p": f"127.0.0.1:{port}"})
        try:
            out.send("p", b"before")
            await until(lambda: received == [b"before"])
            await server.stop(None)
            await asyncio.sleep(0.2)
            server, _ = await start_server(received, port)

            # frames sent while it was away may be lost (Raft resends); new ones arrive
            async def delivered() -> None:
                while b"after" not in received:
                    out.send("p", b"after")
                    await asyncio.sleep(0.05)

            await asyncio.wait_for(delivered(), 5)
            assert out.stats()["p"].reconnects >= 1
        finally:
            await out.close()
            await server.stop(None)

    asyncio.run(main())


def test_moving_a_peer_reopens_its_link() -> None:
    async def main() -> None:
        a: list[bytes] = []
        b: list[bytes] = []
        server_a, port_a = await start_server(a)
        server_b, port_b = await start_server(b)
        out = peers.Peers(SERVICE)
        try:
            out.set_peers({"p": f"127.0.0.1:{port_a}"})
            out.send("p", b"1")
            await until(lambda: a == [b"1"])
            out.set_peers({"p": f"127.0.0.1:{port_b}"})
            out.send("p", b"2")
            await until(lambda: b == [b"2"])
            out.set_peers({})
            assert not out.send("p", b"3")
        finally:
            await out.close()
            await server_a.stop(None)
            await server_b.stop(None)

    asyncio.run(main())


def test_the_first_frame_after_a_long_outage_is_delivered() -> None:
    """Streams that failed while the peer was down must not keep taking frames: Raft sends a
    lone vote to a peer that just came back, and losing it cost a failover 4 s (bench/raft)."""

    async def main() -> None:
        received: list[bytes] = []
        server, port = await start_server(received)
        out = peers.Peers(SERVICE, backoff=(0.02, 0.2))
        out.set_peers({"p": f"127.0.0.1:{port}"})
        try:
            out.send("p", b"before")
            await until(lambda: received == [b"before"])
            await server.stop(None)
            await asyncio.sleep(1.5)  # quiet: the link reconnects in vain, several times
            assert out.stats()["p"].reconnects >= 3
            server, _ = await start_server(received, port)
            await asyncio.sleep(0.6)  # past the longest backoff: the link is up again
            out.send("p", b"vote")
            await until(lambda: b"vote" in received, 2.0)
        finally:
            await out.close()
            await server.stop(None)

    asyncio.run(main())


class Recorder:
    """A driver stand-in: what the transport delivers and reports."""

    def __init__(self) -> None:
        self.stepped: list[Message] = []
        self.unreachable: list[int] = []
        self.snapshots: list[tuple[int, bool]] = []

    def step(self, m: Message) -> None:
        self.stepped.append(m)

    def propose_forwarded(self, data: bytes) -> int:
        if data == b"refused":
            raise NotLeader("not the leader", 3)
        return 7

    def report_unreachable(self, peer: int) -> None:
        self.unreachable.append(peer)

    def report_snapshot(self, peer: int, ok: bool) -> None:
        self.snapshots.append((peer, ok))


def snapshot_message(to: int, size: int = 1000) -> Message:
    meta = SnapshotMeta(5, 1, ConfState(frozenset({1, 2})))
    return Message(MessageType.SNAP, to, 1, 1, snapshot=Snapshot(meta, b"s" * size))


async def start_transport_server(t: peers.GrpcTransport) -> tuple[aio.Server, int]:
    server = aio.server()
    server.add_generic_rpc_handlers(t.handlers())
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def test_messages_and_forwarded_proposals_between_transports() -> None:
    async def main() -> None:
        a, b = peers.GrpcTransport(), peers.GrpcTransport()
        ra, rb = Recorder(), Recorder()
        a.attach(ra)
        b.attach(rb)
        server, port = await start_transport_server(b)
        a.set_peers({2: f"127.0.0.1:{port}"})
        try:
            a.send(Message(MessageType.HEARTBEAT, 2, 1, 4, commit=3))
            await until(lambda: len(rb.stepped) == 1)
            assert rb.stepped[0] == Message(MessageType.HEARTBEAT, 2, 1, 4, commit=3)
            assert await a.forward(2, b"data", 2.0) == 7
            with pytest.raises(NotLeader, match="not the leader"):
                await a.forward(2, b"refused", 2.0)
            with pytest.raises(NotLeader, match="no leader known"):
                await a.forward(9, b"data", 2.0)
            assert ra.unreachable == [] and ra.snapshots == []
        finally:
            await a.close()
            await b.close()
            await server.stop(None)

    asyncio.run(main())


def test_a_malformed_frame_is_dropped_before_the_driver() -> None:
    async def main() -> None:
        b = peers.GrpcTransport()
        rb = Recorder()
        b.attach(rb)
        server, port = await start_transport_server(b)
        raw = peers.Peers(peers.RAFT_SERVICE)
        raw.set_peers({"2": f"127.0.0.1:{port}"})
        try:
            raw.send("2", b"\x01garbage")
            raw.send("2", codec.encode(Message(MessageType.HEARTBEAT, 2, 1, 4)))
            await until(lambda: len(rb.stepped) == 1)
            assert rb.stepped[0].type is MessageType.HEARTBEAT
        finally:
            await raw.close()
            await b.close()
            await server.stop(None)

    asyncio.run(main())


def test_a_snapshot_handed_to_grpc_is_reported_sent() -> None:
    async def main() -> None:
        a, b = peers.GrpcTransport(), peers.GrpcTransport()
        ra, rb = Recorder(), Recorder()
        a.attach(ra)
        b.attach(rb)
        server, port = await start_transport_server(b)
        a.set_peers({2: f"127.0.0.1:{port}"})
        try:
            a.send(snapshot_message(2, 1 << 20))
            await until(lambda: bool(ra.snapshots))
            assert ra.snapshots == [(2, True)] and ra.unreachable == []
            await until(lambda: len(rb.stepped) == 1)
            assert rb.stepped[0].snapshot is not None
        finally:
            await a.close()
            await b.close()
            await server.stop(None)

    asyncio.run(main())


def test_a_dead_peer_is_reported_unreachable_and_its_snapshot_lost() -> None:
    async def main() -> None:
        a = peers.GrpcTransport(backoff=(0.02, 0.1))
        ra = Recorder()
        a.attach(ra)
        a.set_peers({2: "127.0.0.1:1"})  # nobody listens there
        try:
            a.send(snapshot_message(2))
            await until(lambda: (2, False) in ra.snapshots)
            assert 2 in ra.unreachable and (2, True) not in ra.snapshots
            # each broken stream says so again, queued messages or not
            seen = len(ra.unreachable)
            await until(lambda: len(ra.unreachable) > seen)
            # and a message to a peer without an address is lost at once
            a.send(Message(MessageType.APP, 3, 1, 1))
            assert ra.unreachable[-1] == 3
        finally:
            await a.close()

    asyncio.run(main())


def test_a_full_queue_reports_the_peer_unreachable() -> None:
    async def main() -> None:
        a = peers.GrpcTransport(queue_size=2, backoff=(5.0, 5.0))
        ra = Recorder()
        a.attach(ra)
        a.set_peers({2: "127.0.0.1:1"})
        try:
            for _ in range(3):  # sent before the link's task even ran: the third finds it full
                a.send(Message(MessageType.APP, 2, 1, 1))
            assert ra.unreachable == [2]
            assert a.stats()["2"].dropped == 1
        finally:
            await a.close()

    asyncio.run(main())
