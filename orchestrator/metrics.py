"""The node's metrics on :9323 (Docker's metrics address), one port for both daemons.

shoald serves `/metrics`: its own (the Engine API's, the agent's; on a manager, the store's,
Raft's, the dispatcher's and the control loops', under swarmkit's names where it has them:
docs/metrics.md), then the node's shoal-mesh's, which it reads at scrape time from the unix
socket it told shoal-mesh to serve on (`shoal-mesh run --metrics-socket`). Two expositions
of disjoint metric families concatenate into one. A mesh that does not answer leaves its
part out and `shoal_mesh_up` at 0, so a scrape never fails for the mesh's sake.

Run alone (the mesh lab, `shoal-mesh run` by hand), shoal-mesh serves :9323 itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# a scrape waits at most this long for the mesh's part (Prometheus's timeout is 10 s)
MESH_TIMEOUT = 5.0


class RegistriesCollector(Collector):
    """The metrics of registries that come and go (a manager's, its control loops' of the
    term they run in), read through at scrape time rather than registered and unregistered."""

    def __init__(self, registries: Callable[[], list[CollectorRegistry]]):
        self.registries = registries

    def collect(self) -> Iterable[Metric]:
        for registry in self.registries():
            yield from registry.collect()


@dataclass
class NodeIdentity:
    """What swarmkit's node metrics say of the node (node/node.go)."""

    swarm_id: str
    node_id: str
    manager: bool


class NodeInfoCollector(Collector):
    """`swarm_node_info{swarm_id,node_id}` and `swarm_node_manager`, while in a swarm."""

    def __init__(self, membership: Callable[[], NodeIdentity | None]):
        self.membership = membership

    def collect(self) -> Iterable[Metric]:
        m = self.membership()
        if m is None:
            return
        info = GaugeMetricFamily(
            "swarm_node_info", "Information related to the swarm", labels=["swarm_id", "node_id"]
        )
        info.add_metric([m.swarm_id, m.node_id], 1)
        yield info
        yield GaugeMetricFamily(
            "swarm_node_manager", "Whether this node is a manager or not", 1 if m.manager else 0
        )


def mesh_up(up: bool) -> bytes:
    return (
        "# HELP shoal_mesh_up 1 if the node's shoal-mesh answered this scrape, else 0.\n"
        "# TYPE shoal_mesh_up gauge\n"
        f"shoal_mesh_up {1.0 if up else 0.0}\n"
    ).encode()


class NodeMetricsServer:
    """`/metrics` at host:port: `registry`'s metrics, then the mesh's from `mesh_socket`."""

    def __init__(self, registry: CollectorRegistry, mesh_socket: Path, host: str, port: int):
        self.registry = registry
        self.mesh_socket = mesh_socket
        self.host, self.port = host, port
        self._runner: web.AppRunner | None = None
        self._mesh: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    @property
    def address(self) -> tuple[str, int]:
        """Where it listens (port 0 given: the port the kernel chose)."""
        assert self._runner is not None, "not started"
        host, port = self._runner.addresses[0][:2]
        return str(host), int(port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._mesh is not None:
            await self._mesh.close()
            self._mesh = None

    async def _metrics(self, _: web.Request) -> web.Response:
        # in the event loop: the collectors read the store and the Raft node, which are its
        own = generate_latest(self.registry)
        mesh = await self._mesh_metrics()
        body = own + mesh_up(mesh is not None) + (mesh or b"")
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _mesh_metrics(self) -> bytes | None:
        if self._mesh is None:
            self._mesh = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=str(self.mesh_socket)),
                timeout=aiohttp.ClientTimeout(total=MESH_TIMEOUT),
            )
        try:
            async with self._mesh.get("http://shoal-mesh/metrics") as response:
                if response.status != 200:
                    log.warning("shoal-mesh answered /metrics with %d", response.status)
                    return None
                return await response.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            log.debug("shoal-mesh's metrics: %s", e)
            return None
