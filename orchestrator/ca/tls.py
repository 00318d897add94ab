"""gRPC transport security: credentials from our PEMs, the join bootstrap, the caller's identity.

Two listeners on every manager (see docs/security.md for why one port cannot do both with
Python's gRPC):

- the control port (2377 by default, `--listen-addr`): mutual TLS, a client certificate is
  required and verified against the swarm's root. Raft, dispatcher, control, and the CA calls of
  members (renewal) all go here; the caller's identity is read from its certificate
  (`peer_identity`).
- the join port (control port + `JOIN_PORT_OFFSET`): TLS with the manager's certificate, no
  client certificate asked for. It serves only the join RPCs: fetch the root CA, submit a CSR
  with a join token, poll for the certificate.

A joining node knows no root yet, and Python's gRPC cannot skip server verification, so the
first call is anchored on the certificate the join port presents (`fetch_server_leaf`,
`bootstrap_channel`): that channel is encrypted but proves nothing, which is fine because what
it carries (the root CA) is public and is then checked against the join token's digest
(`tokens.JoinToken.check_root`). The token itself travels only on a channel verified against
that pinned root (`join_channel`).

TLS versions: gRPC's core negotiates TLS 1.3 and accepts 1.2 at the least; Python's API offers
no knob, and tests/test_ca_tls.py proves both ends of that range.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc import aio

from orchestrator.ca.pki import (
    CA_SAN,
    Identity,
    PKIError,
    RootCA,
    certs_from_pem,
    key_from_pem,
    role_ou,
    verify_chain,
)
from orchestrator.ca.tokens import JoinToken
from orchestrator.store.objects import Role

# Clients check the server's certificate against a name, not its address (managers are dialled
# by IP, which no certificate names): "swarm-manager" is in every manager's certificate and in
# no worker's, so a worker cannot pose as a manager (swarmkit dials ServerName ManagerRole).
MANAGER_NAME = role_ou(Role.MANAGER)
CA_NAME = CA_SAN
JOIN_PORT_OFFSET = 1
ChannelOptions = Sequence[tuple[str, Any]]


@dataclass(frozen=True)
class NodeCredentials:
    """A node's TLS material: its key, its chain `[leaf, *intermediates]`, the roots it trusts."""

    key_pem: bytes = field(repr=False)
    chain_pem: bytes
    trust_pem: bytes

    def __post_init__(self) -> None:
        key = key_from_pem(self.key_pem)
        leaf = certs_from_pem(self.chain_pem)[0]
        fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if leaf.public_key().public_bytes(*fmt) != key.public_key().public_bytes(*fmt):
            raise PKIError("the node key does not match its certificate")
        if not certs_from_pem(self.trust_pem):
            raise PKIError("no trusted root certificates")

    @property
    def identity(self) -> Identity:
        return Identity.from_pem(self.chain_pem)

    @property
    def leaf(self) -> x509.Certificate:
        return certs_from_pem(self.chain_pem)[0]

    def with_chain(self, key_pem: bytes, chain_pem: bytes) -> NodeCredentials:
        """After a renewal: new key and certificate, same trust."""
        return NodeCredentials(key_pem=key_pem, chain_pem=chain_pem, trust_pem=self.trust_pem)

    def with_trust(self, trust: RootCA | bytes) -> NodeCredentials:
        """After a root rotation: same key and certificate, new roots.

        Refused unless our own chain verifies against the new roots (swarmkit's
        validateRootCAAndTLSCert): switching first would cut us off from every peer that
        already switched. Renew under the rotation's issuer, then switch.
        """
        pem = trust.cert_pem if isinstance(trust, RootCA) else trust
        try:
            verify_chain(self.chain_pem, certs_from_pem(pem))
        except PKIError as e:
            raise PKIError(f"our certificate does not chain to the new roots: {e}") from e
        return NodeCredentials(key_pem=self.key_pem, chain_pem=self.chain_pem, trust_pem=pem)


# ---- servers -------------------------------------------------------------------------------


