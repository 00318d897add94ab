"""shoald's HTTP API: a subset of the Docker Engine API, so the docker CLI and SDK drive it.

Every route answers with and without a /vX.Y prefix. Errors are {"message": ...} with the
engine's status codes; manager-only routes answer 503 on a node that is not a manager.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import platform
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram

from orchestrator.api import networks, nodes, services, tasks
from orchestrator.api.context import API, NO_LEADER, manager_or_503
from orchestrator.api.convert import swarm_json
from orchestrator.api.docker import (
    API_VERSION,
    MIN_API_VERSION,
    ApiError,
    body,
    bool_value,
    check_version,
    error_response,
    json_response,
)
from orchestrator.ca.pki import PKIError
from orchestrator.ca.rotation import start_rotation
from orchestrator.ca.server import cert_expiry, root_of
from orchestrator.ca.tokens import JoinToken, UnlockKey
from orchestrator.manager import netkeys
from orchestrator.manager.autolock import autolocked
from orchestrator.manager.spec import SpecError, default_cluster_spec, network_defaults
from orchestrator.node import DEFAULT_PORT, ENGINE_VERSION, NodeRuntime, SwarmError
from orchestrator.store.log import NotLeader
from orchestrator.store.objects import Cluster, Node, Role
from orchestrator.store.store import Tx

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        check_version(request.match_info.get("ver"))
        return await handler(request)
    except ApiError as e:
        return error_response(e.status, e.message)
    except SwarmError as e:
        return error_response(e.status, str(e))
    except NotLeader as e:  # a write the managers could not commit
        return error_response(503, f"{NO_LEADER} ({e})")
    except web.HTTPNotFound:
        return error_response(404, "page not found")
    except web.HTTPMethodNotAllowed:
        return error_response(405, f"{request.method} is not allowed here")
    except web.HTTPException:
        raise
    except Exception as e:
        log.exception("%s %s failed", request.method, request.path)
        return error_response(500, f"internal error: {e}")


VERSION_PREFIX = "/v{ver}"  # how the versioned routes' paths begin (their canonical form)


def request_metrics(registry: CollectorRegistry) -> Callable[..., Any]:
    """A middleware counting requests by route (the path pattern, without its version
    prefix: `/services/{id}`), method and status, and timing them."""
    requests = Counter(
        "shoal_api_requests_total",
        "Engine API requests answered, by route, method and status code.",
        ["route", "method", "status"],
        registry=registry,
    )
    durations = Histogram(
        "shoal_api_request_duration_seconds",
        "Time to answer an Engine API request, by route and method (streams: until they end).",
        ["route", "method"],
        registry=registry,
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    )

    @web.middleware
    async def measure(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        resource = request.match_info.route.resource
        # unmatched paths are one route: a scanner must not make a series per path it tries
        route = resource.canonical.removeprefix(VERSION_PREFIX) if resource else "unmatched"
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as e:
            status = e.status
            raise
        finally:
            requests.labels(route, request.method, str(status)).inc()
            durations.labels(route, request.method).observe(time.perf_counter() - started)

    return measure


def headers() -> dict[str, str]:
    return {
        "Api-Version": API_VERSION,
        "Ostype": "linux",
        "Docker-Experimental": "false",
        "Server": f"Docker/{ENGINE_VERSION} (linux)",
        "Cache-Control": "no-cache, no-store, must-revalidate",
        "Pragma": "no-cache",
    }


async def ping(request: web.Request) -> web.Response:
    api = API.of(request)
    h = {
        **headers(),
        "Swarm": f"{api.node.state}/{'manager' if api.node.manager else 'worker'}"
        if api.node.membership
        else "inactive",
        "Content-Type": "text/plain; charset=utf-8",
    }
    return web.Response(text="" if request.method == "HEAD" else "OK", headers=h)


_GO_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}


async def version(request: web.Request) -> web.Response:
    machine = platform.machine()
    details = {
        "ApiVersion": API_VERSION,
        "MinAPIVersion": MIN_API_VERSION,
        "GitCommit": "shoal",
        # the docker CLI prints this as "Go version": say what runs instead
        "GoVersion": f"python{platform.python_version()}",
        "Os": "linux",
        "Arch": _GO_ARCH.get(machine, machine),
        "KernelVersion": platform.release(),
        "BuildTime": "",
        "Experimental": "false",
    }
    v = {
        "Version": ENGINE_VERSION,
        **{k: val for k, val in details.items() if k != "Experimental"},
        "Platform": {"Name": "Shoal"},
        "Components": [{"Name": "Engine", "Version": ENGINE_VERSION, "Details": details}],
    }
    return json_response(v)


async def info(request: web.Request) -> web.Response:
    api = API.of(request)
    m = api.node.membership
    swarm: dict[str, Any] = {
        "NodeID": "",
        "NodeAddr": "",
        "LocalNodeState": "inactive",
        "ControlAvailable": False,
        "Error": "",
        "RemoteManagers": None,
    }
    if m is not None:
        swarm = {
            "NodeID": m.node_id,
            "NodeAddr": m.addr,
            "LocalNodeState": api.node.state,
            "ControlAvailable": api.node.manager is not None,
            "Error": "",
            "RemoteManagers": [{"NodeID": "", "Addr": a} for a in m.managers],
        }
        if api.node.manager is not None:
            store = api.node.manager.store
            all_nodes = store.list(Node)
            cluster = next(iter(store.list(Cluster)), None)
            swarm["Nodes"] = len(all_nodes)
            swarm["Managers"] = sum(1 for n in all_nodes if n.role == Role.MANAGER)
            swarm["RemoteManagers"] = [
                {"NodeID": n.id, "Addr": n.manager_addr}
                for n in all_nodes
                if n.role == Role.MANAGER
            ]
            if cluster is not None:
                swarm["Cluster"] = swarm_json(cluster, with_tokens=False)
    out = {
        "ID": m.node_id if m else "",
        "Name": api.node.cfg.hostname,
        "ServerVersion": ENGINE_VERSION,
        "OSType": "linux",
        "Architecture": platform.machine(),
        "KernelVersion": platform.release(),
        "NCPU": len(os.sched_getaffinity(0)),
        "Containers": 0,
        "Images": 0,
        **api.node.executor.info(),
        "Swarm": swarm,
        "DockerRootDir": str(api.node.cfg.data_root),
        "Warnings": [w] if (w := api.node.executor.health()) else None,
    }
    return json_response(out)


def _advertise(listen: str, requested: str) -> str:
    """The address other nodes reach this one at: host:port."""
    host, _, port = (
        (requested or listen).rpartition(":")
        if ":" in (requested or listen)
        else (requested or listen, "", "")
    )
    port = port or str(DEFAULT_PORT)
    if host and host not in ("0.0.0.0", "::"):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ApiError(
                400, f"advertise address must be an IPv4 address, not {host!r}"
            ) from None
        return f"{host}:{port}"
    # Like Docker: the address we would use to reach the outside, else the only one we have.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a route
            return f"{s.getsockname()[0]}:{port}"
        except OSError:
            raise ApiError(
                400,
                "could not choose an IP address to advertise since this system "
                "has no default route - specify one with --advertise-addr",
            ) from None


async def swarm_init(request: web.Request) -> web.Response:
    api = API.of(request)
    req = await body(request)
    listen = str(req.get("ListenAddr") or f"0.0.0.0:{DEFAULT_PORT}")
    if ":" not in listen:
        listen = f"{listen}:{DEFAULT_PORT}"
    advertise = _advertise(listen, str(req.get("AdvertiseAddr") or ""))
    spec = req.get("Spec") or {}
    if req.get("AutoLockManagers"):  # the engine's field; docker-py sets the spec's instead
        spec = {**spec, "EncryptionConfig": {"AutoLockManagers": True}}
    try:
        networking = network_defaults(
            req.get("DefaultAddrPool"), req.get("SubnetSize"), req.get("DataPathPort")
        )
    except SpecError as e:
        raise ApiError(400, str(e)) from None
    node_id = await api.node.init(listen, advertise, spec, networking)
    return json_response(node_id)


async def swarm_join(request: web.Request) -> web.Response:
    api = API.of(request)
    req = await body(request)
    remotes = req.get("RemoteAddrs") or []
    if not remotes:
        raise ApiError(400, "a manager address to join is required")
    remote = str(remotes[0])
    if ":" not in remote:
        remote = f"{remote}:{DEFAULT_PORT}"
    token = str(req.get("JoinToken") or "")
    listen = str(req.get("ListenAddr") or f"0.0.0.0:{DEFAULT_PORT}")
    advertise = _advertise(listen, str(req.get("AdvertiseAddr") or ""))
    await api.node.join(remote, token, advertise.rsplit(":", 1)[0], listen)
    return web.Response(status=200)


async def swarm_leave(request: web.Request) -> web.Response:
    await API.of(request).node.leave(bool_value(request.query.get("force")))
    return web.Response(status=200)


async def swarm_get(request: web.Request) -> web.Response:
    store = (await manager_or_503(request)).store
    cluster = next(iter(store.list(Cluster)))
    return json_response(swarm_json(cluster, with_tokens=True))


async def swarm_update(request: web.Request) -> web.Response:
    store = (await manager_or_503(request)).store
    req = await body(request)
    version_q = request.query.get("version", "")
    rotate_w = bool_value(request.query.get("rotateWorkerToken"))
    rotate_m = bool_value(request.query.get("rotateManagerToken"))
    rotate_key = bool_value(request.query.get("rotateManagerUnlockKey"))

    spec = default_cluster_spec(req)
    try:
        cert_expiry(Cluster(id="", spec=spec))
    except PKIError as e:
        raise ApiError(400, f"invalid CAConfig.NodeCertExpiry: {e}") from None
    try:
        netkeys.check_interval(spec)
    except ValueError as e:
        raise ApiError(400, f"invalid {e}") from None

    def fn(tx: Tx) -> None:
        cluster = next(iter(tx.list(Cluster)))
        if str(cluster.meta.version) != version_q:
            raise ApiError(500, "rpc error: code = Unknown desc = update out of sequence")
        root = root_of(cluster)
        updated = dataclasses.replace(
            cluster,
            spec=spec,
            worker_token=str(JoinToken.generate(root)) if rotate_w else cluster.worker_token,
            manager_token=str(JoinToken.generate(root)) if rotate_m else cluster.manager_token,
        )
        if autolocked(updated) and (rotate_key or not updated.unlock_key):
            updated = dataclasses.replace(updated, unlock_key=str(UnlockKey.generate()))
        elif not autolocked(updated):
            # swarmkit's rule: without autolock there is no unlock key, and asking to rotate it
            # is no error (nothing to rotate: turning autolock on makes a new key anyway)
            updated = dataclasses.replace(updated, unlock_key="")
        force = (spec.get("CAConfig") or {}).get("ForceRotate", 0)
        if force != (cluster.spec.get("CAConfig") or {}).get("ForceRotate", 0):
            if cluster.ca_rotation:
                raise ApiError(400, "a root CA rotation is already in progress; wait for it")
            updated = start_rotation(updated)
        tx.put(updated)

    await store.update(fn)
    return web.Response(status=200)


async def swarm_unlock_key(request: web.Request) -> web.Response:
    store = (await manager_or_503(request)).store
    cluster = next(iter(store.list(Cluster)))
    return json_response({"UnlockKey": cluster.unlock_key if autolocked(cluster) else ""})


async def swarm_unlock(request: web.Request) -> web.Response:
    req = await body(request)
    await API.of(request).node.unlock(str(req.get("UnlockKey") or ""))
    return web.Response(status=200)


async def empty_list(request: web.Request) -> web.Response:
    (await manager_or_503(request))
    return json_response([])


async def distribution(request: web.Request) -> web.Response:
    """What the registry says of an image, asked through this node's engine: the docker CLI
    pins a service's image to the digest it answers."""
    name = request.match_info["name"]
    try:
        found = await API.of(request).node.executor.distribution(
            name, request.headers.get("X-Registry-Auth", "")
        )
    except LookupError as e:
        raise ApiError(404, str(e)) from None
    return json_response(found)


