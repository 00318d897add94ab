"""The manager: the leader-only control loops, driven by changes to the store.

One reconcile pass runs the loops in order, each in its own transaction: orchestrators (the
tasks each service should have), the allocator (addresses for new tasks and for nodes), the
scheduler (a node for pending tasks), the reaper (old tasks). Passes run after every burst of
changes (debounced) and when a restart delay runs out. Every loop reads the whole state and
converges it, so a pass can be interrupted and simply run again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict

from orchestrator.background import BackgroundLoop
from orchestrator.manager import allocator, reaper, scheduler
from orchestrator.manager.orchestrator import global_, replicated
from orchestrator.manager.orchestrator.restart import RestartTracker
from orchestrator.manager.spec import view
from orchestrator.store.log import NotLeader
from orchestrator.store.objects import Cluster, Node, Service, Task
from orchestrator.store.store import Store, Tx

log = logging.getLogger("shoal.manager")

DEBOUNCE = 0.02


class Manager(BackgroundLoop):
    task_name = "control-loops"

    def __init__(self, store: Store, term: int | None = None):
        """`term`: the leadership term these loops run in; their writes are refused once it
        is over (None: no fencing, a store with one member)."""
        self.store = store
        self.term = term
        self.restarts = RestartTracker()
        self._wake_at: float | None = None
        self.passes = 0

    async def _run(self) -> None:
        q = self.store.watch()
        try:
            while True:
                try:
                    await self.reconcile()
                except NotLeader as e:  # leadership ended: the runtime stops these loops
                    log.info("reconcile pass stopped: %s", e)
                    await asyncio.sleep(1)
                    continue
                except Exception:  # a bad pass must not stop the control loops
                    log.exception("reconcile pass failed; retrying")
                    await asyncio.sleep(1)
                    continue
                timeout = None if self._wake_at is None else max(self._wake_at - time.time(), 0)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(q.get(), timeout)
                await asyncio.sleep(DEBOUNCE)
                while not q.empty():
                    q.get_nowait()
        finally:
            self.store.unwatch(q)

    async def reconcile(self) -> None:
        self.passes += 1
        self._wake_at = None
        wakes = await self.store.update(self._orchestrate, self.term)
        self._wake_at = min(wakes) if wakes else None
        await self.store.update(self._allocate, self.term)
        await self.store.update(scheduler.schedule, self.term)
        cluster = next(iter(self.store.list(Cluster)), None)
        limit = (
            cluster.spec.get("Orchestration", {}).get("TaskHistoryRetentionLimit")
            if cluster
            else None
        ) or reaper.DEFAULT_HISTORY
        await self.store.update(lambda tx: reaper.reap(tx, limit), self.term)

    def _orchestrate(self, tx: Tx) -> list[float]:
        nodes = {n.id: n for n in tx.list(Node)}
        by_service: dict[str, list[Task]] = defaultdict(list)
        for t in tx.list(Task):
            by_service[t.service_id].append(t)
        wakes = []
        for svc in tx.list(Service):
            loop = global_ if view(svc.spec).mode == "global" else replicated
            wake = loop.reconcile(tx, svc, by_service.get(svc.id, []), nodes, self.restarts)
            if wake is not None:
                wakes.append(wake)
        return wakes

    @staticmethod
    def _allocate(tx: Tx) -> None:
        allocator.allocate_gateways(tx)
        allocator.allocate_tasks(tx)
