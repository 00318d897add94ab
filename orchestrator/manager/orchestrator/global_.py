"""The global orchestrator: one task of the service on every node that may run it.

Eligible nodes are ready, active and satisfy the constraints. A node leaving eligibility
(down, drained, a label removed) has its task shut down; a task that ended is restarted on
the same node according to the restart policy; tasks running an older spec are the updater's
(update.py), a node being a slot.
"""

from __future__ import annotations

import time
from collections import defaultdict

from orchestrator.manager.orchestrator import update
from orchestrator.manager.orchestrator.restart import RestartTracker
from orchestrator.manager.orchestrator.tasks import new_task, runnable, stop
from orchestrator.manager.scheduler import eligible, satisfies
from orchestrator.manager.spec import view
from orchestrator.store.objects import Node, Service, Task, TaskState
from orchestrator.store.store import Tx


def reconcile(
    tx: Tx,
    svc: Service,
    tasks: list[Task],
    nodes: dict[str, Node],
    restarts: RestartTracker,
    updates: update.UpdateTracker,
    now: float | None = None,
) -> float | None:
    now = time.time() if now is None else now
    v = view(svc.spec)
    wanted = {n.id for n in nodes.values() if eligible(n) and satisfies(n, v.constraints)}
    by_node: dict[str, list[Task]] = defaultdict(list)
    for t in tasks:
        by_node[t.node_id].append(t)
    wake: float | None = None
    slots: list[update.Slot] = []
    replacing = updates.in_flight(svc.id)
    for node_id in sorted(set(by_node) | wanted):
        history = sorted(by_node.get(node_id, []), key=lambda t: t.meta.created_at or t.timestamp)
        live = [t for t in history if runnable(t)]
        if node_id not in wanted:
            for t in live:
                tx.put(stop(t, TaskState.SHUTDOWN, "node no longer eligible for the service"))
            continue
        keep = 2 if node_id in replacing else 1  # an update starting the new one first
        for t in live[:-keep]:
            tx.put(stop(t, TaskState.SHUTDOWN, "duplicate task on node"))
        current = live[-1] if live else None
        if current is not None and current.state.terminal:
            tx.put(stop(current, TaskState.SHUTDOWN, current.message))
            current = None
        if current is None:
            if history:
                at = restarts.decide(v, svc.id, node_id, history[-1], now)
                if at is None:
                    continue
                if at > now:
                    wake = at if wake is None else min(wake, at)
                    continue
                restarts.record(svc.id, node_id, now)
            tx.put(new_task(svc, 0, node_id))
            continue
        slots.append(update.Slot(node_id, current, node_id))
    later = update.step(tx, svc, slots, updates, now)
    if later is not None:
        wake = later if wake is None else min(wake, later)
    return wake
