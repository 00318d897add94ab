"""What a node's data plane needs to know: its mesh state (docs/mesh-state.md), built from the
store by the dispatcher for each node. The agent adds the namespaces of its local tasks.

A node takes part in the ingress network and in every network one of its tasks is on. Load
balancers send traffic only to tasks that run and are meant to; every task holding an address
(on any node) gets ARP/FDB entries, so a task can be reached as soon as it starts.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from orchestrator.manager.orchestrator.tasks import task_name
from orchestrator.manager.spec import view
from orchestrator.store.objects import Network, Node, Service, Task, TaskState


def _attached(t: Task) -> bool:
    """Holds its addresses: placed on a node and not finished."""
    return bool(t.node_id) and t.state >= TaskState.ASSIGNED and not t.state.terminal


def _serving(t: Task) -> bool:
    return t.state == TaskState.RUNNING and t.desired_state == TaskState.RUNNING


def mesh_state(
    node_id: str,
    nodes: list[Node],
    services: list[Service],
    tasks: list[Task],
    networks: list[Network],
    generation: int,
    encryption: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`encryption`: the keyring (manager/netkeys.py), sent only to a node with an encrypted
    network."""
    by_id = {n.id: n for n in nodes}
    svc_by_id = {s.id: s for s in services}
    mine = {nid for t in tasks if t.node_id == node_id and _attached(t) for nid in t.networks}
    here = [n for n in networks if n.ingress or n.id in mine]
    here_ids = {n.id for n in here}
    names = {n.id: n.name for n in networks}
    peers = {n.id: n.addr for n in nodes if n.addr and n.state != "down"}
    peers.setdefault(node_id, by_id[node_id].addr if node_id in by_id else "")
    out_networks = []
    for n in here:
        gateways = {
            nid: node.gateways[n.id]
            for nid, node in by_id.items()
            if n.id in node.gateways and nid in peers
        }
        out_networks.append(
            {
                "name": n.name,
                "vni": n.vni,
                "subnet": n.subnet,
                "ingress": n.ingress,
                "encrypted": n.encrypted,
                "gateways": gateways,
            }
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
                endpoints.append(
                    {
                        "task": name,
                        "network": names[nid],
                        "node": t.node_id,
                        "ip": str(ipaddress.IPv4Interface(t.addresses[nid]).ip),
                    }
                )
        if _serving(t):
            running.setdefault(svc.id, []).append(name)
    out_services = []
    for svc in services:
        v = view(svc.spec)
        vips = {
            names[nid]: str(ipaddress.IPv4Interface(a).ip)
            for nid, a in svc.vips.items()
            if nid in here_ids
        }
        attached = (
            [nid for nid in svc.vips if nid in here_ids]
            if v.endpoint_mode == "vip"
            else [nid for nid in here_ids]
        )
        if not attached:
            continue
        ports = [
            {
                "protocol": p["Protocol"],
                "target": p["TargetPort"],
                **(
                    {"published": p["PublishedPort"]}
                    if p.get("PublishMode") == "ingress" and p.get("PublishedPort")
                    else {}
                ),
                **({"name": p["Name"]} if p.get("Name") else {}),
            }
            for p in svc.ports
        ]
        out_services.append(
            {
                "name": svc.name,
                "endpoint_mode": v.endpoint_mode,
                "vips": vips,
                "ports": ports
                if v.endpoint_mode == "vip"
                else [{k: x for k, x in p.items() if k != "published"} for p in ports],
                "tasks": sorted(running.get(svc.id, [])),
            }
        )
    out = {
        "version": 1,
        "node": node_id,
        "generation": generation,
        "peers": peers,
        "networks": out_networks,
        "endpoints": endpoints,
        "services": out_services,
    }
    if encryption is not None and any(n.encrypted for n in here):
        out["encryption"] = encryption
    return out
