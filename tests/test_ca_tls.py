"""Real grpc.aio servers and clients on 127.0.0.1: mutual TLS, the join flow, authorization,
renewal and root rotation without restarts, and the gRPC facts docs/security.md relies on."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from grpc import aio

from orchestrator.ca import tls
from orchestrator.ca.authz import Access, AuthInterceptor, Authorizer, DenyList, Policy
from orchestrator.ca.pki import (
    Identity,
    Issuer,
    NodeCSR,
    PKIError,
    RootCA,
    RootRotation,
    certs_from_pem,
    certs_to_pem,
    verify_chain,
)
from orchestrator.ca.tokens import JoinToken, TokenError, role_for_token
from orchestrator.store.objects import Role

T = TypeVar("T")
Msg = dict[str, Any]
Ctx = aio.ServicerContext[Any, Any]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 20))


def _enc(m: Msg) -> bytes:
    return json.dumps(m).encode()


def _dec(b: bytes) -> Msg:
    out: Msg = json.loads(b)
    return out


# ---- a small swarm: its PKI, and a manager serving a control port and a join port ----------

POLICY = Policy(
    {
        "/shoal.CA/GetRootCACertificate": Access.JOIN,
        "/shoal.CA/IssueNodeCertificate": Access.JOIN,
        "/shoal.Dispatcher/*": Access.NODES,
        "/shoal.Raft/*": Access.MANAGERS,
    }
)


@dataclass
class Swarm:
    cluster_id: str = "cluster1"
    root: RootCA = field(default_factory=RootCA.create)
    rotation: RootRotation | None = None
    deny: DenyList = field(default_factory=DenyList)
    worker_token: str = ""
    manager_token: str = ""
    issued: int = 0

    def __post_init__(self) -> None:
        self.worker_token = str(JoinToken.generate(self.root))
        self.manager_token = str(JoinToken.generate(self.root))

    def issuer(self) -> Issuer:
        return self.rotation.issuer() if self.rotation else self.root.issuer()

    def creds(
        self,
        role: Role,
        node_id: str,
        *,
        issuer: Issuer | None = None,
        trust: bytes | None = None,
        now: datetime | None = None,
    ) -> tls.NodeCredentials:
        csr = NodeCSR.generate()
        chain = (issuer or self.issuer()).sign_csr(
            csr.pem, node_id=node_id, role=role, cluster_id=self.cluster_id, now=now
        )
        return tls.NodeCredentials(csr.key_pem, chain, trust or self.root.cert_pem)


@dataclass
class Manager:
    """A stand-in for shoald's manager: the CA's RPCs and two toy services behind our
    credentials and interceptor, as shoald will arrange them."""

    swarm: Swarm
    source: tls.CredentialsSource
    control_port: int = 0
    join_port: int = 0
    tokens_seen: list[str] = field(default_factory=list)
    servers: list[aio.Server] = field(default_factory=list)
    join_handlers_everywhere: bool = False

    @property
    def control(self) -> str:
        return f"127.0.0.1:{self.control_port}"

    @property
    def join(self) -> str:
        return f"127.0.0.1:{self.join_port}"

    # -- the CA service
    async def get_root(self, _: Msg, ctx: Ctx) -> Msg:
        return {"root": self.swarm.root.cert_pem.decode()}

    async def issue(self, req: Msg, ctx: Ctx) -> Msg:
        caller = tls.peer_identity(ctx)
        if caller is not None:  # a member renewing: same node, its current role
            node_id, role = caller.node_id, caller.role
        else:
            self.tokens_seen.append(req.get("token", ""))
            try:
                role = role_for_token(
                    req.get("token", ""),
                    worker=self.swarm.worker_token,
                    manager=self.swarm.manager_token,
                )
            except TokenError as e:
                await ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            self.swarm.issued += 1
            node_id = f"node{self.swarm.issued}"
        chain = self.swarm.issuer().sign_csr(
            req["csr"].encode(), node_id=node_id, role=role, cluster_id=self.swarm.cluster_id
        )
        return {"chain": chain.decode()}

    # -- toy services
    async def heartbeat(self, _: Msg, ctx: Ctx) -> Msg:
        ident = tls.peer_identity(ctx)
        assert ident is not None
        return {"node_id": ident.node_id}

    async def session(self, req: Msg, ctx: Ctx) -> AsyncIterator[Msg]:
        for i in range(req["count"]):
            await asyncio.sleep(req["every"])
            yield {"i": i}

    async def raft(self, _: Msg, ctx: Ctx) -> Msg:
        return {"ok": True}

    def _ca_handlers(self) -> grpc.GenericRpcHandler:
        def u(fn: Any) -> grpc.RpcMethodHandler[Any, Any]:
            return grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=_dec, response_serializer=_enc
            )

        return grpc.method_handlers_generic_handler(
            "shoal.CA",
            {"GetRootCACertificate": u(self.get_root), "IssueNodeCertificate": u(self.issue)},
        )

    def _member_handlers(self) -> list[grpc.GenericRpcHandler]:
        def u(fn: Any) -> grpc.RpcMethodHandler[Any, Any]:
            return grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=_dec, response_serializer=_enc
            )

        return [
            grpc.method_handlers_generic_handler(
                "shoal.Dispatcher",
                {
                    "Heartbeat": u(self.heartbeat),
                    "Session": grpc.unary_stream_rpc_method_handler(
                        self.session, request_deserializer=_dec, response_serializer=_enc
                    ),
                },
            ),
            grpc.method_handlers_generic_handler("shoal.Raft", {"Append": u(self.raft)}),
        ]

    async def start(self) -> Manager:
        authz = Authorizer(self.swarm.cluster_id, POLICY, lambda: self.swarm.deny)
        control = aio.server(interceptors=[AuthInterceptor(authz)])
        control.add_generic_rpc_handlers([self._ca_handlers(), *self._member_handlers()])
        self.control_port = control.add_secure_port(
            "127.0.0.1:0", self.source.control_server_credentials()
        )
        join = aio.server(interceptors=[AuthInterceptor(authz)])
        join.add_generic_rpc_handlers(
            [self._ca_handlers()]
            + (self._member_handlers() if self.join_handlers_everywhere else [])
        )
        self.join_port = join.add_secure_port("127.0.0.1:0", self.source.join_server_credentials())
        for s in (control, join):
            await s.start()
            self.servers.append(s)
        return self

    async def stop(self) -> None:
        for s in self.servers:
            await s.stop(None)


async def start_manager(swarm: Swarm, **kw: Any) -> Manager:
    creds = swarm.creds(Role.MANAGER, "mgr")
    return await Manager(swarm, tls.CredentialsSource(creds), **kw).start()


async def call(channel: aio.Channel, method: str, msg: Msg | None = None) -> Msg:
    fn = channel.unary_unary(method, request_serializer=_enc, response_deserializer=_dec)
    result: Msg = await fn(msg or {}, timeout=5)
    return result


async def refused(fn: Callable[[], Awaitable[Any]], code: grpc.StatusCode, match: str = "") -> str:
    try:
        await fn()
    except aio.AioRpcError as e:
        assert e.code() == code, (e.code(), e.details())
        assert match in (e.details() or ""), e.details()
        return e.details() or ""
    raise AssertionError(f"expected {code}")


async def echo_call(channel: aio.Channel) -> bytes:
    fn: aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary("/t.S/E")
    return await fn(b"", timeout=5)


async def heartbeat(target: str, creds: tls.NodeCredentials) -> Msg:
    async with tls.member_channel(target, creds) as ch:
        return await call(ch, "/shoal.Dispatcher/Heartbeat")


async def get_root_pem(channel: aio.Channel) -> bytes:
    reply = await call(channel, "/shoal.CA/GetRootCACertificate")
    return str(reply["root"]).encode()


async def join(target: str, token: str) -> tls.NodeCredentials:
    """The joining node's side, end to end: pin the CA, then CSR + token over verified TLS."""
    parsed = JoinToken.parse(token)
    root = await tls.fetch_root_ca(target, parsed, get_root_pem)
    csr = NodeCSR.generate()
    async with tls.join_channel(target, root) as ch:
        reply = await call(
            ch, "/shoal.CA/IssueNodeCertificate", {"csr": csr.pem.decode(), "token": token}
        )
    chain = reply["chain"].encode()
    verify_chain(chain, root)  # trust, but verify: what the manager handed us is ours
    return tls.NodeCredentials(csr.key_pem, chain, root.cert_pem)


