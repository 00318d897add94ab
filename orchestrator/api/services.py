"""/services: create, list, inspect, update (scale is an update), remove, logs."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import struct
import time
import urllib.parse
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from orchestrator.api.context import API, manager_or_503
from orchestrator.api.convert import service_json
from orchestrator.api.docker import (
    API_VERSION,
    ApiError,
    body,
    bool_value,
    filters,
    json_response,
    version_tuple,
)
from orchestrator.api.resolve import resolve
from orchestrator.images import reference
from orchestrator.manager.allocator import (
    AddressBook,
    AllocationError,
    allocate_service,
    with_network_ids,
)
from orchestrator.manager.orchestrator import update as updater
from orchestrator.manager.orchestrator.tasks import stop
from orchestrator.manager.spec import (
    SpecError,
    mode_of,
    normalize_service_spec,
    same_task_template,
    view,
)
from orchestrator.store.ids import new_id, now_rfc3339
from orchestrator.store.objects import Node, Service, Task, TaskState
from orchestrator.store.store import Store, Tx

log = logging.getLogger(__name__)

FILTERS = {"id", "label", "mode", "name"}


def find(store: Store, ref: str) -> Service:
    return resolve(store.list(Service), ref, "service", lambda s: s.name, lambda s: s.id)


def _spec(raw: Any) -> dict[str, Any]:
    try:
        return normalize_service_spec(raw)
    except SpecError as e:
        raise ApiError(400, str(e)) from None


def _networks_by_id(tx: Tx, spec: dict[str, Any]) -> dict[str, Any]:
    """The spec as it is stored: its networks named by ID, whatever the client named them by
    (so that a network given by name is no change of the tasks)."""
    try:
        return with_network_ids(tx, spec)
    except AllocationError as e:
        raise ApiError(400, f"rpc error: code = InvalidArgument desc = {e}") from None


def _allocated(tx: Tx, svc: Service) -> Service:
    """The service with its ports and VIPs allocated."""
    try:
        return allocate_service(tx, svc, AddressBook(tx))
    except AllocationError as e:
        raise ApiError(400, f"rpc error: code = InvalidArgument desc = {e}") from None


def _next_run(svc: Service) -> Service:
    """A job runs again, all of it, after every update (swarmkit's JobIteration)."""
    if not view(svc.spec).job:
        return svc
    return dataclasses.replace(
        svc, job_iteration=svc.job_iteration + 1, job_started_at=now_rfc3339()
    )


def _name_taken(tx: Tx, name: str, own_id: str = "") -> None:
    for s in tx.list(Service):
        if s.name == name and s.id != own_id:
            raise ApiError(
                409,
                "rpc error: code = AlreadyExists desc = name conflicts with an "
                f"existing object: service {name} already exists",
            )


# How long a create or update waits for the registry to say an image's digest.
PIN_TIMEOUT = 10.0


async def _pin_image(request: web.Request, spec: dict[str, Any], auth: str) -> list[str]:
    """Pin the spec's image to the digest its registry has now, as Docker does, so that every
    node runs the same image; asked through this node's engine (its registry settings and
    mirrors). A warning, and the image left as it is, when the registry cannot be asked."""
    cs = spec["TaskTemplate"]["ContainerSpec"]
    image = cs["Image"]
    ref = reference.parse(image)
    if ref.digest or request.headers.get("User-Agent", "").startswith("Docker-Client/"):
        return []  # the docker CLI asked /distribution itself, and warned if it could not
    try:
        found = await asyncio.wait_for(
            API.of(request).node.executor.distribution(image, auth), PIN_TIMEOUT
        )
        digest = str(found["Descriptor"]["digest"])
    except (LookupError, TimeoutError, TypeError) as e:
        log.info("image %s not pinned to a digest: %s", image, e)
        return [
            f"image {image} could not be accessed on a registry to record its digest. Each "
            f"node will access {image} independently, possibly leading to different nodes "
            "running different versions of the image."
        ]
    cs["Image"] = f"{ref.familiar_name()}:{ref.tag or 'latest'}@{digest}"
    return []


async def create(request: web.Request) -> web.Response:
    store = (await manager_or_503(request)).store
    spec = _spec(await body(request))
    auth = request.headers.get("X-Registry-Auth", "")
    warnings = await _pin_image(request, spec, auth)

    def fn(tx: Tx) -> Service:
        _name_taken(tx, spec["Name"])
        svc = Service(id=new_id(), spec=_networks_by_id(tx, spec), registry_auth=auth)
        if view(spec).job:
            svc = dataclasses.replace(svc, job_started_at=now_rfc3339())
        svc = _allocated(tx, svc)
        tx.put(svc)
        return svc

    svc = await store.update(fn)
    return json_response({"ID": svc.id, "Warnings": warnings or None}, status=201)


async def list_services(request: web.Request) -> web.Response:
    store = (await manager_or_503(request)).store
    f = filters(request, FILTERS)
    status = bool_value(request.query.get("status"))
    tasks = store.list(Task) if status else None
    nodes = {n.id: n for n in store.list(Node)} if status else {}
    out = []
    for s in sorted(store.list(Service), key=lambda s: s.name):
        if "id" in f and not any(s.id.startswith(v) for v in f["id"]):
            continue
        if "name" in f and not any(s.name.startswith(v) for v in f["name"]):
            continue
        if "mode" in f and view(s.spec).mode not in f["mode"]:
            continue
        labels = s.spec.get("Labels", {})
        if not all(_label(labels, lab) for lab in f.get("label", [])):
            continue
        out.append(service_json(s, tasks, nodes))
    return json_response(out)


def _label(labels: dict[str, str], spec: str) -> bool:
    key, eq, value = spec.partition("=")
    return key in labels and (not eq or labels[key] == value)


async def inspect(request: web.Request) -> web.Response:
    store = (await manager_or_503(request)).store
    svc = find(store, request.match_info["id"])
    return json_response(
        service_json(svc, None, {}, bool_value(request.query.get("insertDefaults")))
    )


async def update(request: web.Request) -> web.Response:
    store = (await manager_or_503(request)).store
    svc = find(store, request.match_info["id"])
    raw_version = request.query.get("version", "")
    if not raw_version.isdigit():
        raise ApiError(
            400,
            f"invalid service version '{raw_version}': strconv.ParseUint: "
            f'parsing "{raw_version}": invalid syntax',
        )
    spec = _spec(await body(request))
    # --with-registry-auth sends the client's credentials; without, the service keeps its own
    auth = request.headers.get("X-Registry-Auth", "")
    image = spec["TaskTemplate"]["ContainerSpec"]["Image"]
    same_image = image == svc.spec.get("TaskTemplate", {}).get("ContainerSpec", {}).get("Image")
    warnings = [] if same_image else await _pin_image(request, spec, auth or svc.registry_auth)

    rollback = request.query.get("rollback", "")
    if rollback not in ("", "none", "previous"):
        raise ApiError(400, f"invalid rollback {rollback!r}: use previous")

    def fn(tx: Tx) -> None:
        current = tx.get(Service, svc.id)
        if current is None:
            raise ApiError(404, f"service {svc.id} not found")
        if current.meta.version != int(raw_version):
            raise ApiError(500, "rpc error: code = Unknown desc = update out of sequence")
        if mode_of(spec) != mode_of(current.spec):
            # swarmkit's rule: the orchestrators do not turn one kind of service into another
            raise ApiError(
                501,
                "rpc error: code = Unimplemented desc = service mode change is not allowed "
                f"({mode_of(current.spec)} to {mode_of(spec)}): remove the service and "
                "create it again",
            )
        if rollback == "previous":
            # swarmkit's rule: the previous spec comes back, the current one becomes the
            # previous (a second rollback undoes the first); the spec sent is not used
            if current.previous_spec is None:
                raise ApiError(
                    400,
                    "rpc error: code = FailedPrecondition desc = service "
                    f"{current.id} does not have a previous spec",
                )
            rolled = updater.roll_back(current, "manually requested rollback", manual=True)
            # the previous spec's published ports and networks come back with it
            tx.put(_allocated(tx, _next_run(rolled)))
            return
        _name_taken(tx, spec["Name"], current.id)
        new_spec = _networks_by_id(tx, spec)
        changed = not same_task_template(
            new_spec.get("TaskTemplate", {}), current.spec.get("TaskTemplate", {})
        )
        updated = dataclasses.replace(
            _next_run(current),
            spec=new_spec,
            previous_spec=copy.deepcopy(current.spec),
            spec_version=current.spec_version + (1 if changed else 0),
            registry_auth=auth or current.registry_auth,
            # a new update starts afresh: a paused one resumes, a rollback under way stops
            # (swarmkit's rule: the service is updated to the spec sent)
            update_status=None,
        )
        tx.put(_allocated(tx, updated))

    await store.update(fn)
    return json_response({"Warnings": warnings or None})


async def remove(request: web.Request) -> web.Response:
    store = (await manager_or_503(request)).store
    svc = find(store, request.match_info["id"])

    def fn(tx: Tx) -> None:
        if tx.get(Service, svc.id) is None:
            raise ApiError(404, f"service {svc.id} not found")
        tx.delete(Service, svc.id)
        for t in tx.list(Task):
            if t.service_id == svc.id and t.desired_state < TaskState.REMOVE:
                tx.put(stop(t, TaskState.REMOVE, "service removed"))

    await store.update(fn)
    return web.Response(status=200)


# ---- logs -----------------------------------------------------------------------------------


def _frame(stream: int, payload: bytes) -> bytes:
    return struct.pack(">BxxxL", stream, len(payload)) + payload


def _rfc3339(ns: int) -> str:
    secs, frac = divmod(ns, 1_000_000_000)
    return datetime.fromtimestamp(secs, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{frac:09d}Z"


async def stream_logs(
    request: web.Request, tasks: list[Task], tty: bool = False
) -> web.StreamResponse:
    """Task logs as the engine streams them: one 8-byte-framed line per frame, or, for a
    service with a TTY, the lines as they are (clients read a TTY's logs unframed)."""
    manager = await manager_or_503(request)
    q = request.query
    want_out, want_err = bool_value(q.get("stdout")), bool_value(q.get("stderr"))
    if not (want_out or want_err):
        raise ApiError(500, "Bad parameters: you must choose at least one stream")
    details, timestamps, follow = (
        bool_value(q.get("details")),
        bool_value(q.get("timestamps")),
        bool_value(q.get("follow")),
    )
    tail_raw = q.get("tail", "all")
    tail = None if tail_raw in ("all", "") else int(tail_raw) if tail_raw.isdigit() else None
    since_raw = q.get("since", "0") or "0"
    try:
        since_ns = int(float(since_raw) * 1e9)
    except ValueError:
        raise ApiError(400, f"invalid since {since_raw!r}: expected a UNIX time") from None
    by_node: dict[str, list[Task]] = defaultdict(list)
    for t in tasks:
        if t.node_id:
            by_node[t.node_id].append(t)
    resp = web.StreamResponse(status=200)
    if version_tuple(request.match_info.get("ver") or API_VERSION) >= (1, 42):
        resp.content_type = "application/vnd.docker.multiplexed-stream"
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    info = {t.id: t for t in tasks}
    queues = [
        manager.dispatcher.request_logs(
            node,
            {"task_ids": [t.id for t in ts], "tail": tail, "since_ns": since_ns, "follow": follow},
        )
        for node, ts in by_node.items()
    ]
    pending = set(range(len(queues)))
    deadline = None if follow else time.monotonic() + 15
    try:
        while pending:
            getters = {i: asyncio.ensure_future(queues[i].get()) for i in pending}
            timeout = None if deadline is None else max(deadline - time.monotonic(), 0)
            done, _ = await asyncio.wait(
                getters.values(), timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            for g in getters.values():
                if g not in done:
                    g.cancel()
            if not done:
                break  # a node that does not answer does not hang the request
            for i, g in getters.items():
                if g not in done:
                    continue
                frame = g.result()
                if frame is None:
                    pending.discard(i)
                    continue
                stream = int(frame.get("s", 1))
                if (stream == 1 and not want_out) or (stream == 2 and not want_err):
                    continue
                task = info.get(str(frame.get("task_id")))
                if task is None:
                    continue
                line = str(frame.get("l", ""))
                prefix = ""
                if timestamps:
                    prefix += _rfc3339(int(frame.get("t", 0))) + " "
                if details:
                    attrs = {
                        "com.docker.swarm.node.id": task.node_id,
                        "com.docker.swarm.service.id": task.service_id,
                        "com.docker.swarm.task.id": task.id,
                    }
                    prefix += (
                        ",".join(
                            f"{urllib.parse.quote_plus(k)}={urllib.parse.quote_plus(v)}"
                            for k, v in sorted(attrs.items())
                        )
                        + " "
                    )
                data = (prefix + line).encode()
                await resp.write(data if tty else _frame(stream, data))
    finally:
        for q_ in queues:
            manager.dispatcher.cancel_logs(q_)
    await resp.write_eof()
    return resp


async def logs(request: web.Request) -> web.StreamResponse:
    store = (await manager_or_503(request)).store
    svc = find(store, request.match_info["id"])
    tty = bool(svc.spec.get("TaskTemplate", {}).get("ContainerSpec", {}).get("TTY"))
    tasks = [t for t in store.list(Task) if t.service_id == svc.id]
    return await stream_logs(request, tasks, tty)


ROUTES = [
    ("POST", "/services/create", create),
    ("GET", "/services", list_services),
    ("GET", "/services/{id}", inspect),
    ("POST", "/services/{id}/update", update),
    ("DELETE", "/services/{id}", remove),
    ("GET", "/services/{id}/logs", logs),
]
