"""The replicated orchestrator: slots 1..N of a service, each with one runnable task.

A pass over one service, in one transaction:
- slots above N have their tasks removed (scale down, highest slots first);
- a slot whose task ended is dead: its task is shut down and, if the restart policy allows,
  a new task takes the slot after the restart delay;
- a task on a node that is down or drained is shut down and replaced at once (not a failure);
- slots whose task runs an older spec are the updater's (update.py): rolling updates and
  rollbacks, `UpdateConfig` at a time.
"""

from __future__ import annotations

import time
from collections import defaultdict

from orchestrator.manager.orchestrator import update
from orchestrator.manager.orchestrator.restart import RestartTracker
from orchestrator.manager.orchestrator.tasks import new_task, node_usable, runnable, stop
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
    """Returns when to look again (a restart delay or an update's delay running), or None."""
    now = time.time() if now is None else now
    v = view(svc.spec)
    by_slot: dict[int, list[Task]] = defaultdict(list)
    for t in tasks:
        by_slot[t.slot].append(t)
    wake: float | None = None
    slots: list[update.Slot] = []
    replacing = updates.in_flight(svc.id)
    for slot in sorted(set(by_slot) | set(range(1, v.replicas + 1))):
        history = sorted(by_slot.get(slot, []), key=lambda t: t.meta.created_at or t.timestamp)
        live = [t for t in history if runnable(t)]
        if slot > v.replicas:
            for t in live:
                tx.put(stop(t, TaskState.REMOVE, "service scaled down"))
            continue
        # one runnable task per slot; two while an update starts the new one first
        keep = 2 if slot in replacing else 1
        for t in live[:-keep]:
            tx.put(stop(t, TaskState.SHUTDOWN, "duplicate task in slot"))
        current = live[-1] if live else None
        if current is not None and current.node_id and not node_usable(nodes.get(current.node_id)):
            tx.put(stop(current, TaskState.SHUTDOWN, "node is down or drained; task moved"))
            tx.put(new_task(svc, slot))
            continue
        if current is not None and current.state.terminal:
            tx.put(stop(current, TaskState.SHUTDOWN))
            history = [*history[:-1], current]
            current = None
        if current is None:
            if not history:
                tx.put(new_task(svc, slot))
                continue
            last = history[-1]
            at = restarts.decide(v, svc.id, slot, last, now)
            if at is None:
                continue
            if at > now:
                wake = at if wake is None else min(wake, at)
                continue
            restarts.record(svc.id, slot, now)
            tx.put(new_task(svc, slot))
            continue
        slots.append(update.Slot(slot, current))
    later = update.step(tx, svc, slots, updates, now)
    if later is not None:
        wake = later if wake is None else min(wake, later)
    return wake
