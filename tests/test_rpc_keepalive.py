"""A session idle for longer than gRPC's ping-strike window stays up (orchestrator/rpc/jsonrpc.py).

An agent's session is a server stream that can carry nothing for minutes while its channel
pings every KEEPALIVE_MS. The clock is scaled down (1 s pings instead of 10 s; the server's
policy is derived from the same number in production), and the same idle stream against
gRPC's default server policy shows what the test guards against: the third early ping ends
the connection with GOAWAY too_many_pings.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc
from grpc import aio

from orchestrator.rpc import jsonrpc

KEEPALIVE_MS = 1_000
IDLE_SECONDS = 6.0  # six pings: gRPC's default policy ends the connection at the third


async def _idle_stream(make_server: Callable[[], aio.Server]) -> str:
    """Open a stream, let it sit idle for IDLE_SECONDS, and say how it ended."""
    server = make_server()

    async def watch(msg: jsonrpc.Message, ctx: jsonrpc.Context) -> AsyncIterator[jsonrpc.Message]:
        yield {"n": 1}
        await asyncio.sleep(IDLE_SECONDS)
        yield {"n": 2}

    server.add_generic_rpc_handlers([jsonrpc.service("test.Idle", streaming={"Watch": watch})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = aio.insecure_channel(
        f"127.0.0.1:{port}", options=jsonrpc.client_options(KEEPALIVE_MS)
    )
    client = jsonrpc.Client("", channel)
    try:
        got = [m["n"] async for m in client.stream("test.Idle", "Watch", {})]
        return f"received {got}"
    except grpc.RpcError as e:
        return f"{e.code().name}: {e.details()}"
    finally:
        await client.close()
        await server.stop(None)


def test_an_idle_session_outlives_the_ping_strike_window() -> None:
    assert (
        asyncio.run(_idle_stream(lambda: jsonrpc.server(keepalive_ms=KEEPALIVE_MS)))
        == "received [1, 2]"
    )


def test_gRPCs_default_ping_policy_drops_the_same_idle_session() -> None:
    ended = asyncio.run(_idle_stream(lambda: aio.server(options=[])))
    assert ended.startswith("UNAVAILABLE"), ended
