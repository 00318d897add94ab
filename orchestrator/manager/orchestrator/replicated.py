"""The replicated orchestrator: slots 1..N of a service, each with one runnable task.

A pass over one service, in one transaction:
- slots above N have their tasks removed (scale down, highest slots first);
- a slot whose task ended is dead: its task is shut down and, if the restart policy allows,
  a new task takes the slot after the restart delay;
- a task on a node that is down or drained is shut down and replaced at once (not a failure);
- tasks running an old spec are replaced `parallelism` at a time (stop-first), once the
  previous replacements run.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict

from orchestrator.manager.orchestrator.restart import RestartTracker
from orchestrator.manager.orchestrator.tasks import dirty, new_task, node_usable, runnable, stop
from orchestrator.manager.spec import view
from orchestrator.store.ids import now_rfc3339
from orchestrator.store.objects import Node, Service, Task, TaskState
from orchestrator.store.store import Tx


def reconcile(
    tx: Tx,
    svc: Service,
    tasks: list[Task],
    nodes: dict[str, Node],
    restarts: RestartTracker,
    now: float | None = None,
) -> float | None:
    """Returns when to look again (a restart delay running), or None."""
    now = time.time() if now is None else now
    v = view(svc.spec)
    by_slot: dict[int, list[Task]] = defaultdict(list)
    for t in tasks:
        by_slot[t.slot].append(t)
    wake: float | None = None
    updating = 0
    to_update: list[int] = []
    for slot in sorted(set(by_slot) | set(range(1, v.replicas + 1))):
        history = sorted(by_slot.get(slot, []), key=lambda t: t.meta.created_at or t.timestamp)
        live = [t for t in history if runnable(t)]
        if slot > v.replicas:
            for t in live:
                tx.put(stop(t, TaskState.REMOVE, "service scaled down"))
            continue
        for t in live[:-1]:  # one runnable task per slot
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
        if dirty(svc, current):
            to_update.append(slot)
        elif current.state < TaskState.RUNNING and len(history) > 1 and dirty(svc, history[-2]):
            updating += 1  # a replacement under way
    _roll(tx, svc, by_slot, to_update, max(v.update_parallelism, 0) or len(to_update), updating)
    return wake


def _roll(
    tx: Tx,
    svc: Service,
    by_slot: dict[int, list[Task]],
    slots: list[int],
    parallelism: int,
    in_progress: int,
) -> None:
    status = svc.update_status or {}
    if not slots:
        if status.get("State") == "updating" and not in_progress:
            tx.put(_with_status(svc, "completed", "update completed"))
        return
    if status.get("State") != "updating":
        tx.put(_with_status(svc, "updating", "update in progress"))
    for slot in slots[: max(parallelism - in_progress, 0)]:
        current = [t for t in by_slot[slot] if runnable(t)][-1]
        tx.put(stop(current, TaskState.SHUTDOWN, "replaced by an update"))
        tx.put(new_task(svc, slot))


def _with_status(svc: Service, state: str, message: str) -> Service:
    status = {
        "State": state,
        "Message": message,
        "StartedAt": (svc.update_status or {}).get("StartedAt", now_rfc3339()),
    }
    if state == "completed":
        status["CompletedAt"] = now_rfc3339()
    return dataclasses.replace(svc, update_status=status)
