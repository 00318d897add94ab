"""What a namespace's load balancer must do, derived from the mesh state.

A Frontend spreads connections round-robin over a service's task endpoints on one network:
- in the node's namespace, one per published port: protocol and published port on any local
  address, DNATed to the target port of a task on the ingress network (publish mode ingress),
  or of one of the service's tasks on this node, at its first address (publish mode host);
- in a task's namespace, one per (service, network, protocol): any port of the service's VIP
  there, DNATed to a task's address with the port kept (target_port 0), as Docker's VIPs do.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import NamedTuple

from mesh.state import Endpoint, MeshState, Network


class Backend(NamedTuple):
    ip: ipaddress.IPv4Address
    port: int
    task: str


class Frontend(NamedTuple):
    """Tuples, not dataclasses: a sync compares every frontend, and tuples compare in C."""

    service: str
    network: str
    protocol: str  # tcp | udp
    target_port: int  # 0: every port, kept as it is (VIP frontends)
    vip: ipaddress.IPv4Address | None
    published: int | None
    backends: tuple[Backend, ...]
    host_mode: bool = False  # a host-mode published port: this node's tasks only

    @property
    def key(self) -> str:
        """Unique in its namespace: a published port is one frontend (several may share a
        target port), a VIP one per protocol."""
        if self.published:
            mode = "host" if self.host_mode else self.network
            return f"{self.service}/{mode}/{self.protocol}/{self.published}"
        return f"{self.service}/{self.network}/{self.protocol}/{self.target_port}"

    def describe(self) -> str:
        if self.published:
            how = "host mode, this node's tasks" if self.host_mode else self.network
            return (
                f"{self.service} {self.protocol}/{self.target_port} on {how}, "
                f"published {self.published}"
            )
        return f"{self.service} VIP {self.vip} {self.protocol}, every port, on {self.network}"


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
    if node:
        out.update(_host_frontends(state))
    nets = state.networks_by_name
    for svc in state.services:
        if svc.endpoint_mode != "vip":
            continue
        for net_name, vip in svc.vips.items():
            net: Network = nets[net_name]
            if net_name not in networks or (node and not net.ingress):
                continue
            endpoints = state.backends(svc, net_name)
            if node:
                for port in svc.ports:
                    if port.published is None or port.mode != "ingress":
                        continue
                    fe = Frontend(
                        svc.name,
                        net_name,
                        port.protocol,
                        port.target,
                        None,
                        port.published,
                        tuple(Backend(e.ip, port.target, e.task) for e in endpoints),
                    )
                    out[fe.key] = fe
                continue
            backends = tuple(Backend(e.ip, 0, e.task) for e in endpoints)
            for proto in ("tcp", "udp"):
                fe = Frontend(svc.name, net_name, proto, 0, vip, None, backends)
                out[fe.key] = fe
    return out


def _host_frontends(state: MeshState) -> dict[str, Frontend]:
    """Host-mode ports of the services with tasks running here: each DNATs to those tasks'
    first addresses (their default route's network, so replies come back through this node).
    The scheduler never puts two tasks holding one host port on a node; should a state say so
    anyway, the first service listed keeps the port."""
    first: dict[str, Endpoint] = {}
    for e in state.local_endpoints():
        first.setdefault(e.task, e)
    out: dict[str, Frontend] = {}
    taken: set[tuple[str, int]] = set()
    for svc in state.services:
        local = [first[t] for t in svc.tasks if t in first]
        if not local:
            continue
        for port in svc.ports:
            if port.mode != "host" or port.published is None:
                continue
            if (port.protocol, port.published) in taken:
                continue
            taken.add((port.protocol, port.published))
            fe = Frontend(
                svc.name,
                local[0].network,
                port.protocol,
                port.target,
                None,
                port.published,
                tuple(Backend(e.ip, port.target, e.task) for e in local),
                host_mode=True,
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
