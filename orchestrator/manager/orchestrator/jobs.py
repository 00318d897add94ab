"""The job orchestrator (Mode ReplicatedJob and GlobalJob): tasks that run to completion, as
swarmkit's jobs orchestrator runs them (manager/orchestrator/jobs).

A job runs again, all of it, after every update of its service: the service's `job_iteration`
(JobStatus.JobIteration) names the run under way, and each task the run it belongs to. Tasks of
an earlier run that have not ended are removed; those that ended stay as history.

- A replicated job has slots 0..TotalCompletions-1 (swarmkit numbers them from 0, and the docker
  CLI's progress bars count on it), at most MaxConcurrent of them running at once.
- A global job has one slot on every eligible node (ready, active, meeting the constraints),
  nodes that become eligible later included; a node that stops being eligible has its
  unfinished task shut down.

A slot is done once its task completes: that task is never restarted (it keeps its desired
state, RUNNING in the store, which the API shows as Docker's `complete`). A task that fails is
shut down and replaced in its slot as the restart policy says (condition, delay, attempts),
and counts against MaxConcurrent while it waits, as in swarmkit; a slot whose policy gives up
stays failed. A task on a node that goes down or is drained before it completes is replaced at
once.
"""

from __future__ import annotations

import itertools
import time
from collections import defaultdict
from dataclasses import dataclass

from orchestrator.manager.orchestrator.restart import RestartTracker
from orchestrator.manager.orchestrator.tasks import new_task, node_usable, runnable, stop
from orchestrator.manager.scheduler import eligible, satisfies
from orchestrator.manager.spec import ServiceView, view
from orchestrator.store.objects import Node, Service, Task, TaskState
from orchestrator.store.store import Tx


@dataclass
class _Progress:
    """What the slots of a job's run hold after a pass."""

    active: int = 0  # running, or failed and waiting for its restart
    wake: float | None = None  # the earliest restart due

    def waiting_until(self, at: float) -> None:
        self.active += 1
        self.wake = at if self.wake is None else min(self.wake, at)


def reconcile(
    tx: Tx,
    svc: Service,
    tasks: list[Task],
    nodes: dict[str, Node],
    restarts: RestartTracker,
    now: float | None = None,
) -> float | None:
    """One pass over a job service; returns when to look again (a restart delay), or None."""
    now = time.time() if now is None else now
    v = view(svc.spec)
    replicated = v.mode == "replicated-job"
    by_slot: dict[int | str, list[Task]] = defaultdict(list)
    for t in tasks:
        if t.job_iteration != svc.job_iteration:
            if runnable(t):  # an earlier run's
                ended = t.state.terminal
                desired = TaskState.SHUTDOWN if ended else TaskState.REMOVE
                tx.put(stop(t, desired, "" if ended else "job run replaced by an update"))
            continue
        by_slot[t.slot if replicated else t.node_id].append(t)
    progress = _Progress()
    wanted = (
        set()
        if replicated
        else {n.id for n in nodes.values() if eligible(n) and satisfies(n, v.constraints)}
    )
    for key in sorted(by_slot, key=str):
        history = sorted(by_slot[key], key=lambda t: t.meta.created_at or t.timestamp)
        if not replicated and key not in wanted:
            for t in history:
                if runnable(t) and not t.state.terminal:
                    tx.put(stop(t, TaskState.SHUTDOWN, "node no longer eligible for the job"))
            continue
        _slot(tx, svc, v, key, history, nodes, restarts, now, progress)
    if replicated:
        fresh = (s for s in itertools.count() if s not in by_slot)
        room = min(v.max_concurrent - progress.active, v.total_completions - len(by_slot))
        for slot in itertools.islice(fresh, max(room, 0)):
            tx.put(new_task(svc, slot, job=True))
    else:
        for node_id in sorted(wanted - set(by_slot)):
            tx.put(new_task(svc, 0, node_id, job=True))
    return progress.wake


def _slot(
    tx: Tx,
    svc: Service,
    v: ServiceView,
    key: int | str,
    history: list[Task],
    nodes: dict[str, Node],
    restarts: RestartTracker,
    now: float,
    progress: _Progress,
) -> None:
    """One slot of the job's run, with its tasks of that run, oldest first."""
    live = [t for t in history if runnable(t)]
    if any(t.state == TaskState.COMPLETE for t in history):
        for t in live:
            if t.state != TaskState.COMPLETE:
                tx.put(stop(t, TaskState.SHUTDOWN, "duplicate task in slot"))
        return  # done
    for t in live[:-1]:
        tx.put(stop(t, TaskState.SHUTDOWN, "duplicate task in slot"))
    slot = key if isinstance(key, int) else 0
    node_id = "" if isinstance(key, int) else key
    current = live[-1] if live else None
    if current is not None and current.node_id and not node_usable(nodes.get(current.node_id)):
        tx.put(stop(current, TaskState.SHUTDOWN, "node is down or drained; task moved"))
        tx.put(new_task(svc, slot, node_id, job=True))
        progress.active += 1
        return
    if current is not None and not current.state.terminal:
        progress.active += 1
        return
    if current is not None:  # it failed: history now
        tx.put(stop(current, TaskState.SHUTDOWN))
    last = current or history[-1]
    # restarts are counted per run: an update starts the job afresh
    tracked = f"{svc.job_iteration}/{key}"
    at = restarts.decide(v, svc.id, tracked, last, now)
    if at is None:
        return  # the restart policy gives up: the slot stays failed
    if at > now:
        progress.waiting_until(at)
        return
    restarts.record(svc.id, tracked, now)
    tx.put(new_task(svc, slot, node_id, job=True))
    progress.active += 1