def build(node: NodeRuntime, registry: CollectorRegistry | None = None) -> web.Application:
    """`registry`: where the API's metrics go (default: a registry of its own)."""
    measure = request_metrics(registry if registry is not None else CollectorRegistry())
    app = web.Application(middlewares=[measure, errors], client_max_size=16 << 20)
    app[API.key] = API(node)
    routes: list[tuple[str, str, Handler]] = [
        ("HEAD", "/_ping", ping),
        ("GET", "/_ping", ping),
        ("GET", "/version", version),
        ("GET", "/info", info),
        ("GET", "/swarm", swarm_get),
        ("POST", "/swarm/init", swarm_init),
        ("POST", "/swarm/join", swarm_join),
        ("POST", "/swarm/leave", swarm_leave),
        ("POST", "/swarm/update", swarm_update),
        ("GET", "/swarm/unlockkey", swarm_unlock_key),
        ("POST", "/swarm/unlock", swarm_unlock),
        ("GET", "/secrets", empty_list),
        ("GET", "/configs", empty_list),
        ("GET", "/distribution/{name:.+}/json", distribution),
        *nodes.ROUTES,
        *services.ROUTES,
        *tasks.ROUTES,
        *networks.ROUTES,
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
        if path != "/_ping":
            app.router.add_route(method, "/v{ver:[0-9]+\\.[0-9]+}" + path, handler)
    return app
