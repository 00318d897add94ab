"""shoald's metrics without a lab: a manager's store under swarmkit's names, the API's requests
by route, and the node's :9323 serving the mesh's metrics after its own (a real shoal-mesh
collector behind a real unix socket); all of it clean for `promtool check metrics`.
tests/test_prometheus_lab.py checks the same on a lab's nodes, through a real Prometheus."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mesh.metrics import MeshStatus, make_registry
from orchestrator.api.server import build
from orchestrator.manager.metrics import SwarmCollector
from orchestrator.metrics import NodeMetricsServer
from orchestrator.node import NodeConfig, NodeRuntime
from orchestrator.raft.node import RaftNode
from orchestrator.raft.storage import on_disk
from orchestrator.raft.transport import MemoryNetwork
from orchestrator.store.objects import Node, NodeState, Service, Task, TaskState
from orchestrator.store.store import Store, Tx

PROMTOOL = "/usr/bin/promtool"  # Debian's prometheus package


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition by (name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def promtool_clean(text: str) -> None:
    check = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0 and not (check.stdout + check.stderr).strip(), (
        check.stdout + check.stderr
    )


def web_service(replicas: int) -> Service:
    spec = {
        "Name": "web",
        "Mode": {"Replicated": {"Replicas": replicas}},
        "TaskTemplate": {"ContainerSpec": {"Image": "micro"}},
    }
    return Service(id="svc-web", spec=spec)


def test_a_manager_counts_its_store_under_swarmkits_names(tmp_path: Path) -> None:
    async def run() -> str:
        registry = CollectorRegistry(auto_describe=False)
        raft = RaftNode(
            1, "", on_disk(tmp_path), MemoryNetwork().transport(1), bootstrap=True,
            registry=registry,
        )  # fmt: skip
        store = Store(raft, registry)
        registry.register(SwarmCollector(store, lambda: raft.is_leader))
        await raft.start()

        def setup(tx: Tx) -> None:
            for i, node_state in enumerate([NodeState.READY, NodeState.READY, NodeState.DOWN]):
                tx.put(Node(id=f"n{i}", hostname=f"sw{i + 1}", state=node_state))
            tx.put(web_service(replicas=4))
            for slot, (node, state) in enumerate(
                [("n0", TaskState.RUNNING), ("n1", TaskState.RUNNING),
                 ("n2", TaskState.RUNNING), ("", TaskState.PENDING)],
                start=1,
            ):  # fmt: skip
                tx.put(Task(id=f"t{slot}", service_id="svc-web", slot=slot, node_id=node,
                            state=state))  # fmt: skip

        await store.update(setup)
        await store.update(lambda tx: tx.put(Node(id="n3", state=NodeState.READY)))
        text = generate_latest(registry).decode()
        await raft.close()
        return text

    text = asyncio.run(run())
    got = samples(text)
    assert got[("swarm_manager_leader", ())] == 1
    nodes = {dict(labels)["state"]: v for (name, labels), v in got.items()
             if name == "swarm_manager_nodes"}  # fmt: skip
    assert nodes == {"ready": 3, "down": 1, "disconnected": 0, "unknown": 0}
    assert got[("swarm_manager_tasks_total", (("state", "running"),))] == 3
    assert got[("swarm_manager_tasks_total", (("state", "pending"),))] == 1
    assert got[("swarm_manager_services_total", ())] == 1
    assert got[("swarm_manager_networks_total", ())] == 0
    assert got[("swarm_manager_secrets_total", ())] == 0
    assert got[("swarm_manager_configs_total", ())] == 0
    web = (("mode", "replicated"), ("service", "web"))
    # the task on the down node does not count as running, as in `service ls`
    assert (
        got[("shoal_service_desired_tasks", web)],
        got[("shoal_service_running_tasks", web)],
    ) == (4, 2)
    assert got[("swarm_store_write_tx_latency_seconds_count", ())] == 2
    assert got[("shoal_raft_proposals_total", (("outcome", "committed"),))] == 2
    assert got[("swarm_raft_transaction_latency_seconds_count", ())] == 2
    assert got[("shoal_raft_term", ())] >= 1
    assert got[("shoal_raft_leader_changes_total", ())] == 1
    assert got[("shoal_raft_members", (("suffrage", "voter"),))] == 1
    assert "# TYPE swarm_manager_services_total untyped" in text
    promtool_clean(text)


def test_api_requests_are_counted_by_route_not_by_path(tmp_path: Path) -> None:
    async def run() -> str:
        registry = CollectorRegistry(auto_describe=False)
        node = NodeRuntime(NodeConfig(tmp_path, "sw1", "tmetrics"), registry)
        runner = web.AppRunner(build(node, registry))
        await runner.setup()
        sock = tmp_path / "api.sock"
        await web.UnixSite(runner, str(sock)).start()
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as api:
            for path in ("/_ping", "/_ping", "/v1.41/swarm", "/swarm", "/nope/1", "/nope/2"):
                async with api.get(f"http://shoald{path}") as r:
                    await r.read()
        await runner.cleanup()
        return generate_latest(registry).decode()

    text = asyncio.run(run())
    requests = {
        tuple(dict(labels)[k] for k in ("route", "method", "status")): v
        for (name, labels), v in samples(text).items()
        if name == "shoal_api_requests_total"
    }
    # a node outside a swarm answers /swarm with 503; an unknown path is one route
    assert requests == {
        ("/_ping", "GET", "200"): 2,
        ("/swarm", "GET", "503"): 2,
        ("unmatched", "GET", "404"): 2,
    }
    promtool_clean(text)


def test_the_node_serves_the_mesh_after_its_own_and_survives_its_absence(
    tmp_path: Path,
) -> None:
    async def run() -> tuple[str, str]:
        # the mesh: its real collector, served on a unix socket as `--metrics-socket` does
        mesh_registry, durations = make_registry(MeshStatus())
        durations.labels("full").observe(0.01)

        async def mesh_metrics(_: web.Request) -> web.Response:
            return web.Response(body=generate_latest(mesh_registry))

        mesh_app = web.Application()
        mesh_app.router.add_get("/metrics", mesh_metrics)
        mesh = web.AppRunner(mesh_app)
        await mesh.setup()
        sock = tmp_path / "metrics.sock"
        await web.UnixSite(mesh, str(sock)).start()

        registry = CollectorRegistry(auto_describe=False)
        Counter("shoal_test_things_total", "Things.", registry=registry).inc(3)
        server = NodeMetricsServer(registry, sock, "127.0.0.1", 0)
        await server.start()
        host, port = server.address
        async with aiohttp.ClientSession() as client:

            async def scrape() -> str:
                async with client.get(f"http://{host}:{port}/metrics") as r:
                    assert r.status == 200
                    return await r.text()

            both = await scrape()
            await mesh.cleanup()
            alone = await scrape()
        await server.stop()
        return both, alone

    both, alone = asyncio.run(run())
    got = samples(both)
    assert got[("shoal_test_things_total", ())] == 3
    assert got[("shoal_mesh_up", ())] == 1
    assert got[("shoal_mesh_sync_duration_seconds_count", (("mode", "full"),))] == 1
    assert both.index("shoal_test_things_total") < both.index("shoal_mesh_info")
    promtool_clean(both)
    got = samples(alone)
    assert got[("shoal_test_things_total", ())] == 3
    assert got[("shoal_mesh_up", ())] == 0
    assert not [
        name for name, _ in got if name.startswith("shoal_mesh_") and name != "shoal_mesh_up"
    ]
    promtool_clean(alone)
