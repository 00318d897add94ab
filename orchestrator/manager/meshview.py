"""What a node's data plane needs to know: its mesh state (docs/mesh-state.md), built from the
store by the dispatcher for each node. The agent adds the namespaces of its local tasks.

A node takes part in the ingress network and in every network one of its tasks is on. Load
balancers send traffic only to tasks that run and are meant to; every task holding an address
(on any node) gets ARP/FDB entries, so a task can be reached as soon as it starts.
"""

from __future__ import annotations

import socket
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from mesh.state import Encryption, Endpoint, MeshState, PortConfig, mac_for_ip
from mesh.state import Network as MeshNetwork
from mesh.state import Service as MeshService
from orchestrator.manager.orchestrator.tasks import task_name
from orchestrator.manager.spec import view
from orchestrator.store.objects import Network, Node, NodeState, Service, Task, TaskState


def _attached(t: Task) -> bool:
    """Holds its addresses: placed on a node and not finished."""
    return bool(t.node_id) and t.state >= TaskState.ASSIGNED and not t.state.terminal


def _serving(t: Task) -> bool:
    return t.state == TaskState.RUNNING and t.desired_state == TaskState.RUNNING


def _address(text: str) -> IPv4Address:
    """The address of "a.b.c.d" or "a.b.c.d/len". inet_pton parses it in a quarter of
    ipaddress's time, and a view holds every task's addresses."""
    try:
        return IPv4Address(socket.inet_pton(socket.AF_INET, text.partition("/")[0]))
    except OSError:
        raise ValueError(f"not an IPv4 address: {text!r}") from None


def _port(p: dict[str, Any], endpoint_mode: str) -> PortConfig:
    """A service's allocated port as the mesh takes it: an ingress port is published on the
    routing mesh (not by a dnsrr service, which has no VIP), a host-mode port on the nodes of
    the service's tasks (their own port, not the cluster's)."""
    mode = p.get("PublishMode") or "ingress"
    published = p.get("PublishedPort") or None
    if mode == "ingress" and endpoint_mode != "vip":
        published = None
    return PortConfig(
        protocol=p["Protocol"],
        target=p["TargetPort"],
        published=published,
        name=p.get("Name") or None,
        mode="host" if mode == "host" and published else "ingress",
    )


def _peers(node_id: str, nodes: list[Node]) -> dict[str, IPv4Address]:
    """Every node not down (this one even then) with an underlay address. A node that gave
    none, or not an IPv4 one, is left out, with its gateways and endpoints, rather than spoil
    every node's state; without its own, this node's state is refused by its shoal-mesh."""
    peers = {}
    for n in nodes:
        if n.addr and (n.state != NodeState.DOWN or n.id == node_id):
            try:
                peers[n.id] = _address(n.addr)
            except ValueError:
                continue
    return peers


def mesh_state(
    node_id: str,
    nodes: list[Node],
    services: list[Service],
    tasks: list[Task],
    networks: list[Network],
    generation: int,
    encryption: Encryption | None = None,
) -> MeshState:
    """`encryption`: the keyring (manager/netkeys.py), sent only to a node with an encrypted
    network."""
    by_id = {n.id: n for n in nodes}
    svc_by_id = {s.id: s for s in services}
    mine = {nid for t in tasks if t.node_id == node_id and _attached(t) for nid in t.networks}
    here = [n for n in networks if n.ingress or n.id in mine]
    here_ids = {n.id for n in here}
    names = {n.id: n.name for n in networks}
    peers = _peers(node_id, nodes)
    out_networks = tuple(
        MeshNetwork(
            name=n.name,
            vni=n.vni,
            subnet=IPv4Network(n.subnet),
            gateways={
                nid: _address(node.gateways[n.id])
                for nid, node in by_id.items()
                if n.id in node.gateways and nid in peers
            },
            ingress=n.ingress,
            encrypted=n.encrypted,
        )
        for n in here
    )
    endpoints = []
    running: dict[str, list[str]] = {}
    for t in tasks:
        svc = svc_by_id.get(t.service_id)
        if svc is None or not _attached(t) or t.node_id not in peers:
            continue
        name = task_name(svc.name, t)
        for nid in t.networks:
            if nid in here_ids and nid in t.addresses:
                ip = _address(t.addresses[nid])
                endpoints.append(Endpoint(name, names[nid], t.node_id, ip, mac_for_ip(ip)))
        if _serving(t):
            running.setdefault(svc.id, []).append(name)
    out_services = []
    for svc in services:
        mode = view(svc.spec).endpoint_mode
        attached = [nid for nid in svc.vips if nid in here_ids] if mode == "vip" else list(here_ids)
        if not attached:
            continue
        out_services.append(
            MeshService(
                name=svc.name,
                endpoint_mode=mode,
                vips={names[nid]: _address(a) for nid, a in svc.vips.items() if nid in here_ids},
                ports=tuple(_port(p, mode) for p in svc.ports),
                tasks=tuple(sorted(running.get(svc.id, []))),
            )
        )
    return MeshState(
        node=node_id,
        peers=peers,
        networks=out_networks,
        endpoints=tuple(endpoints),
        services=tuple(out_services),
        generation=generation,
        encryption=encryption if any(n.encrypted for n in here) else None,
    )