# ---- mutual TLS on the control port --------------------------------------------------------


def test_members_call_with_their_certificate_and_the_server_knows_who() -> None:
    async def main() -> None:
        swarm = Swarm()
        m = await start_manager(swarm)
        try:
            worker = swarm.creds(Role.WORKER, "w1")
            assert (await heartbeat(m.control, worker)) == {"node_id": "w1"}
        finally:
            await m.stop()

    run(main())


def test_control_port_refuses_clients_without_a_verified_certificate(tmp_path: Path) -> None:
    async def main() -> None:
        swarm = Swarm()
        m = await start_manager(swarm)
        try:
            # No certificate: the handshake fails, no RPC runs.
            async with tls.secure_channel(
                m.control, grpc.ssl_channel_credentials(swarm.root.cert_pem)
            ) as ch:
                await refused(
                    lambda: call(ch, "/shoal.CA/GetRootCACertificate"), grpc.StatusCode.UNAVAILABLE
                )
            # A certificate from another swarm's CA.
            stranger = Swarm().creds(Role.MANAGER, "x")
            await refused(
                lambda: heartbeat(m.control, replace(stranger, trust_pem=swarm.root.cert_pem)),
                grpc.StatusCode.UNAVAILABLE,
            )
            # Our CA, but expired: refused by the handshake, not by our code.
            expired = swarm.creds(Role.MANAGER, "old", now=datetime.now(UTC) - timedelta(days=91))
            assert expired.identity.not_after < datetime.now(UTC)
            await refused(lambda: heartbeat(m.control, expired), grpc.StatusCode.UNAVAILABLE)
            # Plain gRPC (no TLS) on the TLS port.
            async with aio.insecure_channel(m.control) as ch:
                await refused(
                    lambda: call(ch, "/shoal.CA/GetRootCACertificate"), grpc.StatusCode.UNAVAILABLE
                )
        finally:
            await m.stop()
        assert swarm.issued == 0

    run(main())


