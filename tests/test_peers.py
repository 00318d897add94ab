"""Manager-to-manager message streams (orchestrator/rpc/peers.py) over real gRPC on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from grpc import aio

from orchestrator.rpc import peers

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
