"""A service's running, desired and completed tasks (swarmkit's ServiceStatus): what
`service ls` shows as REPLICAS, and the manager's per-service metrics."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from orchestrator.manager.spec import view
from orchestrator.store.objects import Node, NodeState, Service, Task, TaskState


@dataclass(frozen=True)
class ServiceStatus:
    running: int
    desired: int
    completed: int


def service_status(svc: Service, tasks: Iterable[Task], nodes: dict[str, Node]) -> ServiceStatus:
    """`tasks`: the service's (others are ignored); `nodes`: every node by ID."""
    v = view(svc.spec)
    mine = [t for t in tasks if t.service_id == svc.id]
    if v.job:  # the tasks of the job's current run
        mine = [t for t in mine if t.job_iteration == svc.job_iteration]
    running = sum(
        1
        for t in mine
        if t.state == TaskState.RUNNING
        and t.desired_state == TaskState.RUNNING
        and nodes.get(t.node_id) is not None
        and nodes[t.node_id].state != NodeState.DOWN
    )
    if v.mode == "replicated":
        desired = v.replicas
    elif v.mode == "replicated-job":
        desired = v.max_concurrent
    else:  # one per node: the tasks meant to run (a job's: those not complete yet)
        desired = sum(
            1
            for t in mine
            if t.desired_state == TaskState.RUNNING
            and not (v.job and t.state == TaskState.COMPLETE)
        )
    completed = sum(1 for t in mine if t.state == TaskState.COMPLETE)
    return ServiceStatus(running, desired, completed)