def test_plain_tcp_gets_nothing_from_the_tls_ports() -> None:
    async def main() -> None:
        m = await start_manager(Swarm())
        try:
            for port in (m.control_port, m.join_port):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                # An HTTP/2 client preface and an empty SETTINGS frame, as h2c would start.
                writer.write(
                    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
                )
                await writer.drain()
                data = await asyncio.wait_for(reader.read(4096), 5)
                # The server closes, at most with a TLS alert (0x15): never an HTTP/2 frame.
                assert data == b"" or data[0] == 0x15, data[:16]
                writer.close()
        finally:
            await m.stop()

    run(main())


def test_clients_refuse_a_server_with_an_expired_or_foreign_certificate() -> None:
    async def main() -> None:
        swarm = Swarm()
        client = swarm.creds(Role.WORKER, "w1")
        expired = swarm.creds(Role.MANAGER, "m", now=datetime.now(UTC) - timedelta(days=91))
        foreign = replace(Swarm().creds(Role.MANAGER, "m"), trust_pem=swarm.root.cert_pem)
        worker_as_server = swarm.creds(Role.WORKER, "w2")  # no "swarm-manager" name
        for server_creds in (expired, foreign, worker_as_server):
            m = await Manager(swarm, tls.CredentialsSource(server_creds)).start()
            try:
                await refused(partial(heartbeat, m.control, client), grpc.StatusCode.UNAVAILABLE)
            finally:
                await m.stop()

    run(main())


# ---- TLS versions and ciphers (gRPC core's defaults; Python cannot set them) ----------------


