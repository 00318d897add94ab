"""/nodes: list, inspect, update (availability, labels, role), remove."""

from __future__ import annotations

import dataclasses

from aiohttp import web

from orchestrator.api.context import manager_or_503
from orchestrator.api.convert import node_json
from orchestrator.api.docker import (
    ApiError,
    body,
    bool_value,
    filters,
    json_response,
)
from orchestrator.api.resolve import resolve
from orchestrator.node import DEFAULT_PORT, ENGINE_VERSION
from orchestrator.store.ids import new_raft_id
from orchestrator.store.objects import Availability, Cluster, Node, NodeState, Role
from orchestrator.store.store import Tx

FILTERS = {"id", "label", "membership", "name", "node.label", "role"}


async def find(request: web.Request, ref: str) -> Node:
    store = (await manager_or_503(request)).store
    node: Node = resolve(
        store.list(Node), ref, "node", lambda n: n.name or n.hostname, lambda n: n.id
    )
    return node


async def manager_view(request: web.Request) -> tuple[int, dict[int, str]]:
    """The leader's Raft ID and each member's reachability, for ManagerStatus."""
    manager = await manager_or_503(request)
    return manager.raft.leader, await manager.manager_statuses()


async def list_nodes(request: web.Request) -> web.Response:
    store = (await manager_or_503(request)).store
    f = filters(request, FILTERS)
    leader, reach = await manager_view(request)
    out = []
    for n in sorted(store.list(Node), key=lambda n: (n.hostname, n.id)):
        if "id" in f and not any(n.id.startswith(v) for v in f["id"]):
            continue
        if "name" in f and not any(v in (n.name or n.hostname) for v in f["name"]):
            continue
        if "role" in f and n.role not in f["role"]:
            continue
        if "membership" in f and "accepted" not in f["membership"]:
            continue
        labels = [*f.get("label", []), *f.get("node.label", [])]
        if not all(_has_label(n.labels, lab) for lab in labels):
            continue
        out.append(node_json(n, leader, reach, ENGINE_VERSION))
    return json_response(out)


def _has_label(labels: dict[str, str], spec: str) -> bool:
    key, eq, value = spec.partition("=")
    return key in labels and (not eq or labels[key] == value)


async def inspect(request: web.Request) -> web.Response:
    node = await find(request, request.match_info["id"])
    leader, reach = await manager_view(request)
    return json_response(node_json(node, leader, reach, ENGINE_VERSION))


async def update(request: web.Request) -> web.Response:
    store = (await manager_or_503(request)).store
    node = await find(request, request.match_info["id"])
    spec = await body(request)
    version = request.query.get("version", "")
    given_availability = spec.get("Availability", node.availability)
    try:
        availability = Availability(given_availability)
    except ValueError:
        raise ApiError(
            400, f"invalid availability {given_availability!r}: use active, pause or drain"
        ) from None
    given_role = spec.get("Role", node.role)
    try:
        role = Role(given_role)
    except ValueError:
        raise ApiError(400, f"invalid role {given_role!r}: use manager or worker") from None
    if role == Role.WORKER and node.role == Role.MANAGER:
        await _check_demotion(request, node)
    labels = spec.get("Labels") or {}
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise ApiError(400, "Labels: expected an object of strings")

    def fn(tx: Tx) -> None:
        current = tx.get(Node, node.id)
        if current is None:
            raise ApiError(404, f"node {node.id} not found")
        if str(current.meta.version) != version:
            raise ApiError(500, "rpc error: code = Unknown desc = update out of sequence")
        changed = dataclasses.replace(
            current,
            availability=availability,
            labels=dict(labels),
            name=str(spec.get("Name") or ""),
        )
        if role == Role.MANAGER and current.role != Role.MANAGER:
            # a fresh Raft ID every time: a removed member's ID is never reused
            changed = dataclasses.replace(
                changed,
                role=Role.MANAGER,
                raft_id=new_raft_id(),
                manager_addr=current.manager_addr or f"{current.addr}:{DEFAULT_PORT}",
            )
        elif role == Role.WORKER:
            changed = dataclasses.replace(changed, role=Role.WORKER)
        tx.put(changed)

    await store.update(fn)
    return web.Response(status=200)


async def _check_demotion(request: web.Request, node: Node) -> None:
    """Refuse a demotion that would leave the managers without a quorum (as Docker does)."""
    manager = await manager_or_503(request)
    voters = manager.raft.voters()
    if node.raft_id not in voters:
        return
    remaining = voters - {node.raft_id}
    if not remaining:
        raise ApiError(
            400,
            "rpc error: code = FailedPrecondition desc = attempting to demote the last "
            "manager of the swarm",
        )
    reach = await manager.manager_statuses()
    reachable = sum(1 for rid in remaining if reach.get(rid) == "reachable")
    if reachable <= len(remaining) // 2:
        raise ApiError(
            400,
            "rpc error: code = FailedPrecondition desc = can't remove member from the raft: "
            "this would result in a loss of quorum",
        )


async def remove(request: web.Request) -> web.Response:
    store = (await manager_or_503(request)).store
    node = await find(request, request.match_info["id"])
    force = bool_value(request.query.get("force"))
    if node.role == Role.MANAGER:
        raise ApiError(
            400,
            f"rpc error: code = FailedPrecondition desc = node {node.id} is a "
            "cluster manager and is a member of the raft cluster. It must be "
            "demoted to worker before removal",
        )
    if node.state != NodeState.DOWN and not force:
        raise ApiError(
            400,
            f"rpc error: code = FailedPrecondition desc = node {node.id} is not "
            "down and can't be removed",
        )

    def fn(tx: Tx) -> None:
        tx.delete(Node, node.id)
        # its certificate still verifies: refuse it until it expires (swarmkit's blacklist)
        for cluster in tx.list(Cluster):
            denied = {**cluster.denied_nodes, node.id: node.cert_not_after}
            tx.put(dataclasses.replace(cluster, denied_nodes=denied))

    await store.update(fn)
    return web.Response(status=200)


ROUTES = [
    ("GET", "/nodes", list_nodes),
    ("GET", "/nodes/{id}", inspect),
    ("POST", "/nodes/{id}/update", update),
    ("DELETE", "/nodes/{id}", remove),
]
