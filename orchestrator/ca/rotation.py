"""Root CA rotation (`swarm ca --rotate`), the leader's side (swarmkit's ca_rotation.go).

`start_rotation` (from the API) makes a new root cross-signed by the old and records it in the
Cluster; from then on the CA issues from the new root, and every node, told by its session that
its certificate is not from the current issuer, renews. `RootRotationLoop` finishes once every
node that is not down holds a certificate from the new root: the new root becomes the one
nodes trust (they switch when their session says so), join tokens get its digest, and the old
root's key is dropped. No node loses its connection on the way: during the rotation the new
chains verify against the old root too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from datetime import UTC, datetime

from orchestrator.background import BackgroundLoop
from orchestrator.ca.pki import RootCA, RootRotation
from orchestrator.ca.server import issuing_root_digest, root_of
from orchestrator.ca.tokens import JoinToken
from orchestrator.store.log import NotLeader
from orchestrator.store.objects import Cluster, Node, NodeState
from orchestrator.store.store import Store, Tx

log = logging.getLogger(__name__)

PERIOD = 1.0


def start_rotation(cluster: Cluster) -> Cluster:
    rotation = RootRotation.start(root_of(cluster))
    log.info("root CA rotation started")
    return dataclasses.replace(
        cluster,
        ca_rotation={
            "cert": rotation.new.cert_pem.decode(),
            "key": rotation.new.key_pem.decode(),
            "cross_signed": rotation.cross_signed_pem.decode(),
        },
    )


def finish_if_done(tx: Tx) -> bool:
    cluster = next(iter(tx.list(Cluster)), None)
    if cluster is None or not cluster.ca_rotation:
        return False
    new = issuing_root_digest(cluster)
    waiting = [n.id for n in tx.list(Node) if n.state != NodeState.DOWN and n.cert_root != new]
    if waiting:
        return False
    root = RootCA.from_pem(
        cluster.ca_rotation["cert"].encode(), cluster.ca_rotation["key"].encode()
    )
    tx.put(
        dataclasses.replace(
            cluster,
            root_ca_cert=root.cert_pem.decode(),
            root_ca_key=root.key_pem.decode(),
            ca_rotation={},
            worker_token=str(JoinToken.generate(root)),
            manager_token=str(JoinToken.generate(root)),
        )
    )
    return True


def prune_denied(tx: Tx) -> None:
    """Forget removed nodes whose certificates have all expired (TLS refuses those anyway)."""
    cluster = next(iter(tx.list(Cluster)), None)
    if cluster is None:
        return
    now = datetime.now(UTC)
    kept = {
        node: until
        for node, until in cluster.denied_nodes.items()
        if not until or datetime.fromisoformat(until) > now
    }
    if kept != cluster.denied_nodes:
        tx.put(dataclasses.replace(cluster, denied_nodes=kept))


class RootRotationLoop(BackgroundLoop):
    task_name = "root-rotation"

    def __init__(self, store: Store, term: int | None):
        self.store = store
        self.term = term

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(PERIOD)
            try:
                if await self.store.update(finish_if_done, self.term):
                    log.info("root CA rotation finished: every node holds a new certificate")
                await self.store.update(prune_denied, self.term)
            except NotLeader:
                return