def _raw_tls(
    port: int, tmp: Path, creds: tls.NodeCredentials | None, **ctx_kw: Any
) -> tuple[str | None, tuple[str, str, int] | None]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    for k, v in ctx_kw.items():
        if k == "ciphers":
            ctx.set_ciphers(v)
        else:
            setattr(ctx, k, v)
    if creds is not None:
        (tmp / "c.pem").write_bytes(creds.chain_pem)
        (tmp / "k.pem").write_bytes(creds.key_pem)
        ctx.load_cert_chain(tmp / "c.pem", tmp / "k.pem")
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
        ctx.wrap_socket(sock) as t,
    ):
        t.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        return t.version(), t.cipher()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls_13_preferred_12_accepted_older_and_weak_ciphers_refused(tmp_path: Path) -> None:
    async def main() -> None:
        swarm = Swarm()
        m = await start_manager(swarm)
        member = swarm.creds(Role.WORKER, "w1")
        try:
            for port, creds in ((m.control_port, member), (m.join_port, None)):
                version, _ = await asyncio.to_thread(_raw_tls, port, tmp_path, creds)
                assert version == "TLSv1.3"
                version, cipher = await asyncio.to_thread(
                    _raw_tls, port, tmp_path, creds, maximum_version=ssl.TLSVersion.TLSv1_2
                )
                assert version == "TLSv1.2" and cipher is not None and "GCM" in cipher[0]
                with pytest.raises((ssl.SSLError, ConnectionError)):
                    await asyncio.to_thread(
                        _raw_tls,
                        port,
                        tmp_path,
                        creds,
                        minimum_version=ssl.TLSVersion.MINIMUM_SUPPORTED,
                        maximum_version=ssl.TLSVersion.TLSv1_1,
                        ciphers="ALL:@SECLEVEL=0",
                    )
                with pytest.raises((ssl.SSLError, ConnectionError)):  # CBC, no forward secrecy
                    await asyncio.to_thread(
                        _raw_tls,
                        port,
                        tmp_path,
                        creds,
                        maximum_version=ssl.TLSVersion.TLSv1_2,
                        ciphers="AES128-SHA:ECDHE-ECDSA-AES128-SHA",
                    )
        finally:
            await m.stop()

    run(main())


# ---- the one-port question: what Python's gRPC can and cannot do ---------------------------


def test_without_required_client_auth_the_server_never_sees_a_client_certificate() -> None:
    """Go's VerifyClientCertIfGiven has no Python equivalent: require_client_auth=False means
    "don't even ask" (GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE), root_certificates or not. A
    member's certificate is not sent, so one port cannot both admit joiners and know members."""

    async def main() -> None:
        swarm = Swarm()
        mgr = swarm.creds(Role.MANAGER, "m")
        seen: list[dict[str, list[bytes]]] = []

        async def echo(req: bytes, ctx: Ctx) -> bytes:
            seen.append({k: list(v) for k, v in ctx.auth_context().items()})
            return b"ok"

        for require in (False, True):
            server = aio.server()
            server.add_generic_rpc_handlers(
                [
                    grpc.method_handlers_generic_handler(
                        "t.S", {"E": grpc.unary_unary_rpc_method_handler(echo)}
                    )
                ]
            )
            creds = grpc.ssl_server_credentials(
                [(mgr.key_pem, mgr.chain_pem)], swarm.root.cert_pem, require_client_auth=require
            )
            port = server.add_secure_port("127.0.0.1:0", creds)
            await server.start()
            member = swarm.creds(Role.WORKER, "w1")
            async with tls.member_channel(f"127.0.0.1:{port}", member) as ch:
                assert await echo_call(ch) == b"ok"
            async with tls.secure_channel(
                f"127.0.0.1:{port}", grpc.ssl_channel_credentials(swarm.root.cert_pem)
            ) as anonymous:
                if require:
                    await refused(lambda: echo_call(anonymous), grpc.StatusCode.UNAVAILABLE)
                else:
                    assert await echo_call(anonymous) == b"ok"
            await server.stop(None)
        with_cert_not_required, no_cert_not_required, with_cert_required = seen
        assert "x509_pem_cert" not in with_cert_not_required  # sent a certificate: not asked for
        assert "x509_pem_cert" not in no_cert_not_required
        assert with_cert_required["x509_common_name"] == [b"w1"]
        assert with_cert_required["x509_subject"] == [b"CN=w1,OU=swarm-worker,O=cluster1"]
        assert with_cert_required["ssl_tls_version"] == [b"TLSv1.3"]

    run(main())


def test_dynamic_credentials_are_consulted_once_per_new_connection() -> None:
    """grpc.dynamic_ssl_server_credentials calls its fetcher before each new TLS handshake (not
    per RPC); None means "unchanged". That is what lets a renewal or a root rotation reach a
    running server at its next connection and at no cost in between."""

    async def main() -> None:
        swarm = Swarm()
        mgr = swarm.creds(Role.MANAGER, "m")
        calls: list[int] = []

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            calls.append(1)
            return None

        async def echo(req: bytes, ctx: Ctx) -> bytes:
            return b"ok"

        server = aio.server()
        server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    "t.S", {"E": grpc.unary_unary_rpc_method_handler(echo)}
                )
            ]
        )
        initial = grpc.ssl_server_certificate_configuration(
            [(mgr.key_pem, mgr.chain_pem)], swarm.root.cert_pem
        )
        port = server.add_secure_port(
            "127.0.0.1:0",
            # grpc-stubs type the fetcher as never returning None; grpc documents None as "keep
            # the current configuration", which is what this test relies on
            grpc.dynamic_ssl_server_credentials(initial, fetch, require_client_authentication=True),  # type: ignore[arg-type]
        )
        await server.start()
        member = swarm.creds(Role.WORKER, "w")
        try:
            for connection in range(3):
                async with tls.member_channel(f"127.0.0.1:{port}", member) as ch:
                    for _ in range(3):
                        assert await echo_call(ch) == b"ok"
                assert len(calls) == connection + 1
        finally:
            await server.stop(None)

    run(main())


