"""Allocation of network resources: VNIs, subnets, VIPs, task and node addresses, published ports.

Allocation happens inside the transaction that needs it, so conflicts (a taken published port,
an exhausted subnet) are refused to the caller at once instead of leaving a task stuck in NEW
with an error nobody sees (a common swarm complaint). The allocate loop moves tasks from NEW to
PENDING once their addresses are reserved, and gives every node an address on each network.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools
from collections.abc import Iterable
from typing import Any

from orchestrator.manager.spec import PUBLISHED_RANGE, SpecError, view
from orchestrator.store.ids import new_id, now_rfc3339
from orchestrator.store.objects import Cluster, Network, Node, Service, Task, TaskState
from orchestrator.store.store import Tx

INGRESS_NAME = "ingress"
INGRESS_SUBNET = ipaddress.IPv4Network("10.255.0.0/16")
FIRST_VNI = 4096
MAX_VNI = (1 << 24) - 1


class AllocationError(SpecError):
    """Refused with 400: the request cannot be given the resources it asks for."""


class NameTaken(SpecError):
    """Refused with 409: the name belongs to another object."""


def ingress_spec() -> dict[str, Any]:
    return {
        "Name": INGRESS_NAME,
        "Labels": {},
        "Ingress": True,
        "Attachable": False,
        "Internal": False,
        "Scope": "swarm",
        "DriverConfiguration": {"Name": "overlay", "Options": {}},
        "IPAMOptions": {
            "Driver": {"Name": "default"},
            "Configs": [{"Subnet": str(INGRESS_SUBNET)}],
        },
    }


def new_network(tx: Tx, spec: dict[str, Any], subnet: ipaddress.IPv4Network | None) -> Network:
    networks = tx.list(Network)
    if any(n.name == spec["Name"] for n in networks):
        raise NameTaken(f"network with name {spec['Name']} already exists")
    taken = [ipaddress.IPv4Network(n.subnet) for n in networks]
    if subnet is None:
        subnet = _free_subnet(tx, taken)
    elif any(subnet.overlaps(t) for t in taken):
        clash = next(n for n in networks if subnet.overlaps(ipaddress.IPv4Network(n.subnet)))
        raise AllocationError(f"subnet {subnet} overlaps network {clash.name} ({clash.subnet})")
    vnis = {n.vni for n in networks}
    vni = next((v for v in range(FIRST_VNI, MAX_VNI) if v not in vnis), None)
    if vni is None:
        raise AllocationError("no VXLAN network identifier left")
    options = spec.get("DriverConfiguration", {}).get("Options", {})
    return Network(
        id=new_id(),
        spec=spec,
        subnet=str(subnet),
        gateway=str(subnet.network_address + 1),
        vni=vni,
        ingress=bool(spec.get("Ingress")),
        encrypted="encrypted" in options,
    )


def _free_subnet(tx: Tx, taken: list[ipaddress.IPv4Network]) -> ipaddress.IPv4Network:
    """The first free subnet of the swarm's address pool (swarm init --default-addr-pool), at
    its size. The pool's first subnet is left out: Docker's ingress network has it (ours has
    its own, INGRESS_SUBNET), so networks are numbered as Docker numbers them."""
    cluster = next(iter(tx.list(Cluster)), None) or Cluster(id="")
    pools = [ipaddress.IPv4Network(p) for p in cluster.default_addr_pool]
    candidates = itertools.chain.from_iterable(
        p.subnets(new_prefix=cluster.subnet_size) for p in pools
    )
    next(candidates, None)
    for candidate in candidates:
        if not any(candidate.overlaps(t) for t in taken):
            return candidate
    raise AllocationError(
        f"no free /{cluster.subnet_size} left in the address pool "
        f"({', '.join(cluster.default_addr_pool)}); give the network a subnet (--subnet)"
    )


class AddressBook:
    """Free addresses of each network, as of this transaction.

    Task addresses are handed out in order, after the highest one any task of the network
    holds or held (history included), wrapping at the subnet's end: Docker's serial
    allocation. An address a task just gave up is not given to the next task at once, so
    nothing still pointing at the old task elsewhere (a neighbour or conntrack entry on a node
    that has not caught up) sends the new task's traffic there.
    """

    def __init__(self, tx: Tx):
        self._tx = tx
        self._used: dict[str, set[ipaddress.IPv4Address]] = {}
        self._next: dict[str, int] = {}

    def _used_in(self, net: Network) -> set[ipaddress.IPv4Address]:
        if net.id not in self._used:
            subnet = ipaddress.IPv4Network(net.subnet)
            used = {
                subnet.network_address,
                subnet.broadcast_address,
                ipaddress.IPv4Address(net.gateway),
            }
            for node in self._tx.list(Node):
                if net.id in node.gateways:
                    used.add(ipaddress.IPv4Address(node.gateways[net.id]))
            for svc in self._tx.list(Service):
                if net.id in svc.vips:
                    used.add(ipaddress.IPv4Interface(svc.vips[net.id]).ip)
            highest = 1
            for task in self._tx.list(Task):
                if net.id not in task.addresses:
                    continue
                ip = ipaddress.IPv4Interface(task.addresses[net.id]).ip
                if ip in subnet:
                    highest = max(highest, int(ip) - int(subnet.network_address))
                # A finished task's address is free again (history keeps it for display).
                if not task.state.terminal:
                    used.add(ip)
            self._used[net.id] = used
            self._next[net.id] = highest + 1
        return self._used[net.id]

    def take(self, net: Network) -> str:
        """The next free address, as "a.b.c.d/len"."""
        subnet = ipaddress.IPv4Network(net.subnet)
        used = self._used_in(net)
        start = self._next[net.id]
        last = subnet.num_addresses - 2  # the broadcast address is not given out
        for offset in itertools.chain(range(start, last + 1), range(2, min(start, last + 1))):
            ip = subnet.network_address + offset
            if ip not in used:
                used.add(ip)
                self._next[net.id] = offset + 1
                return f"{ip}/{subnet.prefixlen}"
        raise AllocationError(
            f"could not find an available IP in network {net.name} ({net.subnet}); it is full"
        )


def resolve_network(tx: Tx, target: str) -> Network:
    nets = tx.list(Network)
    for n in nets:
        if target in (n.id, n.name):
            return n
    matches = [n for n in nets if n.id.startswith(target)]
    if len(matches) == 1:
        return matches[0]
    raise AllocationError(f"network {target} not found")


def with_network_ids(tx: Tx, spec: dict[str, Any]) -> dict[str, Any]:
    """The spec with its networks named by ID, as Docker stores them (a client may give a name,
    an ID or an ID's prefix); raises AllocationError for a network that does not exist."""
    attachments = spec.get("TaskTemplate", {}).get("Networks")
    if not attachments:
        return spec
    resolved = [{**a, "Target": resolve_network(tx, a["Target"]).id} for a in attachments]
    return {**spec, "TaskTemplate": {**spec["TaskTemplate"], "Networks": resolved}}


def service_networks(tx: Tx, spec: dict[str, Any]) -> list[Network]:
    """The networks a service's tasks attach to: ingress first when it publishes ports.

    A service on no network at all is attached to ingress too: a native task's only way out
    of its namespace is an overlay (Docker gives such containers a local bridge instead).
    """
    v = view(spec)
    nets = [resolve_network(tx, t) for t in v.networks]
    for n in nets:
        if n.ingress:
            raise AllocationError(
                f"network {n.name} is the ingress network; it is attached "
                "for published ports, not by hand"
            )
    if any(p.mode == "ingress" for p in v.ports) or not nets:
        ingress = next((n for n in tx.list(Network) if n.ingress), None)
        if ingress is None:
            raise AllocationError(
                "the ingress network is missing; recreate it before publishing ports"
            )
        nets.insert(0, ingress)
    return nets


def allocate_service(tx: Tx, svc: Service, book: AddressBook) -> Service:
    """Ports and VIPs for a service's (new) spec; keeps what it already had where it can.

    Ingress ports are the cluster's: each belongs to one service. Host-mode ports are each
    node's, held by the tasks the scheduler puts there (several services may use one, on
    different nodes), but none may be an ingress port: both would be the node's port."""
    v = view(svc.spec)
    nets = service_networks(tx, svc.spec)
    taken: dict[tuple[str, int], Service] = {}  # ingress ports
    host: dict[tuple[str, int], Service] = {}  # other services' host-mode ports
    for other in tx.list(Service):
        if other.id != svc.id:
            for used in other.ports:
                if not used.get("PublishedPort"):
                    continue
                mode = used.get("PublishMode") or "ingress"
                (taken if mode == "ingress" else host)[
                    (used["Protocol"], used["PublishedPort"])
                ] = other
    # what the service's ports given no number were allocated before, kept across updates
    explicit = {(p.protocol, p.published) for p in v.ports if p.published}
    previous: dict[tuple[str, int], list[int]] = {}
    for q in svc.ports:
        published = q.get("PublishedPort", 0)
        mode = q.get("PublishMode", "ingress")
        if mode == "ingress" and published and (q["Protocol"], published) not in explicit:
            previous.setdefault((q["Protocol"], q["TargetPort"]), []).append(published)
    ports: list[dict[str, Any]] = []
    for p in v.ports:
        entry: dict[str, Any] = {
            "Protocol": p.protocol,
            "TargetPort": p.target,
            "PublishedPort": p.published,
            "PublishMode": p.mode,
            **({"Name": p.name} if p.name else {}),
        }
        if p.mode == "host":
            owner = taken.get((p.protocol, p.published))
            if owner is not None:
                raise AllocationError(
                    f"port '{p.published}' is already in use by service '{owner.name}' "
                    f"({owner.id}) as an ingress port; publish another port in host mode"
                )
        elif p.published:
            owner = taken.get((p.protocol, p.published))
            if owner is not None:
                raise AllocationError(
                    f"port '{p.published}' is already in use by service '{owner.name}' "
                    f"({owner.id}) as an ingress port"
                )
            owner = host.get((p.protocol, p.published))
            if owner is not None:
                raise AllocationError(
                    f"port '{p.published}' is already in use by service '{owner.name}' "
                    f"({owner.id}) as a host-mode port; publish another port"
                )
        else:
            kept = previous.get((p.protocol, p.target), [])
            while kept and ((p.protocol, kept[0]) in taken or (p.protocol, kept[0]) in host):
                kept.pop(0)
            entry["PublishedPort"] = (
                kept.pop(0) if kept else _free_port(p.protocol, taken, host, ports)
            )
        if p.mode == "ingress":
            taken[(p.protocol, entry["PublishedPort"])] = svc
        ports.append(entry)
    vips: dict[str, str] = {}
    if v.endpoint_mode == "vip":
        for n in nets:
            vips[n.id] = svc.vips.get(n.id) or book.take(n)
    return dataclasses.replace(svc, ports=ports, vips=vips)


def _free_port(
    proto: str,
    taken: dict[tuple[str, int], Service],
    host: dict[tuple[str, int], Service],
    pending: Iterable[dict[str, Any]],
) -> int:
    mine = {(p["Protocol"], p["PublishedPort"]) for p in pending}
    for port in range(PUBLISHED_RANGE[0], PUBLISHED_RANGE[1] + 1):
        if (proto, port) not in taken and (proto, port) not in host and (proto, port) not in mine:
            return port
    raise AllocationError(
        f"no free {proto} port left in {PUBLISHED_RANGE[0]}-"
        f"{PUBLISHED_RANGE[1]} for the routing mesh"
    )


def allocate_tasks(tx: Tx) -> int:
    """NEW tasks get an address on each of their service's networks and become PENDING."""
    book = AddressBook(tx)
    done = 0
    for task in tx.list(Task):
        if task.state != TaskState.NEW or task.desired_state > TaskState.RUNNING:
            continue
        svc = tx.get(Service, task.service_id)
        if svc is None:
            continue
        try:
            nets = service_networks(tx, svc.spec)
            addresses = {n.id: task.addresses.get(n.id) or book.take(n) for n in nets}
        except AllocationError as e:
            if task.err != str(e):
                tx.put(dataclasses.replace(task, err=str(e), message="allocation failed"))
            continue
        tx.put(
            dataclasses.replace(
                task,
                addresses=addresses,
                networks=[n.id for n in nets],
                state=TaskState.PENDING,
                timestamp=now_rfc3339(),
                message="pending task scheduling",
                err="",
            )
        )
        done += 1
    return done


def allocate_gateways(tx: Tx) -> int:
    """Every node gets an address on every network (its bridge: mesh source, task gateway)."""
    book = AddressBook(tx)
    nets = tx.list(Network)
    changed = 0
    for node in tx.list(Node):
        missing = [n for n in nets if n.id not in node.gateways]
        stale = [nid for nid in node.gateways if nid not in {n.id for n in nets}]
        if not missing and not stale:
            continue
        gateways = {k: v for k, v in node.gateways.items() if k not in stale}
        for n in missing:
            gateways[n.id] = book.take(n).split("/")[0]
        tx.put(dataclasses.replace(node, gateways=gateways))
        changed += 1
    return changed
