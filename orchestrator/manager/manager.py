"""The manager: the leader-only control loops, driven by changes to the store.

One reconcile pass runs the loops in order, each in its own transaction: orchestrators (the
tasks each service should have), the allocator (addresses for new tasks and for nodes), the
scheduler (a node for pending tasks), the reaper (old tasks). Passes run after every burst of
changes (debounced) and when a restart delay runs out. Every loop reads the whole state and
converges it, so a pass can be interrupted and simply run again.

A pass that fails is counted (`shoal_manager_reconcile_failures_total{loop}`, in the manager's
own registry) and retried with exponential backoff: 1 s, doubled per failure up to 30 s, back
to 1 s after a pass that succeeds. Changes to the store during the backoff do not bring the
retry forward; it reads the whole state, so it sees them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter

from orchestrator.background import BackgroundLoop
from orchestrator.manager import allocator, reaper, scheduler
from orchestrator.manager.orchestrator import global_, jobs, replicated
from orchestrator.manager.orchestrator.restart import RestartTracker
from orchestrator.manager.orchestrator.update import UpdateTracker
from orchestrator.manager.spec import view
from orchestrator.store.log import NotLeader
from orchestrator.store.objects import Cluster, Node, Service, Task
from orchestrator.store.store import Store, Tx

log = logging.getLogger(__name__)

DEBOUNCE = 0.02
BACKOFF = (1.0, 30.0)  # a failed pass's first retry delay, and the most it doubles to

# the loops of a pass, in order: the label of a failure
LOOPS = ("orchestrator", "allocator", "scheduler", "reaper")

T = TypeVar("T")


class Manager(BackgroundLoop):
    task_name = "control-loops"

    def __init__(
        self, store: Store, term: int | None = None, backoff: tuple[float, float] = BACKOFF
    ):
        """`term`: the leadership term these loops run in; their writes are refused once it
        is over (None: no fencing, a store with one member). `backoff`: the first delay
        before retrying a failed pass, and its cap."""
        self.store = store
        self.term = term
        self.backoff = backoff
        self.restarts = RestartTracker()
        self.updates = UpdateTracker()
        self._wake_at: float | None = None
        self.passes = 0
        self.registry = CollectorRegistry()
        self.reconcile_failures = Counter(
            "shoal_manager_reconcile_failures_total",
            "Reconcile passes that failed, by the loop that raised.",
            ["loop"],
            registry=self.registry,
        )
        for loop in LOOPS:
            self.reconcile_failures.labels(loop)

    async def _run(self) -> None:
        q = self.store.watch()
        delay = self.backoff[0]
        try:
            while True:
                try:
                    await self.reconcile()
                except NotLeader as e:  # leadership ended: the runtime stops these loops
                    log.info("reconcile pass stopped: %s", e)
                    await asyncio.sleep(1)
                    continue
                except Exception:  # a bad pass must not stop the control loops
                    log.exception("reconcile pass failed; retrying in %g s", delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.backoff[1])
                    while not q.empty():  # the retry reads them all
                        q.get_nowait()
                    continue
                delay = self.backoff[0]
                timeout = None if self._wake_at is None else max(self._wake_at - time.time(), 0)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(q.get(), timeout)
                await asyncio.sleep(DEBOUNCE)
                while not q.empty():
                    q.get_nowait()
        finally:
            self.store.unwatch(q)

    async def reconcile(self) -> None:
        """One pass. Raises what a loop raised, and counts it under that loop's name."""
        self.passes += 1
        self._wake_at = None
        wakes = await self._loop("orchestrator", self._orchestrate)
        self._wake_at = min(wakes) if wakes else None
        await self._loop("allocator", self._allocate)
        await self._loop("scheduler", scheduler.schedule)
        await self._loop("reaper", self._reap)

    async def _loop(self, name: str, fn: Callable[[Tx], T]) -> T:
        try:
            return await self.store.update(fn, self.term)
        except NotLeader:
            raise
        except Exception:
            self.reconcile_failures.labels(name).inc()
            raise

    def _orchestrate(self, tx: Tx) -> list[float]:
        nodes = {n.id: n for n in tx.list(Node)}
        by_service: dict[str, list[Task]] = defaultdict(list)
        for t in tx.list(Task):
            by_service[t.service_id].append(t)
        wakes = []
        for svc in tx.list(Service):
            v, tasks = view(svc.spec), by_service.get(svc.id, [])
            if v.job:
                wake = jobs.reconcile(tx, svc, tasks, nodes, self.restarts)
            else:
                loop = global_ if v.mode == "global" else replicated
                wake = loop.reconcile(tx, svc, tasks, nodes, self.restarts, self.updates)
            if wake is not None:
                wakes.append(wake)
        return wakes

    @staticmethod
    def _allocate(tx: Tx) -> None:
        allocator.allocate_gateways(tx)
        allocator.allocate_tasks(tx)

    @staticmethod
    def _reap(tx: Tx) -> None:
        cluster = next(iter(tx.list(Cluster)), None)
        limit = (
            cluster.spec.get("Orchestration", {}).get("TaskHistoryRetentionLimit")
            if cluster
            else None
        ) or reaper.DEFAULT_HISTORY
        reaper.reap(tx, limit)