# ---- the join flow -------------------------------------------------------------------------


def test_a_node_joins_with_a_token_and_then_speaks_mutual_tls() -> None:
    async def main() -> None:
        swarm = Swarm()
        m = await start_manager(swarm)
        try:
            assert tls.join_address("127.0.0.1:2377") == "127.0.0.1:2378"
            worker = await join(m.join, swarm.worker_token)
            assert worker.identity.role is Role.WORKER
            assert worker.identity.cluster_id == "cluster1"
            assert (await heartbeat(m.control, worker))["node_id"] == worker.identity.node_id
            manager = await join(m.join, swarm.manager_token)
            assert manager.identity.role is Role.MANAGER
            async with tls.member_channel(m.control, manager) as ch:
                assert await call(ch, "/shoal.Raft/Append") == {"ok": True}
            # A worker cannot call manager-only RPCs.
            async with tls.member_channel(m.control, worker) as ch:
                await refused(
                    lambda: call(ch, "/shoal.Raft/Append"),
                    grpc.StatusCode.PERMISSION_DENIED,
                    "for managers",
                )
        finally:
            await m.stop()

    run(main())


def test_join_refusals() -> None:
    async def main() -> None:
        swarm = Swarm()
        m = await start_manager(swarm)
        try:
            bad_secret = swarm.worker_token[:-5] + "00000"
            await refused(
                lambda: join(m.join, bad_secret),
                grpc.StatusCode.INVALID_ARGUMENT,
                "A valid join token is necessary",
            )
            rotated_away = swarm.worker_token
            swarm.worker_token = str(JoinToken.generate(swarm.root))  # join-token --rotate worker
            await refused(
                lambda: join(m.join, rotated_away),
                grpc.StatusCode.INVALID_ARGUMENT,
                "A valid join token is necessary",
            )
            assert (await join(m.join, swarm.worker_token)).identity.role is Role.WORKER
            # A token of another swarm: its digest names another CA; nothing is sent.
            seen = len(m.tokens_seen)
            with pytest.raises(TokenError, match="does not match the fingerprint"):
                await join(m.join, Swarm().worker_token)
            assert len(m.tokens_seen) == seen
            with pytest.raises(TokenError, match="does not start with SWMTKN-"):
                await join(m.join, "hello")
        finally:
            await m.stop()

    run(main())


def test_a_man_in_the_middle_never_gets_the_token() -> None:
    async def main() -> None:
        swarm = Swarm()
        token = swarm.worker_token
        # An impostor with a CA of its own, serving its own root: the pin catches it.
        impostor = await start_manager(Swarm())
        # A smarter impostor serving the real (public) root: the pin passes, but its
        # certificate does not chain to that root, so the token is never sent to it.
        clever_swarm = Swarm()
        clever = await start_manager(clever_swarm)
        clever_swarm.root = RootCA.from_pem(swarm.root.cert_pem)
        try:
            with pytest.raises(TokenError, match="does not match the fingerprint"):
                await join(impostor.join, token)
            await refused(lambda: join(clever.join, token), grpc.StatusCode.UNAVAILABLE)
            assert impostor.tokens_seen == [] and clever.tokens_seen == []
        finally:
            await impostor.stop()
            await clever.stop()

    run(main())


