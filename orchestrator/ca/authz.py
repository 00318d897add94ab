"""Authorization: which caller may call which RPC, decided from its certificate.

swarmkit annotates every gRPC method with the roles allowed to call it
(`tls_authorization = { roles: "swarm-manager" }`) and checks the peer certificate's OU and O
on each call. Here a `Policy` maps methods to an `Access` level, and `AuthInterceptor` enforces
it on every call of a grpc.aio server before the handler runs:

- `JOIN`: callable without a certificate (the join port's RPCs); a caller that does present
  one (a member renewing on the control port) is still checked against the cluster and the
  deny list.
- `NODES`: any member, worker or manager.
- `MANAGERS`: managers only (Raft, control, the unlock key).

A method the policy does not name is refused: forgetting a rule fails closed. Refusals are
logged with the caller and the reason, and the caller gets a status that says why.
"""

from __future__ import annotations

import enum
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

import grpc
from grpc import aio

from orchestrator.ca.pki import Identity
from orchestrator.ca.tls import peer_identity
from orchestrator.store.objects import Role

log = logging.getLogger(__name__)

Context = aio.ServicerContext[Any, Any]
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


class Access(enum.Enum):
    JOIN = "join"
    NODES = "nodes"
    MANAGERS = "managers"


@dataclass(frozen=True)
class Policy:
    """`{"/shoal.Raft/*": Access.MANAGERS, "/shoal.CA/GetRootCACertificate": Access.JOIN}`:
    an exact method wins over its service's `*`."""

    rules: Mapping[str, Access]

    def access(self, method: str) -> Access | None:
        if method in self.rules:
            return self.rules[method]
        service, sep, _ = method.rpartition("/")
        return self.rules.get(f"{service}/*") if sep else None


@dataclass(frozen=True)
class DenyList:
    """Certificates refused although they verify: those of removed nodes.

    By node ID (swarmkit's BlacklistedCertificates), until the last certificate issued to that
    node has expired, after which the entry is useless and can be pruned; and by serial, for a
    single certificate (a leaked key) without banning the node.
    """

    node_ids: Mapping[str, datetime | None] = field(default_factory=dict)
    serials: frozenset[int] = frozenset()

    def reason(self, identity: Identity, now: datetime | None = None) -> str | None:
        if identity.node_id in self.node_ids:
            until = self.node_ids[identity.node_id]
            if until is None or (now or datetime.now(UTC)) < until:
                return f"node {identity.node_id} was removed from the swarm"
        if identity.serial in self.serials:
            return f"certificate {identity.serial:x} of node {identity.node_id} was revoked"
        return None

    def with_node(self, node_id: str, until: datetime | None) -> DenyList:
        return DenyList(node_ids={**self.node_ids, node_id: until}, serials=self.serials)

    def with_serial(self, serial: int) -> DenyList:
        return DenyList(node_ids=self.node_ids, serials=self.serials | {serial})

    def pruned(self, now: datetime) -> DenyList:
        """Without node entries whose certificates have all expired (TLS refuses those)."""
        return DenyList(
            node_ids={n: t for n, t in self.node_ids.items() if t is None or t > now},
            serials=self.serials,
        )


@dataclass(frozen=True)
class Refusal(Exception):
    code: grpc.StatusCode
    message: str

    def __str__(self) -> str:
        return self.message


def _no_deny_list() -> DenyList:
    return DenyList()


