"""What handlers reach through the request: the node runtime, and its manager if it is one."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from orchestrator.api.docker import ApiError
from orchestrator.node import ManagerRuntime, NodeRuntime

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


def manager_or_503(request: web.Request) -> ManagerRuntime:
    node = API.of(request).node
    if node.manager is None:
        raise ApiError(503, WORKER if node.membership is not None else NOT_MANAGER)
    return node.manager
