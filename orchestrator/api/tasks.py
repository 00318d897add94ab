"""/tasks: list (with the filters the CLI uses, `_up-to-date` included), inspect, logs."""

from __future__ import annotations

from aiohttp import web

from orchestrator.api.context import manager_or_503
from orchestrator.api.convert import task_json
from orchestrator.api.docker import ApiError, filters, json_response
from orchestrator.api.resolve import resolve
from orchestrator.api.services import stream_logs
from orchestrator.manager.orchestrator.tasks import dirty, shown_desired_state, task_name
from orchestrator.store.objects import Network, Node, Service, Task, TaskState

FILTERS = {"desired-state", "id", "label", "name", "node", "service", "_up-to-date"}


async def list_tasks(request: web.Request) -> web.Response:
    store = (await manager_or_503(request)).store
    f = filters(request, FILTERS)
    services = {s.id: s for s in store.list(Service)}
    nodes = store.list(Node)
    service_ids: set[str] | None = None
    if "service" in f:
        service_ids = set()
        for ref in f["service"]:
            service_ids |= {
                s.id for s in services.values() if ref in (s.id, s.name) or s.id.startswith(ref)
            }
    node_ids: set[str] | None = None
    if "node" in f:
        node_ids = set()
        for ref in f["node"]:
            node_ids |= {
                n.id for n in nodes if ref in (n.id, n.hostname, n.name) or n.id.startswith(ref)
            }
    desired = set()
    for d in f.get("desired-state", []):
        try:
            desired.add(TaskState.parse("shutdown" if d == "shutdown" else d))
        except KeyError:
            raise ApiError(
                400,
                f"Invalid desired-state filter value {d!r}: use running, shutdown, accepted "
                "or complete",
            ) from None
    networks = {n.id: n for n in store.list(Network)}
    out = []
    for t in sorted(store.list(Task), key=lambda t: (t.service_id, t.slot, t.meta.created_at)):
        svc = services.get(t.service_id)
        if service_ids is not None and t.service_id not in service_ids:
            continue
        if node_ids is not None and t.node_id not in node_ids:
            continue
        if "id" in f and not any(t.id.startswith(v) for v in f["id"]):
            continue
        if "name" in f and not (
            svc and any(task_name(svc.name, t).startswith(v) for v in f["name"])
        ):
            continue
        if desired and not _desired_matches(t, desired):
            continue
        if "_up-to-date" in f and (
            svc is None or dirty(svc, t) or t.desired_state != TaskState.RUNNING
        ):
            continue
        out.append(task_json(t, networks))
    return json_response(out)


def _desired_matches(t: Task, wanted: set[TaskState]) -> bool:
    # "shutdown" covers every desired state past running (shutdown, remove), as Docker does;
    # a job's tasks are meant to complete
    state = shown_desired_state(t)
    if state > TaskState.RUNNING and state != TaskState.COMPLETE:
        state = TaskState.SHUTDOWN
    return state in wanted


async def inspect(request: web.Request) -> web.Response:
    store = (await manager_or_503(request)).store
    t = resolve(store.list(Task), request.match_info["id"], "task", lambda t: t.id, lambda t: t.id)
    return json_response(task_json(t, {n.id: n for n in store.list(Network)}))


async def logs(request: web.Request) -> web.StreamResponse:
    store = (await manager_or_503(request)).store
    t = resolve(store.list(Task), request.match_info["id"], "task", lambda t: t.id, lambda t: t.id)
    return await stream_logs(request, [t], bool(t.spec.get("ContainerSpec", {}).get("TTY")))


ROUTES = [
    ("GET", "/tasks", list_tasks),
    ("GET", "/tasks/{id}", inspect),
    ("GET", "/tasks/{id}/logs", logs),
]