def test_the_join_port_serves_only_the_join_rpcs() -> None:
    async def main() -> None:
        swarm = Swarm()
        member = swarm.creds(Role.MANAGER, "m2")
        # Even if a daemon registered everything on the join port by mistake, the interceptor
        # refuses whatever needs an identity: there is no client certificate there, ever.
        m = await start_manager(swarm, join_handlers_everywhere=True)
        plain = await start_manager(swarm)
        try:
            async with tls.join_channel(m.join, swarm.root) as ch:
                assert (await get_root_pem(ch)) == swarm.root.cert_pem
                await refused(
                    lambda: call(ch, "/shoal.Dispatcher/Heartbeat"),
                    grpc.StatusCode.UNAUTHENTICATED,
                    "needs a swarm node certificate",
                )
            async with tls.member_channel(m.join, member) as ch:  # a certificate changes nothing
                await refused(
                    lambda: call(ch, "/shoal.Raft/Append"), grpc.StatusCode.UNAUTHENTICATED
                )
            async with tls.join_channel(plain.join, swarm.root) as ch:
                await refused(lambda: call(ch, "/shoal.Raft/Append"), grpc.StatusCode.UNIMPLEMENTED)
        finally:
            await m.stop()
            await plain.stop()

    run(main())


# ---- renewal, removal, and rotation without restarts ---------------------------------------


def test_renewal_over_mutual_tls_keeps_the_node_id() -> None:
    async def main() -> None:
        swarm = Swarm()
        m = await start_manager(swarm)
        try:
            worker = await join(m.join, swarm.worker_token)
            csr = NodeCSR.generate()
            async with tls.member_channel(m.control, worker) as ch:
                reply = await call(ch, "/shoal.CA/IssueNodeCertificate", {"csr": csr.pem.decode()})
            renewed = worker.with_chain(csr.key_pem, reply["chain"].encode())
            assert renewed.identity.node_id == worker.identity.node_id
            assert renewed.identity.serial != worker.identity.serial
            assert (await heartbeat(m.control, renewed))["node_id"] == worker.identity.node_id
        finally:
            await m.stop()

    run(main())


