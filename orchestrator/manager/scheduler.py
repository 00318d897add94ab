"""The scheduler: PENDING tasks get a node and become ASSIGNED.

Filters first (the node is ready and active, the constraints hold), then spread: the node
running the fewest tasks of the same service wins, ties broken by fewest tasks overall. A task
no node can take stays PENDING with the reason in its error, and is tried again on the next
change (a node joining, a label added).
"""

from __future__ import annotations

import dataclasses
from collections import Counter

from orchestrator.manager.spec import Constraint, view
from orchestrator.store.ids import now_rfc3339
from orchestrator.store.objects import Node, Service, Task, TaskState
from orchestrator.store.store import Tx


def eligible(node: Node) -> bool:
    return node.state == "ready" and node.availability == "active"


def satisfies(node: Node, constraints: tuple[Constraint, ...]) -> bool:
    for c in constraints:
        if c.key == "node.id":
            actual = node.id
        elif c.key == "node.hostname":
            actual = node.hostname
        elif c.key == "node.role":
            actual = node.role
        elif c.key == "node.platform.os":
            actual = node.os
        elif c.key == "node.platform.arch":
            actual = node.arch
        else:  # node.labels.<key>
            label = c.key[len("node.labels.") :]
            if label not in node.labels:
                if c.equal:
                    return False
                continue
            actual = node.labels[label]
        if (actual == c.value) != c.equal:
            return False
    return True


def active(task: Task) -> bool:
    """Counts towards a node's load: wanted running and not finished."""
    return task.desired_state <= TaskState.RUNNING and not task.state.terminal


def schedule(tx: Tx) -> int:
    nodes = [n for n in tx.list(Node) if eligible(n)]
    tasks = tx.list(Task)
    load: Counter[str] = Counter()
    per_service: Counter[tuple[str, str]] = Counter()
    for t in tasks:
        if t.node_id and active(t):
            load[t.node_id] += 1
            per_service[(t.service_id, t.node_id)] += 1
    placed = 0
    pending = sorted(
        (t for t in tasks if t.state == TaskState.PENDING and t.desired_state <= TaskState.RUNNING),
        key=lambda t: (t.service_id, t.slot),
    )
    specs: dict[str, Service | None] = {}
    for task in pending:
        if task.service_id not in specs:
            specs[task.service_id] = tx.get(Service, task.service_id)
        svc = specs[task.service_id]
        if svc is None:
            continue
        v = view(svc.spec)
        candidates = [n for n in nodes if satisfies(n, v.constraints)]
        if task.node_id:  # global tasks come with their node
            candidates = [n for n in candidates if n.id == task.node_id]
        if not candidates:
            reason = _explain(tx.list(Node), v.constraints, task.node_id)
            if task.err != reason:
                tx.put(dataclasses.replace(task, err=reason))
            continue
        best = min(
            candidates,
            key=lambda n: (per_service[(task.service_id, n.id)], load[n.id], n.hostname, n.id),
        )
        load[best.id] += 1
        per_service[(task.service_id, best.id)] += 1
        tx.put(
            dataclasses.replace(
                task,
                node_id=best.id,
                state=TaskState.ASSIGNED,
                timestamp=now_rfc3339(),
                message="scheduler assigned task to node",
                err="",
            )
        )
        placed += 1
    return placed


def _explain(nodes: list[Node], constraints: tuple[Constraint, ...], node_id: str) -> str:
    if not nodes:
        return "no suitable node (no nodes in the swarm)"
    not_ready = sum(1 for n in nodes if not eligible(n))
    unmet = sum(1 for n in nodes if eligible(n) and not satisfies(n, constraints))
    parts = []
    if unmet:
        parts.append(f"scheduling constraints not satisfied on {unmet} node{'s' * (unmet > 1)}")
    if not_ready:
        parts.append(f"{not_ready} node{'s' * (not_ready > 1)} not available for new tasks")
    if node_id and not parts:
        parts.append("its node is not available")
    return f"no suitable node ({'; '.join(parts)})"
