"""The task reaper: deletes tasks nobody needs any more.

Tasks of removed services and of scaled-down slots go once they stopped (or their node is
gone); finished tasks beyond the history limit (5 per slot by default, Docker's
TaskHistoryRetentionLimit) go oldest first.
"""

from __future__ import annotations

from collections import defaultdict

from orchestrator.store.objects import Node, NodeState, Service, Task, TaskState
from orchestrator.store.store import Tx

DEFAULT_HISTORY = 5


def reap(tx: Tx, history_limit: int = DEFAULT_HISTORY) -> int:
    services = {s.id for s in tx.list(Service)}
    nodes = {n.id: n for n in tx.list(Node)}
    deleted = 0
    groups: dict[tuple[str, int | str], list[Task]] = defaultdict(list)
    for t in tx.list(Task):
        gone_node = (
            not t.node_id or t.node_id not in nodes or nodes[t.node_id].state == NodeState.DOWN
        )
        stopped = t.state.terminal or gone_node or t.state < TaskState.ASSIGNED
        if (t.service_id not in services or t.desired_state == TaskState.REMOVE) and stopped:
            tx.delete(Task, t.id)
            deleted += 1
            continue
        if t.desired_state > TaskState.RUNNING:
            groups[(t.service_id, t.slot or t.node_id)].append(t)
    for tasks in groups.values():
        tasks.sort(key=lambda t: t.meta.created_at or t.timestamp)
        for t in tasks[: max(len(tasks) - history_limit, 0)]:
            tx.delete(Task, t.id)
            deleted += 1
    return deleted
