"""What handlers reach through the request: the node runtime, and its manager if it is one."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from orchestrator.api.docker import ApiError
from orchestrator.manager.runtime import ManagerRuntime
from orchestrator.node import NodeRuntime
from orchestrator.store.log import NotLeader

NOT_MANAGER = (
    'This node is not a swarm manager. Use "docker swarm init" or "docker swarm '
    'join" to connect this node to swarm and try again.'
)
WORKER = (
    "This node is not a swarm manager. Worker nodes can't be used to view or modify "
    "cluster state. Please run this command on a manager node or promote the current node "
    "to a manager."
)


@dataclass
class API:
    node: NodeRuntime
    key = web.AppKey("api", object)

    @staticmethod
    def of(request: web.Request) -> API:
        api = request.app[API.key]
        assert isinstance(api, API)
        return api


LOCKED = (
    'Swarm is encrypted and needs to be unlocked before it can be used. Please use "shoal '
    'swarm unlock" (or "docker swarm unlock") to unlock it.'
)
NO_LEADER = (
    "The swarm does not have a leader. It's possible that too few managers are online. "
    "Make sure more than half of the managers are online."
)


async def manager_or_503(request: web.Request) -> ManagerRuntime:
    """This node's manager, with its store up to date with every committed write (so a
    request to any manager sees what any other acknowledged); 503 on a worker or without a
    leader."""
    node = API.of(request).node
    manager = node.manager
    if node.locked:
        raise ApiError(503, LOCKED)
    if manager is None:
        raise ApiError(503, WORKER if node.membership is not None else NOT_MANAGER)
    try:
        await manager.raft.read_barrier()
    except NotLeader as e:
        raise ApiError(503, f"{NO_LEADER} ({e})") from None
    return manager