@dataclass
class _Fetcher:
    """gRPC calls this before every new TLS handshake (from a core thread, holding the GIL);
    it hands over a new configuration only when the node's credentials changed since the last
    one it gave, and None ("unchanged") otherwise, which costs nothing."""

    source: CredentialsSource
    generation: int

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        current = self.source.generation
        if current == self.generation:
            return None
        self.generation = current
        return self.source.certificate_configuration()


@dataclass
class CredentialsSource:
    """The node's current credentials, replaced at renewal and root rotation without restarting
    a server or dropping a connection.

    Servers built from it (`control_server_credentials`, `join_server_credentials`) pick the new
    certificate and roots up at their next handshake; connections already open keep the
    session they negotiated. Channels are immutable in gRPC, so clients make new ones from
    `current` (see `RenewableChannel`).
    """

    current: NodeCredentials
    generation: int = 0

    def update(self, creds: NodeCredentials) -> None:
        # One attribute store each: the fetcher may read from another thread, and under the GIL
        # it sees either the old pair or the new one, never half an update that matters (a
        # stale generation only delays the switch to the next handshake).
        self.current = creds
        self.generation += 1

    def certificate_configuration(self) -> grpc.ServerCertificateConfiguration:
        creds = self.current
        return grpc.ssl_server_certificate_configuration(
            [(creds.key_pem, creds.chain_pem)], root_certificates=creds.trust_pem
        )

    def control_server_credentials(self) -> grpc.ServerCredentials:
        """The control port: a verified client certificate is required."""
        return grpc.dynamic_ssl_server_credentials(
            self.certificate_configuration(),
            _fetcher(self),
            require_client_authentication=True,
        )

    def join_server_credentials(self) -> grpc.ServerCredentials:
        """The join port: server-authenticated TLS only; callers have no identity here."""
        return grpc.dynamic_ssl_server_credentials(
            self.certificate_configuration(),
            _fetcher(self),
            require_client_authentication=False,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return channel_credentials(self.current)


def _fetcher(source: CredentialsSource) -> Callable[[], grpc.ServerCertificateConfiguration]:
    # The stubs leave out that the fetcher may return None; the runtime documents it.
    return cast(
        Callable[[], grpc.ServerCertificateConfiguration], _Fetcher(source, source.generation)
    )


def join_address(control: str) -> str:
    """The join port that goes with a manager's control address (`host:2377` -> `host:2378`)."""
    host, port = split_address(control)
    return join_host_port(host, port + JOIN_PORT_OFFSET)


def split_address(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"want host:port, got {addr!r}")
    return host.strip("[]"), int(port)


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---- the caller's identity -----------------------------------------------------------------


def peer_identity(context: aio.ServicerContext[Any, Any]) -> Identity | None:
    """Who is calling, from the client certificate the TLS handshake verified; None without one.

    gRPC only puts `x509_pem_cert` in the auth context when it asked for a client certificate,
    and Python's gRPC asks only with require_client_auth=True, which also verifies it against
    our roots and rejects the handshake otherwise. So a certificate here is a verified one, and
    on the join port there is never one.
    """
    pem = next(iter(context.auth_context().get("x509_pem_cert", ())), None)
    if not pem:
        return None
    try:
        return Identity.from_pem(pem)
    except PKIError:
        # Verified by our own roots but not shaped like a node certificate: trust it with
        # nothing rather than guess.
        return None


# ---- clients -------------------------------------------------------------------------------


def channel_credentials(creds: NodeCredentials) -> grpc.ChannelCredentials:
    """Mutual TLS from a member: present our chain, trust only the swarm's roots."""
    return grpc.ssl_channel_credentials(
        root_certificates=creds.trust_pem,
        private_key=creds.key_pem,
        certificate_chain=creds.chain_pem,
    )


def secure_channel(
    target: str,
    creds: grpc.ChannelCredentials,
    *,
    server_name: str = MANAGER_NAME,
    options: ChannelOptions = (),
) -> aio.Channel:
    """A channel that checks the server's certificate names `server_name` (the target is an
    address no certificate carries)."""
    opts = [*options, ("grpc.ssl_target_name_override", server_name)]
    return aio.secure_channel(target, creds, options=opts)


def member_channel(
    target: str, creds: NodeCredentials, *, options: ChannelOptions = ()
) -> aio.Channel:
    """A member to a manager's control port."""
    return secure_channel(target, channel_credentials(creds), options=options)


async def fetch_server_leaf(target: str, connect_timeout: float = 5.0) -> bytes:
    """The certificate a join port presents, read from a TLS handshake that verifies nothing.

    Only used to anchor `bootstrap_channel`: nothing learnt here is trusted.
    """
    host, port = split_address(target)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2"])
    _, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=ctx, server_hostname=CA_NAME), connect_timeout
    )
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    finally:
        # Abort, not close: a graceful TLS shutdown would wait for the server's close_notify,
        # and a gRPC server waiting for our HTTP/2 preface sends none.
        writer.transport.abort()
    if not der:
        raise PKIError(f"{target} presented no certificate")
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)


