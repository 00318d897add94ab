"""gRPC with JSON messages: the control plane's wire format.

Services are plain async functions registered by name; messages are JSON objects. gRPC gives
the transport (HTTP/2 streams, deadlines, flow control, mutual TLS from orchestrator/ca/tls.py);
JSON keeps messages readable in logs and captures, and avoids a protobuf build step.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from grpc import aio

Message = dict[str, Any]
Context = aio.ServicerContext[Message, Message]
Unary = Callable[[Message, Context], Awaitable[Message]]
Streaming = Callable[[Message, Context], AsyncIterator[Message]]

MAX_MESSAGE = 64 << 20
KEEPALIVE_MS = 10_000
Options = list[tuple[str, int]]


def client_options(keepalive_ms: int = KEEPALIVE_MS) -> Options:
    """A channel pings its server every keepalive_ms, idle or not, and gives it half as long
    to answer: a manager that vanished is noticed in seconds, not at the OS's TCP timeout."""
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", keepalive_ms // 2),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def server_options(keepalive_ms: int = KEEPALIVE_MS) -> Options:
    """A server that accepts its clients' pings. gRPC's default policy counts a ping less than
    5 minutes after the last one, on a connection it has sent nothing on since, as a strike,
    and closes the connection (GOAWAY too_many_pings) at the third: an agent's session, idle
    between assignments, dropped every ~30 s. Half the clients' interval leaves room for a
    late timer."""
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.keepalive_permit_without_calls", 1),
        # gRPC's GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS
        ("grpc.http2.min_ping_interval_without_data_ms", keepalive_ms // 2),
    ]


OPTIONS = client_options()


def _encode(msg: Message) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode()


def _decode(raw: bytes) -> Message:
    msg = json.loads(raw)
    if not isinstance(msg, dict):
        raise ValueError("a message must be a JSON object")
    return msg


def service(
    name: str, unary: dict[str, Unary] | None = None, streaming: dict[str, Streaming] | None = None
) -> grpc.GenericRpcHandler:
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method, fn in (unary or {}).items():
        handlers[method] = grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=_decode, response_serializer=_encode
        )
    for method, sfn in (streaming or {}).items():
        handlers[method] = grpc.unary_stream_rpc_method_handler(
            sfn, request_deserializer=_decode, response_serializer=_encode
        )
    return grpc.method_handlers_generic_handler(name, handlers)


class Client:
    """Calls on one channel: `await client.call("shoal.Dispatcher", "Heartbeat", {...})`."""

    def __init__(self, target: str, channel: aio.Channel | None = None):
        self.target = target
        self.channel = channel or aio.insecure_channel(target, options=OPTIONS)

    async def call(self, svc: str, method: str, msg: Message, deadline: float = 10.0) -> Message:
        fn = self.channel.unary_unary(
            f"/{svc}/{method}", request_serializer=_encode, response_deserializer=_decode
        )
        result: Message = await fn(msg, timeout=deadline)
        return result

    def stream(self, svc: str, method: str, msg: Message) -> Any:
        fn = self.channel.unary_stream(
            f"/{svc}/{method}", request_serializer=_encode, response_deserializer=_decode
        )
        return fn(msg)

    async def close(self) -> None:
        await self.channel.close()


def server(
    interceptors: Sequence[aio.ServerInterceptor] = (), keepalive_ms: int = KEEPALIVE_MS
) -> aio.Server:
    return aio.server(options=server_options(keepalive_ms), interceptors=list(interceptors))
