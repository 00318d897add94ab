"""Autolock: each manager keeps its Raft data key sealed under the swarm's unlock key.

The unlock key (`SWMKEY-1-...`) lives in the replicated store (Cluster.unlock_key) when
`EncryptionConfig.AutoLockManagers` is on, so every manager learns a new one through Raft.
`KeySealer` runs on every manager, leader or not, and reseals the local data key file
(orchestrator/raft/sealing.py) whenever the key the cluster wants differs from the one the file
is sealed with: on `swarm update --autolock`, on `swarm unlock-key --rotate`, and once after a
start (a manager that was down during a change catches up here).
"""

from __future__ import annotations

import asyncio
import logging

from orchestrator.background import BackgroundLoop
from orchestrator.ca.tokens import TokenError, UnlockKey
from orchestrator.raft.node import RaftNode
from orchestrator.store.objects import Cluster
from orchestrator.store.store import Store

log = logging.getLogger(__name__)


def autolocked(cluster: Cluster) -> bool:
    return bool((cluster.spec.get("EncryptionConfig") or {}).get("AutoLockManagers"))


def wanted_key(cluster: Cluster) -> bytes | None:
    """The raw unlock key this cluster's managers must seal their data with (None: none)."""
    if not autolocked(cluster) or not cluster.unlock_key:
        return None
    try:
        return UnlockKey.parse(cluster.unlock_key).key
    except TokenError:
        log.error("the store holds an unreadable unlock key; leaving the data key as it is")
        return None


class KeySealer(BackgroundLoop):
    """Keeps this manager's data key sealed the way the cluster says."""

    task_name = "key-sealer"

    def __init__(self, store: Store, raft: RaftNode, sealed_with: bytes | None):
        self.store, self.raft = store, raft
        self._sealed_with = sealed_with
        self._checked = False  # the file is resealed once after a start, whatever it holds

    async def _run(self) -> None:
        changes = self.store.watch()
        try:
            while True:
                try:
                    await self._apply()
                except OSError as e:  # a full disk, say: keep the old seal, try again
                    log.error("could not reseal the Raft data key: %s", e)
                    await asyncio.sleep(5)
                    continue
                event = await changes.get()
                while event.kind != Cluster.KIND:
                    event = await changes.get()
        finally:
            self.store.unwatch(changes)

    async def _apply(self) -> None:
        cluster = next(iter(self.store.list(Cluster)), None)
        if cluster is None:
            return
        want = wanted_key(cluster)
        if self._checked and want == self._sealed_with:
            return
        await self.raft.reseal(want)
        if self._checked and want != self._sealed_with:
            log.info(
                "Raft data key %s", "sealed under the unlock key" if want else "no longer sealed"
            )
        self._sealed_with, self._checked = want, True
