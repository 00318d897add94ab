"""What a namespace's load balancer must do, derived from the mesh state.

A Frontend is one (service, network, protocol, target port): connections to the service's VIP
on that network (and, on an ingress network, to the published port on any local address) are
spread round-robin over the service's task endpoints on that network.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import NamedTuple

from mesh.state import MeshState, Network


class Backend(NamedTuple):
    ip: ipaddress.IPv4Address
    port: int
    task: str


class Frontend(NamedTuple):
    """Tuples, not dataclasses: a sync compares every frontend, and tuples compare in C."""

    service: str
    network: str
    protocol: str  # tcp | udp
    target_port: int
    vip: ipaddress.IPv4Address | None
    published: int | None
    backends: tuple[Backend, ...]

    @property
    def key(self) -> str:
        return f"{self.service}/{self.network}/{self.protocol}/{self.target_port}"

    def describe(self) -> str:
        pub = f", published {self.published}" if self.published else ""
        return f"{self.service} {self.protocol}/{self.target_port} on {self.network}{pub}"


@dataclass(frozen=True)
class NamespaceLB:
    """The load-balancing duties of one namespace."""

    frontends: dict[str, Frontend]
    node: bool  # the node namespace: published ports, masquerade, task egress
    overlay_subnets: tuple[ipaddress.IPv4Network, ...] = ()


def frontends_for(state: MeshState, networks: set[str], node: bool) -> dict[str, Frontend]:
    """Published-port frontends (node namespace) or VIP frontends (task namespaces).

    The node namespace does not answer VIPs: tasks reach VIPs through their own tables, and
    keeping VIPs out of the node table keeps its kernel validation walk small.
    """
    out: dict[str, Frontend] = {}
    nets = state.networks_by_name
    for svc in state.services:
        if svc.endpoint_mode != "vip":
            continue
        for net_name, vip in svc.vips.items():
            net: Network = nets[net_name]
            if net_name not in networks or (node and not net.ingress):
                continue
            endpoints = state.backends(svc, net_name)
            for port in svc.ports:
                if node and port.published is None:
                    continue
                fe = Frontend(
                    service=svc.name,
                    network=net_name,
                    protocol=port.protocol,
                    target_port=port.target,
                    vip=None if node else vip,
                    published=port.published if node else None,
                    backends=tuple(Backend(e.ip, port.target, e.task) for e in endpoints),
                )
                out[fe.key] = fe
    return out


def node_lb(state: MeshState) -> NamespaceLB:
    """The node namespace: published ports, for clients anywhere."""
    names = {n.name for n in state.networks}
    return NamespaceLB(
        frontends_for(state, names, node=True),
        node=True,
        overlay_subnets=tuple(n.subnet for n in state.networks),
    )


def task_lb(state: MeshState, networks: set[str]) -> NamespaceLB:
    """A task's namespace: the VIPs of the networks it is attached to."""
    return NamespaceLB(frontends_for(state, networks, node=False), node=False)
