"""/networks: create (overlay), list, inspect, remove."""

from __future__ import annotations

from aiohttp import web

from orchestrator.api.context import manager_or_503
from orchestrator.api.convert import network_json
from orchestrator.api.docker import ApiError, body, filters, json_response
from orchestrator.api.resolve import resolve
from orchestrator.manager.allocator import AllocationError, NameTaken, new_network, service_networks
from orchestrator.manager.spec import SpecError, normalize_network_spec
from orchestrator.store.objects import Network, Service
from orchestrator.store.store import Store, Tx

FILTERS = {"driver", "id", "label", "name", "scope", "type", "dangling"}


def find(store: Store, ref: str) -> Network:
    return resolve(store.list(Network), ref, "network", lambda n: n.name, lambda n: n.id)


async def create(request: web.Request) -> web.Response:
    store = (await manager_or_503(request)).store
    try:
        spec, subnet = normalize_network_spec(await body(request))
    except SpecError as e:
        raise ApiError(400, str(e)) from None

    def fn(tx: Tx) -> Network:
        try:
            net = new_network(tx, spec, subnet)
        except NameTaken as e:
            raise ApiError(409, str(e)) from None
        except AllocationError as e:
            raise ApiError(400, str(e)) from None
        tx.put(net)
        return net

    net = await store.update(fn)
    return json_response({"Id": net.id, "Warning": ""}, status=201)


async def list_networks(request: web.Request) -> web.Response:
    store = (await manager_or_503(request)).store
    f = filters(request, FILTERS)
    out = []
    for n in sorted(store.list(Network), key=lambda n: n.name):
        if "name" in f and not any(v in n.name for v in f["name"]):
            continue
        if "id" in f and not any(n.id.startswith(v) for v in f["id"]):
            continue
        if "driver" in f and "overlay" not in f["driver"]:
            continue
        if "scope" in f and "swarm" not in f["scope"]:
            continue
        if "type" in f and "custom" not in f["type"]:
            continue
        labels = n.spec.get("Labels") or {}
        if not all(
            (
                lab.partition("=")[0] in labels
                and ("=" not in lab or labels[lab.partition("=")[0]] == lab.partition("=")[2])
            )
            for lab in f.get("label", [])
        ):
            continue
        out.append(network_json(n))
    return json_response(out)


async def inspect(request: web.Request) -> web.Response:
    return json_response(
        network_json(find((await manager_or_503(request)).store, request.match_info["id"]))
    )


async def remove(request: web.Request) -> web.Response:
    store = (await manager_or_503(request)).store
    net = find(store, request.match_info["id"])

    def fn(tx: Tx) -> None:
        for svc in tx.list(Service):
            try:
                attached = {n.id for n in service_networks(tx, svc.spec)}
            except AllocationError:
                attached = set()
            if net.id in attached:
                raise ApiError(
                    409,
                    f"rpc error: code = FailedPrecondition desc = network "
                    f"{net.name} is in use by service {svc.name}",
                )
        tx.delete(Network, net.id)

    await store.update(fn)
    return web.Response(status=204)


ROUTES = [
    ("POST", "/networks/create", create),
    ("GET", "/networks", list_networks),
    ("GET", "/networks/{id}", inspect),
    ("DELETE", "/networks/{id}", remove),
]
