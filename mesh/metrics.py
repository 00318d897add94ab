"""Prometheus metrics of a node's mesh (served at /metrics, port 9323 by default).

Connection counts come from the kernel at scrape time: every frontend's chosen backend bumps a
named nftables counter, and only a connection's first packet passes there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mesh.dns.server import RCODE_NAMES, DnsStats
from mesh.lb.base import BackendCount
from mesh.state import MeshState


@dataclass
class MeshStatus:
    """What the daemon knows, for the collector to read."""

    lb_backend: str = "nftables"
    state: MeshState | None = None
    sync_errors: int = 0
    last_sync_ok: bool = True
    counts: Callable[[], list[tuple[str, BackendCount]]] = field(default=lambda: [])
    dns: DnsStats = field(default_factory=DnsStats)


class MeshCollector(Collector):
    def __init__(self, status: MeshStatus):
        self.status = status

    def collect(self) -> Iterable[Metric]:
        s = self.status
        info = GaugeMetricFamily(
            "shoal_mesh_info", "The mesh daemon; labels say how it runs.", labels=["lb_backend"]
        )
        info.add_metric([s.lb_backend], 1)
        yield info

        conns = CounterMetricFamily(
            "shoal_mesh_backend_connections",
            "New connections the load balancer sent to each backend, by service and frontend "
            "(published: a published port of this node; vip: a service VIP, from local tasks).",
            labels=["service", "network", "protocol", "port", "frontend", "backend", "task"],
        )
        totals: dict[tuple[str, str, str, str, str, str, str], int] = {}
        for kind, c in s.counts():
            fe, b = c.frontend, c.backend
            key = (
                fe.service,
                fe.network,
                fe.protocol,
                str(fe.published or fe.target_port or "any"),
                kind,
                f"{b.ip}:{b.port}" if b.port else str(b.ip),
                b.task,
            )
            totals[key] = totals.get(key, 0) + c.connections
        for key, value in totals.items():
            conns.add_metric(list(key), value)
        yield conns

        errors = CounterMetricFamily(
            "shoal_mesh_sync_errors", "Syncs that failed in part or in whole."
        )
        errors.add_metric([], s.sync_errors)
        yield errors

        dns = CounterMetricFamily(
            "shoal_mesh_dns_queries",
            "DNS queries answered by the embedded server, by response code.",
            labels=["rcode"],
        )
        for code, name in RCODE_NAMES.items():
            dns.add_metric([name], s.dns.rcodes[code])
        yield dns
        fwd = CounterMetricFamily(
            "shoal_mesh_dns_forwarded_queries", "DNS queries forwarded to the node's resolvers."
        )
        fwd.add_metric([], s.dns.forwarded)
        yield fwd

        peers = GaugeMetricFamily(
            "shoal_mesh_overlay_peers",
            "Other nodes this node reaches on each overlay network.",
            labels=["network"],
        )
        endpoints = GaugeMetricFamily(
            "shoal_mesh_local_endpoints",
            "Task endpoints on this node, by network.",
            labels=["network"],
        )
        generation = GaugeMetricFamily(
            "shoal_mesh_state_generation", "Generation of the desired state last applied."
        )
        if s.state is not None:
            for net in s.state.networks:
                if s.state.node in net.gateways:
                    peers.add_metric(
                        [net.name], len([n for n in net.gateways if n != s.state.node])
                    )
                    endpoints.add_metric(
                        [net.name],
                        len([e for e in s.state.local_endpoints() if e.network == net.name]),
                    )
            generation.add_metric([], s.state.generation)
        yield peers
        yield endpoints
        yield generation


def make_registry(status: MeshStatus) -> tuple[CollectorRegistry, Histogram]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MeshCollector(status))
    durations = Histogram(
        "shoal_mesh_sync_duration_seconds",
        "Time to make the kernel match a desired state.",
        ["mode"],
        registry=registry,
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    )
    return registry, durations