def bootstrap_channel(target: str, leaf_pem: bytes, *, options: ChannelOptions = ()) -> aio.Channel:
    """A channel to a join port that trusts exactly the certificate it presented (gRPC's core
    accepts a non-root trust anchor). For fetching the root CA, nothing else."""
    return secure_channel(
        target,
        grpc.ssl_channel_credentials(root_certificates=leaf_pem),
        server_name=CA_NAME,
        options=options,
    )


def join_channel(target: str, root: RootCA, *, options: ChannelOptions = ()) -> aio.Channel:
    """A channel to a join port verified against the pinned root, without a client certificate:
    where the join token and the CSR go."""
    return secure_channel(
        target,
        grpc.ssl_channel_credentials(root_certificates=root.cert_pem),
        server_name=CA_NAME,
        options=options,
    )


async def fetch_root_ca(
    target: str,
    token: JoinToken,
    get_root: Callable[[aio.Channel], Awaitable[bytes]],
    *,
    attempts: int = 3,
) -> RootCA:
    """Step 1 of a join: the manager's root CA, accepted only if it matches the token's digest.

    `get_root` makes the RPC (the CA service's wire format is the daemon's business) and returns
    the root's PEM. A retry covers a manager that renewed its certificate between our handshake
    and the call.
    """
    last: Exception | None = None
    for _ in range(max(1, attempts)):
        leaf = await fetch_server_leaf(target)
        channel = bootstrap_channel(target, leaf)
        try:
            pem = await get_root(channel)
        except aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            last = e
            continue
        finally:
            await channel.close()
        return token.check_root(pem)
    assert last is not None
    raise last


@dataclass
class RenewableChannel:
    """A member's channel to one manager that follows the node's certificate.

    gRPC channel credentials cannot change, so a renewal makes a new channel; calls already on
    the old one get `grace` seconds to finish before it closes (long streams reconnect on the
    new one, which also lets the server see the new certificate).
    """

    target: str
    options: ChannelOptions = ()
    _channel: aio.Channel | None = field(default=None, init=False, repr=False)

    def open(self, creds: NodeCredentials) -> aio.Channel:
        if self._channel is None:
            self._channel = member_channel(self.target, creds, options=self.options)
        return self._channel

    @property
    def channel(self) -> aio.Channel:
        if self._channel is None:
            raise RuntimeError("open() the channel first")
        return self._channel

    async def renew(self, creds: NodeCredentials, grace: float = 30.0) -> aio.Channel:
        """Switch new calls to a channel with `creds` at once; return when the old channel is
        closed (up to `grace` seconds: run it as a task if the caller must not wait)."""
        old, self._channel = self._channel, member_channel(self.target, creds, options=self.options)
        if old is not None:
            await old.close(grace)
        return self._channel

    async def close(self, grace: float | None = None) -> None:
        if self._channel is not None:
            await self._channel.close(grace)
            self._channel = None
