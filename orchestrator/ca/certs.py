"""A node's TLS identity as shoald keeps it: on disk, in its servers, in its channels, renewed.

`NodeCertificates` holds the node's current credentials. Servers built from `source` and
channels from `channel()` use whatever is current when a connection opens, so a renewal or a
root rotation changes no listener and drops no connection: open connections keep the session
they negotiated, new ones get the new certificate.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from grpc import aio

from orchestrator.ca.files import load_node_credentials, save_node_credentials
from orchestrator.ca.pki import Identity, NodeCSR, PKIError, certs_from_pem, verify_chain
from orchestrator.ca.renewal import RenewalWindow
from orchestrator.ca.server import SERVICE as CA_SERVICE
from orchestrator.ca.tls import ChannelOptions, CredentialsSource, NodeCredentials, member_channel
from orchestrator.rpc import jsonrpc

log = logging.getLogger(__name__)


@dataclass
class NodeCertificates:
    directory: Path
    source: CredentialsSource
    window: RenewalWindow = field(default_factory=RenewalWindow)
    rng: random.Random = field(default_factory=random.Random)

    @staticmethod
    def create(directory: Path, creds: NodeCredentials) -> NodeCertificates:
        save_node_credentials(directory, creds)
        return NodeCertificates(directory, CredentialsSource(creds))

    @staticmethod
    def load(directory: Path) -> NodeCertificates | None:
        creds = load_node_credentials(directory)
        return NodeCertificates(directory, CredentialsSource(creds)) if creds else None

    @property
    def creds(self) -> NodeCredentials:
        return self.source.current

    @property
    def identity(self) -> Identity:
        return self.creds.identity

    def channel(self, target: str, options: ChannelOptions = jsonrpc.OPTIONS) -> aio.Channel:
        """Mutual TLS to a manager's control port, with the current certificate."""
        return member_channel(target, self.creds, options=options)

    def install(self, creds: NodeCredentials) -> None:
        save_node_credentials(self.directory, creds)
        self.source.update(creds)

    def renew_in(self, now: datetime | None = None) -> float:
        """Seconds until this node should renew: a random point in 50-80% of its lifetime."""
        now = now or datetime.now(UTC)
        return max(self.window.delay(self.identity, now, self.rng).total_seconds(), 0.0)

    async def renew(self, managers: Sequence[str]) -> str:
        """A new key and certificate from the first manager that answers, in the role and
        under the root the managers give it now; returns the hex digest of that root."""
        csr = NodeCSR.generate()
        last: Exception | None = None
        for addr in managers:
            client = jsonrpc.Client(addr, self.channel(addr))
            try:
                reply = await client.call(
                    CA_SERVICE, "IssueNodeCertificate", {"csr": csr.pem.decode()}, deadline=10
                )
            except aio.AioRpcError as e:
                last = e
                continue
            finally:
                await client.close()
            chain = str(reply["chain"]).encode()
            verify_chain(chain, certs_from_pem(self.creds.trust_pem))
            self.install(self.creds.with_chain(csr.key_pem, chain))
            log.info("renewed the node certificate: %s", self.identity)
            return str(reply.get("cert_root", ""))
        raise PKIError(f"no manager renewed the certificate: {last}")

    def trust(self, root_pem: str) -> bool:
        """Switch to the swarm's current root (after a rotation) once our chain verifies
        against it; True if the trust changed."""
        if root_pem.encode() == self.creds.trust_pem:
            return False
        try:
            self.install(self.creds.with_trust(root_pem.encode()))
        except PKIError as e:
            log.info("not trusting the new root yet: %s", e)
            return False
        log.info("now trusting the swarm's new root CA")
        return True