def test_a_removed_node_is_refused_although_its_certificate_verifies(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        swarm = Swarm()
        m = await start_manager(swarm)
        try:
            worker = await join(m.join, swarm.worker_token)
            await heartbeat(m.control, worker)
            ident = worker.identity
            swarm.deny = swarm.deny.with_node(ident.node_id, ident.not_after)  # node rm
            with caplog.at_level(logging.WARNING, logger="orchestrator.ca.authz"):
                await refused(
                    lambda: heartbeat(m.control, worker),
                    grpc.StatusCode.PERMISSION_DENIED,
                    "was removed from the swarm",
                )
            assert "refused /shoal.Dispatcher/Heartbeat from ipv4:127.0.0.1" in caplog.text
            assert f"(worker {ident.node_id}): node {ident.node_id} was removed" in caplog.text
            csr = NodeCSR.generate()
            async with tls.member_channel(m.control, worker) as ch:  # nor may it renew
                await refused(
                    lambda: call(ch, "/shoal.CA/IssueNodeCertificate", {"csr": csr.pem.decode()}),
                    grpc.StatusCode.PERMISSION_DENIED,
                )
        finally:
            await m.stop()

    run(main())


def test_server_credentials_change_at_the_next_handshake_without_dropping_a_stream() -> None:
    async def main() -> None:
        swarm = Swarm()
        m = await start_manager(swarm)
        member = swarm.creds(Role.WORKER, "w1")
        try:
            first = Identity.from_pem(await tls.fetch_server_leaf(m.join)).serial
            async with tls.member_channel(m.control, member) as ch:
                stream = ch.unary_stream(
                    "/shoal.Dispatcher/Session", request_serializer=_enc, response_deserializer=_dec
                )({"count": 10, "every": 0.05})
                got: list[Any] = [await stream.read()]
                m.source.update(swarm.creds(Role.MANAGER, "mgr"))  # the manager renewed
                while (item := await stream.read()) is not aio.EOF:
                    got.append(item)
                assert [g["i"] for g in got] == list(range(10))
                assert await stream.code() == grpc.StatusCode.OK
            second = Identity.from_pem(await tls.fetch_server_leaf(m.join)).serial
            assert second != first
            assert (await heartbeat(m.control, member))["node_id"] == "w1"
        finally:
            await m.stop()

    run(main())


def test_cross_signed_certificates_interoperate_across_roots() -> None:
    """Mid-rotation, some nodes trust only the old root and some only the new one; everything
    issued during the rotation carries the cross-signed certificate and works both ways."""

    async def main() -> None:
        swarm = Swarm()
        old = swarm.root
        rotation = RootRotation.start(old)
        new = rotation.finish()
        issuer = rotation.issuer()
        for server_trust, client_trust in ((new, old), (old, new)):
            server = swarm.creds(Role.MANAGER, "m", issuer=issuer, trust=server_trust.cert_pem)
            client = swarm.creds(Role.WORKER, "w", issuer=issuer, trust=client_trust.cert_pem)
            m = await Manager(swarm, tls.CredentialsSource(server)).start()
            try:
                assert (await heartbeat(m.control, client))["node_id"] == "w"
                # A certificate from before the rotation chains only to the old root.
                before = swarm.creds(
                    Role.WORKER, "b", issuer=old.issuer(), trust=client_trust.cert_pem
                )
                if server_trust is new:
                    await refused(
                        partial(heartbeat, m.control, before), grpc.StatusCode.UNAVAILABLE
                    )
                else:
                    assert (await heartbeat(m.control, before))["node_id"] == "b"
            finally:
                await m.stop()

    run(main())


def test_root_rotation_under_a_request_loop_loses_no_rpc() -> None:
    """The whole rotation, driven the way shoald will: the manager's credentials change under a
    running server, the client renews onto new channels, and a request loop never fails."""

    async def main() -> None:
        swarm = Swarm()
        m = await start_manager(swarm)
        client = tls.RenewableChannel(m.control)
        creds = swarm.creds(Role.WORKER, "w1")
        client.open(creds)
        calls, failures = 0, []
        stop = asyncio.Event()

        async def loop() -> None:
            nonlocal calls
            while not stop.is_set():
                try:
                    await call(client.channel, "/shoal.Dispatcher/Heartbeat")
                    calls += 1
                except aio.AioRpcError as e:
                    failures.append(f"{e.code()}: {e.details()}")
                await asyncio.sleep(0.005)

        task = asyncio.create_task(loop())
        try:
            await asyncio.sleep(0.1)
            # 1. Start: new root cross-signed by the old; the manager and the worker are
            #    re-issued under it; everyone still trusts the old root.
            swarm.rotation = RootRotation.start(swarm.root)
            m.source.update(swarm.creds(Role.MANAGER, "mgr"))
            await asyncio.sleep(0.1)
            creds = swarm.creds(Role.WORKER, "w1")
            await client.renew(creds, grace=1.0)
            await asyncio.sleep(0.1)
            # 2. Finish: trust moves to the new root, node by node (manager first here).
            new = swarm.rotation.finish()
            m.source.update(m.source.current.with_trust(new))
            await asyncio.sleep(0.1)
            await client.renew(creds.with_trust(new), grace=1.0)
            swarm.root, swarm.rotation = new, None
            await asyncio.sleep(0.1)
            # 3. Later renewals come straight from the new root, without the cross-signed cert.
            m.source.update(swarm.creds(Role.MANAGER, "mgr", trust=new.cert_pem))
            await client.renew(swarm.creds(Role.WORKER, "w1", trust=new.cert_pem), grace=1.0)
            await asyncio.sleep(0.1)
        finally:
            stop.set()
            await task
            await client.close()
            await m.stop()
        assert failures == []
        assert calls > 20
        assert len(certs_from_pem(m.source.current.chain_pem)) == 1

    run(main())


def test_credentials_refuse_a_key_that_is_not_the_certificates() -> None:
    swarm = Swarm()
    a, b = swarm.creds(Role.WORKER, "a"), swarm.creds(Role.WORKER, "b")
    with pytest.raises(PKIError, match="does not match"):
        tls.NodeCredentials(a.key_pem, b.chain_pem, a.trust_pem)
    with pytest.raises(PKIError):
        tls.NodeCredentials(a.key_pem, a.chain_pem, b"")
    assert b"PRIVATE" not in repr(a).encode()
    # Switching trust to a root our own certificate does not chain to would cut us off.
    with pytest.raises(PKIError, match="does not chain to the new roots"):
        a.with_trust(RootCA.create())
    rotation = RootRotation.start(swarm.root)
    assert swarm.creds(Role.WORKER, "c", issuer=rotation.issuer()).with_trust(rotation.new)
    assert certs_to_pem(certs_from_pem(a.chain_pem)) == a.chain_pem


def test_addresses() -> None:
    assert tls.join_address("10.0.0.1:2377") == "10.0.0.1:2378"
    assert tls.join_address("[fd00::1]:2377") == "[fd00::1]:2378"
    with pytest.raises(ValueError, match="host:port"):
        tls.join_address("10.0.0.1")
