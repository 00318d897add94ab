"""The keyring of encrypted overlays: made and rotated by the leader, handed to the nodes.

Docker's model (../shared/reference/swarm.md): the managers keep the newest three keys and
rotate every 12 hours; every node accepts all three and sends with the second-newest, so a
rotation reaches the nodes one by one without a lost packet (mesh/ipsec.py, docs/mesh-state.md).
The keyring lives in the Cluster object (so only managers keep it, encrypted at rest); a node
gets it in its mesh state only while one of its networks is encrypted.

The interval is `Spec.EncryptionConfig.NetworkKeyRotation` (nanoseconds, Shoal's own field;
`swarm update --network-key-rotation 12h`), 12 hours when unset.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from mesh.ipsec import DEFAULT_ROTATION_SECONDS, rotate
from mesh.state import Encryption, EncryptionKey
from orchestrator.background import BackgroundLoop
from orchestrator.store.log import NotLeader
from orchestrator.store.objects import Cluster
from orchestrator.store.store import Store, Tx

log = logging.getLogger(__name__)

FIELD = "NetworkKeyRotation"
MIN_INTERVAL = timedelta(minutes=1)
SECOND = 1_000_000_000


def interval(cluster: Cluster) -> timedelta:
    ns = (cluster.spec.get("EncryptionConfig") or {}).get(FIELD) or 0
    return timedelta(seconds=ns / SECOND) if ns else timedelta(seconds=DEFAULT_ROTATION_SECONDS)


def check_interval(spec: dict[str, Any]) -> None:
    """Refuse a rotation interval too short to reach every node first (ValueError)."""
    ns = (spec.get("EncryptionConfig") or {}).get(FIELD) or 0
    if not isinstance(ns, int) or ns < 0:
        raise ValueError("EncryptionConfig.NetworkKeyRotation: want a duration in nanoseconds")
    if ns and timedelta(seconds=ns / SECOND) < MIN_INTERVAL:
        raise ValueError("EncryptionConfig.NetworkKeyRotation: at least 1 minute")


def keyring(cluster: Cluster) -> Encryption | None:
    doc = cluster.network_keys
    if not doc.get("keys"):
        return None
    keys = tuple(EncryptionKey(int(k["tag"]), bytes.fromhex(k["key"])) for k in doc["keys"])
    return Encryption(keys, int(doc["primary"]))


def due(cluster: Cluster, now: datetime) -> bool:
    rotated = cluster.network_keys.get("rotated_at")
    if keyring(cluster) is None or not rotated:
        return True
    return now - datetime.fromisoformat(rotated) >= interval(cluster)


def rotated(cluster: Cluster, now: datetime) -> Cluster:
    """The cluster with one rotation step done: a new key, the newest three kept."""
    enc = rotate(keyring(cluster))
    return dataclasses.replace(
        cluster,
        network_keys={
            "keys": [{"tag": k.tag, "key": k.key.hex()} for k in enc.keys],
            "primary": enc.primary,
            "rotated_at": now.isoformat(),
        },
    )


def for_mesh(cluster: Cluster | None) -> Encryption | None:
    """The keyring as a node's mesh state holds it (docs/mesh-state.md, `encryption`)."""
    return keyring(cluster) if cluster is not None else None


def rotate_if_due(tx: Tx) -> bool:
    cluster = next(iter(tx.list(Cluster)), None)
    now = datetime.now(UTC)
    if cluster is None or not due(cluster, now):
        return False
    tx.put(rotated(cluster, now))
    return True


class NetworkKeyLoop(BackgroundLoop):
    """Leader only, fenced by its term: rotates the keyring when it is due."""

    task_name = "network-keys"

    def __init__(self, store: Store, term: int | None):
        self.store, self.term = store, term

    async def _run(self) -> None:
        while True:
            try:
                if await self.store.update(rotate_if_due, self.term):
                    log.info("encrypted overlays: new network key; the nodes get it now")
            except NotLeader:
                return
            cluster = next(iter(self.store.list(Cluster)), None)
            period = interval(cluster) if cluster is not None else MIN_INTERVAL
            await asyncio.sleep(min(period.total_seconds() / 10, 60.0))
