"""Creating tasks and naming them."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from orchestrator.manager.spec import same_task_template
from orchestrator.store.ids import new_id, now_rfc3339
from orchestrator.store.objects import Availability, Node, NodeState, Service, Task, TaskState


def new_task(svc: Service, slot: int, node_id: str = "", job: bool = False) -> Task:
    """A task of the service for the slot (or node); `job`: a task of the job's current run."""
    return Task(
        id=new_id(),
        service_id=svc.id,
        slot=slot,
        node_id=node_id,
        spec=copy.deepcopy(svc.spec.get("TaskTemplate", {})),
        spec_version=svc.spec_version,
        desired_state=TaskState.RUNNING,
        state=TaskState.NEW,
        timestamp=now_rfc3339(),
        message="created",
        job_iteration=svc.job_iteration if job else None,
        host_ports=host_ports(svc),
    )


def host_ports(svc: Service) -> list[dict[str, Any]]:
    """The service's host-mode ports, which each of its tasks holds on its node."""
    return [dict(p) for p in svc.ports if p.get("PublishMode") == "host"]


def task_name(service_name: str, task: Task) -> str:
    """The container name Docker gives a task: <service>.<slot or node>.<task id>."""
    return f"{service_name}.{task.slot or task.node_id}.{task.id}"


def shown_desired_state(task: Task) -> TaskState:
    """The desired state as Docker shows it: a job's task is meant to complete (it is kept
    RUNNING in the store, which is what agents run and the dispatcher sends)."""
    if task.job_iteration is not None and task.desired_state == TaskState.RUNNING:
        return TaskState.COMPLETE
    return task.desired_state


def runnable(task: Task) -> bool:
    return task.desired_state <= TaskState.RUNNING


def dirty(svc: Service, task: Task) -> bool:
    """Runs an older spec than the service's, or holds other host-mode ports than it
    publishes (a task takes its node's ports where the scheduler found them free, so new
    ones mean a new task, as in Docker; ingress ports change without one)."""
    return not same_task_template(
        task.spec, svc.spec.get("TaskTemplate", {})
    ) or task.host_ports != host_ports(svc)


def node_usable(node: Node | None) -> bool:
    """A node that may keep running tasks: known, not down, not drained."""
    return (
        node is not None
        and node.state != NodeState.DOWN
        and node.availability != Availability.DRAIN
    )


def stop(task: Task, desired: TaskState = TaskState.SHUTDOWN, message: str = "") -> Task:
    return dataclasses.replace(
        task, desired_state=max(task.desired_state, desired), message=message or task.message
    )