@dataclass(frozen=True)
class Authorizer:
    """The decision, apart from gRPC so it can be tested and reused (e.g. by the CA service to
    refuse a renewal). `deny_list` is read on every call: it is the store's current list."""

    cluster_id: str
    policy: Policy
    deny_list: Callable[[], DenyList] = _no_deny_list

    def check(self, method: str, identity: Identity | None, now: datetime | None = None) -> None:
        access = self.policy.access(method)
        if access is None:
            raise Refusal(grpc.StatusCode.PERMISSION_DENIED, f"{method} is not open to any caller")
        if identity is None:
            if access is Access.JOIN:
                return
            raise Refusal(
                grpc.StatusCode.UNAUTHENTICATED,
                f"{method} needs a swarm node certificate (only the join RPCs are open without)",
            )
        if identity.cluster_id != self.cluster_id:
            raise Refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                f"certificate of node {identity.node_id} belongs to swarm {identity.cluster_id}, "
                f"not {self.cluster_id}",
            )
        now = now or datetime.now(UTC)
        if identity.not_after <= now:
            # TLS checks validity once, at the handshake; an HTTP/2 connection can outlive the
            # certificate it was opened with, so each call checks again.
            raise Refusal(
                grpc.StatusCode.UNAUTHENTICATED,
                f"the certificate of node {identity.node_id} expired at {identity.not_after}",
            )
        denied = self.deny_list().reason(identity, now)
        if denied is not None:
            raise Refusal(grpc.StatusCode.PERMISSION_DENIED, denied)
        if access is Access.MANAGERS and identity.role is not Role.MANAGER:
            raise Refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method} is for managers; node {identity.node_id} is a {identity.role.value}",
            )


class AuthInterceptor(aio.ServerInterceptor):
    """Runs `Authorizer.check` at the start of every call, with the caller's certificate.

    A server interceptor sees only the method name, not the peer, so it wraps the handler: the
    wrapper gets the call's context, checks, and aborts or runs the real handler. Streaming
    handlers keep their shape (async generator or coroutine writing to the context), since
    grpc.aio tells them apart by type.
    """

    def __init__(self, authorizer: Authorizer) -> None:
        self.authorizer = authorizer

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[_Req, _Resp] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[_Req, _Resp] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # unknown method: gRPC answers UNIMPLEMENTED
        method = handler_call_details.method
        return cast(
            "grpc.RpcMethodHandler[_Req, _Resp]",  # a string: the class is not generic at runtime
            _wrap(handler, lambda ctx: self._admit(method, ctx)),
        )

    async def _admit(self, method: str, context: Context) -> None:
        identity = peer_identity(context)
        try:
            self.authorizer.check(method, identity)
        except Refusal as r:
            who = "no certificate" if identity is None else f"{identity.role} {identity.node_id}"
            log.warning("refused %s from %s (%s): %s", method, context.peer(), who, r.message)
            await context.abort(r.code, r.message)


Admit = Callable[[Context], Awaitable[None]]


def _wrap(handler: Any, admit: Admit) -> Any:
    h = cast(Any, handler)  # the stubs type the behaviours as optional sync callables
    ser = {
        "request_deserializer": h.request_deserializer,
        "response_serializer": h.response_serializer,
    }
    if h.unary_unary is not None:
        fn = h.unary_unary

        async def unary_unary(request: Any, context: Context) -> Any:
            await admit(context)
            return await fn(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **ser)
    if h.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(_wrap_streaming(h.unary_stream, admit), **ser)
    if h.stream_unary is not None:
        fn_su = h.stream_unary

        async def stream_unary(requests: Any, context: Context) -> Any:
            await admit(context)
            return await fn_su(requests, context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, **ser)
    if h.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(_wrap_streaming(h.stream_stream, admit), **ser)
    return handler


def _wrap_streaming(fn: Any, admit: Admit) -> Any:
    """A response-streaming behaviour is either an async generator, or a coroutine that
    writes with `context.write`; the wrapper must be the same kind."""
    if inspect.isasyncgenfunction(fn):

        async def gen(request: Any, context: Context) -> AsyncIterator[Any]:
            await admit(context)
            async for item in fn(request, context):
                yield item

        return gen

    async def coro(request: Any, context: Context) -> Any:
        await admit(context)
        result = fn(request, context)
        if inspect.isawaitable(result):
            return await result
        # A callable that returns an iterator (grpc.aio would iterate it): write it ourselves.
        if inspect.isasyncgen(result):
            async for item in result:
                await context.write(item)
        else:
            for item in cast(Iterable[Any], result or ()):
                await context.write(item)
        return None

    return coro
