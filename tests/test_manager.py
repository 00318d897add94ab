"""The manager's control loops on a real store: orchestration, allocation, scheduling, reaping."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import itertools
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from orchestrator.agent import images
from orchestrator.ca.server import described
from orchestrator.manager import allocator, scheduler
from orchestrator.manager.allocator import AddressBook, AllocationError
from orchestrator.manager.manager import LOOPS, Manager
from orchestrator.manager.orchestrator import tasks as tasks_module
from orchestrator.manager.spec import (
    DEFAULT_STOP_GRACE,
    ContainerView,
    MountSpec,
    Resources,
    SpecError,
    container_view,
    normalize_service_spec,
    signal_number,
    view,
    with_replicas,
)
from orchestrator.manager.templates import TemplateContext, check, expand
from orchestrator.raft.node import RaftNode
from orchestrator.raft.storage import on_disk
from orchestrator.raft.transport import MemoryNetwork
from orchestrator.store.ids import new_id
from orchestrator.store.objects import (
    Availability,
    Network,
    Node,
    NodeState,
    Role,
    Service,
    Task,
    TaskState,
    from_dict,
    to_dict,
)
from orchestrator.store.store import Store, Tx


async def cluster(tmp: Path, nodes: int = 3) -> tuple[Store, Manager]:
    store = Store(RaftNode(1, "", on_disk(tmp), MemoryNetwork().transport(1), bootstrap=True))
    await store.log.start()

    def setup(tx: Tx) -> None:
        tx.put(allocator.new_network(tx, allocator.ingress_spec(), allocator.INGRESS_SUBNET))
        for i in range(nodes):
            tx.put(
                Node(
                    id=f"node{i}",
                    hostname=f"sw{i + 1}",
                    state=NodeState.READY,
                    role=Role.MANAGER if i == 0 else Role.WORKER,
                    addr=f"192.168.56.{11 + i}",
                    labels={"zone": "a" if i < 2 else "b"},
                )
            )

    await store.update(setup)
    return store, Manager(store)


async def create(store: Store, spec: dict[str, Any]) -> Service:
    def fn(tx: Tx) -> Service:
        svc = Service(id=new_id(), spec=normalize_service_spec(spec))
        svc = allocator.allocate_service(tx, svc, AddressBook(tx))
        tx.put(svc)
        return svc

    return await store.update(fn)


def spec(name: str, replicas: int = 3, **extra: Any) -> dict[str, Any]:
    return {
        "Name": name,
        "TaskTemplate": {"ContainerSpec": {"Image": "micro"}, **extra},
        "Mode": {"Replicated": {"Replicas": replicas}},
        "EndpointSpec": {"Ports": [{"TargetPort": 8000}]},
    }


def live(store: Store, svc: Service) -> list[Task]:
    return [
        t
        for t in store.list(Task)
        if t.service_id == svc.id and t.desired_state <= TaskState.RUNNING
    ]


def test_replicas_are_spread_allocated_and_scheduled(tmp_path: Path) -> None:
    async def run() -> None:
        store, mgr = await cluster(tmp_path)
        svc = await create(store, spec("web", 6))
        assert svc.ports[0]["PublishedPort"] == 30000
        assert (
            ipaddress.IPv4Interface(next(iter(svc.vips.values()))).network
            == allocator.INGRESS_SUBNET
        )
        await mgr.reconcile()
        tasks = live(store, svc)
        assert sorted(t.slot for t in tasks) == [1, 2, 3, 4, 5, 6]
        assert all(t.state == TaskState.ASSIGNED for t in tasks)
        assert Counter(t.node_id for t in tasks) == {"node0": 2, "node1": 2, "node2": 2}
        addrs = [t.addresses[next(iter(svc.vips))] for t in tasks]
        assert len(set(addrs)) == 6
        nodes = store.list(Node)
        assert all(n.gateways for n in nodes)
        second = await create(store, spec("api", 1))
        assert second.ports[0]["PublishedPort"] == 30001
        with pytest.raises(AllocationError, match="port '30000' is already in use by service"):
            await create(
                store,
                {
                    **spec("dup", 1),
                    "EndpointSpec": {"Ports": [{"TargetPort": 80, "PublishedPort": 30000}]},
                },
            )
        await store.log.close()

    asyncio.run(run())


def test_task_addresses_are_handed_out_in_order_and_not_reused_at_once(tmp_path: Path) -> None:
    """Docker's serial allocation: a replacement gets the next address, not the one its
    predecessor just gave up (which other nodes may still route to the old task)."""

    async def run() -> None:
        store, mgr = await cluster(tmp_path)
        svc = await create(store, spec("web", 3))
        net = next(iter(svc.vips))
        await mgr.reconcile()
        first = sorted(ipaddress.IPv4Interface(t.addresses[net]).ip for t in live(store, svc))
        assert [int(b) - int(a) for a, b in itertools.pairwise(first)] == [1, 1]

        def end_one(tx: Tx) -> None:
            [task] = [t for t in tx.list(Task) if t.addresses[net].startswith(f"{first[0]}/")]
            tx.put(dataclasses.replace(task, state=TaskState.FAILED))

        await store.update(end_one)

        def next_one(tx: Tx) -> str:
            network = next(n for n in tx.list(Network) if n.id == net)
            return AddressBook(tx).take(network)

        assert ipaddress.IPv4Interface(await store.update(next_one)).ip == first[-1] + 1

        # at the subnet's end it wraps around to the lowest free address
        def fill(tx: Tx) -> str:
            network = next(n for n in tx.list(Network) if n.id == net)
            top = ipaddress.IPv4Network(network.subnet).broadcast_address - 1
            tx.put(Task(id=new_id(), service_id="x", addresses={net: f"{top}/16"}))
            return AddressBook(tx).take(network)

        # the lowest free one: the address the failed task gave up
        assert ipaddress.IPv4Interface(await store.update(fill)).ip == first[0]
        await store.log.close()

    asyncio.run(run())


def test_constraints_drain_and_node_loss(tmp_path: Path) -> None:
    async def run() -> None:
        store, mgr = await cluster(tmp_path)
        svc = await create(
            store, spec("web", 4, Placement={"Constraints": ["node.labels.zone==a"]})
        )
        await mgr.reconcile()
        assert {t.node_id for t in live(store, svc)} == {"node0", "node1"}

        def drain(tx: Tx) -> None:
            n = tx.get(Node, "node1")
            assert n is not None
            tx.put(dataclasses.replace(n, availability=Availability.DRAIN))

        await store.update(drain)
        await mgr.reconcile()
        await mgr.reconcile()
        assert {t.node_id for t in live(store, svc)} == {"node0"}
        assert len(live(store, svc)) == 4

        def down(tx: Tx) -> None:
            n = tx.get(Node, "node0")
            assert n is not None
            tx.put(dataclasses.replace(n, state=NodeState.DOWN))

        await store.update(down)
        await mgr.reconcile()
        stuck = live(store, svc)
        assert len(stuck) == 4 and all(t.state == TaskState.PENDING for t in stuck)
        assert all(
            "scheduling constraints not satisfied" in t.err or "not available" in t.err
            for t in stuck
        )
        await store.log.close()

    asyncio.run(run())


def test_scale_down_then_failures_restart_per_policy(tmp_path: Path) -> None:
    async def run() -> None:
        store, mgr = await cluster(tmp_path)
        svc = await create(
            store, spec("web", 3, RestartPolicy={"Condition": "on-failure", "Delay": 0})
        )
        await mgr.reconcile()

        def scale(tx: Tx) -> None:
            s = tx.get(Service, svc.id)
            assert s is not None
            tx.put(dataclasses.replace(s, spec=with_replicas(s.spec, 1)))

        await store.update(scale)
        await mgr.reconcile()
        assert [t.slot for t in live(store, svc)] == [1]

        def finish(state: TaskState) -> Any:
            def fn(tx: Tx) -> None:
                t = next(
                    t
                    for t in tx.list(Task)
                    if t.service_id == svc.id and t.desired_state <= TaskState.RUNNING
                )
                tx.put(dataclasses.replace(t, state=state))

            return fn

        await store.update(finish(TaskState.FAILED))
        await mgr.reconcile()
        assert len(live(store, svc)) == 1 and live(store, svc)[0].state == TaskState.ASSIGNED
        await store.update(finish(TaskState.COMPLETE))  # on-failure: a clean exit stays done
        await mgr.reconcile()
        assert live(store, svc) == []
        await store.log.close()

    asyncio.run(run())


def job(name: str, mode: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"Name": name, "TaskTemplate": {"ContainerSpec": {"Image": "micro"}, **extra},
            "Mode": mode}  # fmt: skip


def end(store: Store, svc: Service, state: TaskState, count: int) -> Any:
    """Ends `count` of the service's tasks of its job's current run that are under way."""

    def fn(tx: Tx) -> None:
        going = [
            t
            for t in tx.list(Task)
            if t.service_id == svc.id
            and t.job_iteration == svc.job_iteration
            and not t.state.terminal
            and t.desired_state <= TaskState.RUNNING
        ]
        for t in sorted(going, key=lambda t: t.slot)[:count]:
            tx.put(dataclasses.replace(t, state=state))

    return store.update(fn)


def test_a_replicated_job_runs_max_concurrent_at_a_time_until_its_completions(
    tmp_path: Path,
) -> None:
    async def run() -> None:
        store, mgr = await cluster(tmp_path)
        svc = await create(
            store,
            job("batch", {"ReplicatedJob": {"MaxConcurrent": 2, "TotalCompletions": 5}},
                RestartPolicy={"Condition": "on-failure", "Delay": 0, "MaxAttempts": 1}),
        )  # fmt: skip
        assert view(svc.spec).job and (svc.job_iteration, svc.job_started_at) == (0, "")

        def tasks() -> list[Task]:
            return sorted(
                (t for t in store.list(Task) if t.service_id == svc.id), key=lambda t: t.slot
            )

        await mgr.reconcile()
        assert [(t.slot, t.job_iteration) for t in tasks()] == [(0, 0), (1, 0)]
        await end(store, svc, TaskState.COMPLETE, 1)
        await mgr.reconcile()
        assert [t.slot for t in tasks()] == [0, 1, 2]
        # a failure is restarted in its slot, as the policy says (once), and no more
        await end(store, svc, TaskState.FAILED, 1)
        await mgr.reconcile()
        assert [t.slot for t in tasks()] == [0, 1, 1, 2]
        await end(store, svc, TaskState.FAILED, 1)
        await mgr.reconcile()
        failed = [t for t in tasks() if t.slot == 1]
        assert [t.state for t in failed] == [TaskState.FAILED] * 2
        assert [t.slot for t in tasks()] == [0, 1, 1, 2, 3]
        for _ in range(3):
            await end(store, svc, TaskState.COMPLETE, 2)
            await mgr.reconcile()
        done = [t for t in tasks() if t.state == TaskState.COMPLETE]
        assert sorted(t.slot for t in done) == [0, 2, 3, 4]
        # complete tasks stay as they are: desired RUNNING, never run again
        assert {t.desired_state for t in done} == {TaskState.RUNNING}
        await mgr.reconcile()
        assert len(tasks()) == 6
        await store.log.close()

    asyncio.run(run())


def test_an_update_runs_a_job_again_and_a_global_job_runs_once_per_node(tmp_path: Path) -> None:
    async def run() -> None:
        store, mgr = await cluster(tmp_path)
        svc = await create(store, job("everywhere", {"GlobalJob": {}}))
        await mgr.reconcile()
        first = [t for t in store.list(Task) if t.service_id == svc.id]
        assert sorted(t.node_id for t in first) == ["node0", "node1", "node2"]
        await end(store, svc, TaskState.COMPLETE, 2)

        def next_run(tx: Tx) -> Service:
            s = tx.get(Service, svc.id)
            assert s is not None
            tx.put(dataclasses.replace(s, job_iteration=1))
            return dataclasses.replace(s, job_iteration=1)

        again = await store.update(next_run)
        await mgr.reconcile()
        tasks = [t for t in store.list(Task) if t.service_id == svc.id]
        old = [t for t in tasks if t.job_iteration == 0]
        # the first run's: the complete ones history, the one still going removed
        assert sorted(t.desired_state for t in old) == [TaskState.SHUTDOWN] * 2 + [TaskState.REMOVE]
        assert sorted(t.node_id for t in tasks if t.job_iteration == 1) == [
            "node0", "node1", "node2"
        ]  # fmt: skip
        await end(store, again, TaskState.COMPLETE, 3)
        await mgr.reconcile()
        assert len([t for t in store.list(Task) if t.job_iteration == 1]) == 3
        await store.log.close()

    asyncio.run(run())


def test_job_modes_are_checked_with_docker_defaults() -> None:
    assert normalize_service_spec(job("j", {"ReplicatedJob": {}}))["Mode"] == {
        "ReplicatedJob": {"MaxConcurrent": 1, "TotalCompletions": 1}
    }
    assert normalize_service_spec(job("j", {"ReplicatedJob": {"MaxConcurrent": 3}}))["Mode"] == {
        "ReplicatedJob": {"MaxConcurrent": 3, "TotalCompletions": 3}
    }
    assert view(normalize_service_spec(job("j", {"GlobalJob": {}}))).mode == "global-job"
    for bad, message in (
        (job("j", {"ReplicatedJob": {"TotalCompletions": -1}}), "TotalCompletions: -1"),
        (job("j", {"GlobalJob": {}, "Global": {}}), "Global and GlobalJob given"),
        ({**job("j", {"GlobalJob": {}}), "UpdateConfig": {}}, "Jobs may not have an update"),
    ):
        with pytest.raises(SpecError, match=message):
            normalize_service_spec(bad)


def test_bad_specs_are_refused() -> None:
    for bad, message in [
        ({"Name": "x"}, "an image is required"),
        (
            {"Name": "bad name!", "TaskTemplate": {"ContainerSpec": {"Image": "micro"}}},
            "invalid name",
        ),
        ({**spec("x"), "Mode": {"Replicated": {"Replicas": -1}}}, "must be 0 or more"),
        ({**spec("x"), "Mode": {"Replicated": {"Replicas": "3"}}}, "expected an integer"),
        ({**spec("x"), "EndpointSpec": {"Ports": [{"TargetPort": 70000}]}}, "out of range"),
        (
            {**spec("x"), "EndpointSpec": {"Mode": "dnsrr", "Ports": [{"TargetPort": 80}]}},
            "can't be used with dnsrr",
        ),
        (spec("x", Placement={"Constraints": ["node.color==red"]}), "unknown key"),
        (
            {
                **spec("x"),
                "EndpointSpec": {"Ports": [{"TargetPort": 80, "PublishMode": "host"}]},
            },
            r"host-mode port 80/tcp has no published port; give it one \(--publish mode=host,"
            r"published=PORT,target=80\)",
        ),
    ]:
        with pytest.raises(SpecError, match=message):
            normalize_service_spec(bad)


def ports_spec(name: str, replicas: int, *ports: dict[str, Any]) -> dict[str, Any]:
    return {**spec(name, replicas), "EndpointSpec": {"Ports": list(ports)}}


def host(published: int, target: int = 8000, protocol: str = "tcp") -> dict[str, Any]:
    return {
        "Protocol": protocol,
        "TargetPort": target,
        "PublishedPort": published,
        "PublishMode": "host",
    }


def test_published_ports_several_per_target_and_each_kept_across_updates(
    tmp_path: Path,
) -> None:
    async def run() -> None:
        store, _ = await cluster(tmp_path)
        svc = await create(
            store,
            ports_spec(
                "multi",
                1,
                {"TargetPort": 8000},  # a port of the routing mesh's range
                {"TargetPort": 8000, "PublishedPort": 8100},
                {"TargetPort": 8000, "PublishedPort": 8101},
                {"TargetPort": 8000, "Protocol": "udp", "PublishedPort": 8100},
            ),
        )
        assert [(p["Protocol"], p["PublishedPort"], p["TargetPort"]) for p in svc.ports] == [
            ("tcp", 30000, 8000),
            ("tcp", 8100, 8000),
            ("tcp", 8101, 8000),
            ("udp", 8100, 8000),
        ]

        # another allocation (an update) keeps the allocated port, in any order of the ports
        def again(reverse: bool) -> Callable[[Tx], Service]:
            def fn(tx: Tx) -> Service:
                current = tx.get(Service, svc.id)
                assert current is not None
                ports = current.spec["EndpointSpec"]["Ports"]
                endpoint = {
                    **current.spec["EndpointSpec"],
                    "Ports": list(reversed(ports)) if reverse else ports,
                }
                moved = dataclasses.replace(
                    current, spec={**current.spec, "EndpointSpec": endpoint}
                )
                return allocator.allocate_service(tx, moved, AddressBook(tx))

            return fn

        for reverse in (False, True):
            updated = await store.update(again(reverse))
            assert sorted(p["PublishedPort"] for p in updated.ports) == [8100, 8100, 8101, 30000]
        await store.log.close()

    asyncio.run(run())


def test_host_mode_ports_keep_tasks_apart_and_off_the_routing_mesh(tmp_path: Path) -> None:
    async def run() -> None:
        store, mgr = await cluster(tmp_path)
        edge = await create(store, ports_spec("edge", 4, host(9000)))
        await mgr.reconcile()
        tasks = live(store, edge)
        assert all(t.host_ports == [host(9000)] for t in tasks)
        placed = [t for t in tasks if t.state == TaskState.ASSIGNED]
        (waiting,) = [t for t in tasks if t.state == TaskState.PENDING]
        assert sorted(t.node_id for t in placed) == ["node0", "node1", "node2"]
        # swarmkit's HostPortFilter, in its words
        assert waiting.err == "no suitable node (host-mode port already in use on 3 nodes)"
        # another service's task wants the same node port: it waits too; another port or
        # protocol is free
        other = await create(store, ports_spec("other", 1, host(9000)))
        udp = await create(store, ports_spec("udp", 1, host(9000, protocol="udp")))
        await mgr.reconcile()
        assert live(store, other)[0].err == waiting.err
        assert live(store, udp)[0].state == TaskState.ASSIGNED
        # a host-mode port is no ingress port, and neither may take the other's number
        with pytest.raises(AllocationError, match="as a host-mode port; publish another"):
            await create(store, ports_spec("mesh", 1, {"TargetPort": 80, "PublishedPort": 9000}))
        mesh = await create(store, ports_spec("mesh", 1, {"TargetPort": 80}))
        taken = mesh.ports[0]["PublishedPort"]
        with pytest.raises(AllocationError, match="as an ingress port; publish another port in"):
            await create(store, ports_spec("clash", 1, host(taken)))
        # a routing-mesh port's number skips the host-mode ones
        await create(store, ports_spec("h30001", 1, host(30001)))
        after = await create(store, ports_spec("after", 1, {"TargetPort": 80}))
        assert (taken, after.ports[0]["PublishedPort"]) == (30000, 30002)
        # other host-mode ports make a task dirty (it is replaced); other ingress ones do not
        task = placed[0]
        assert not tasks_module.dirty(edge, task)
        assert tasks_module.dirty(dataclasses.replace(edge, ports=[*edge.ports, host(9001)]), task)
        assert not tasks_module.dirty(
            dataclasses.replace(edge, ports=[*edge.ports, mesh.ports[0]]), task
        )
        await store.log.close()

    asyncio.run(run())


def test_network_allocation(tmp_path: Path) -> None:
    async def run() -> None:
        store, _ = await cluster(tmp_path)

        def make(name: str, subnet: str | None) -> Any:
            def fn(tx: Tx) -> Network:
                net = allocator.new_network(
                    tx,
                    {"Name": name, "DriverConfiguration": {"Options": {}}},
                    ipaddress.IPv4Network(subnet) if subnet else None,
                )
                tx.put(net)
                return net

            return fn

        a = await store.update(make("backend", None))
        b = await store.update(make("front", "10.9.0.0/24"))
        assert (a.subnet, a.vni, b.vni) == ("10.0.1.0/24", 4097, 4098)
        with pytest.raises(SpecError, match="already exists"):
            await store.update(make("backend", None))
        with pytest.raises(AllocationError, match="overlaps network front"):
            await store.update(make("other", "10.9.0.128/25"))
        await store.log.close()

    asyncio.run(run())


# ---- container specs, templates, resources and executors --------------------------------


def full_container() -> dict[str, Any]:
    return {
        "Image": "192.168.56.1:5000/app:v1@sha256:" + "ab" * 32,
        "Command": ["/app"],
        "Args": ["--port", "8000"],
        "Env": ["SLOT={{.Task.Slot}}", "EMPTY=", "UNSET", "NODE={{ .Node.Hostname }}"],
        "Hostname": "{{.Service.Name}}-{{.Task.Slot}}",
        "Dir": "/srv",
        "User": "app",
        "Groups": ["adm"],
        "Labels": {"tier": "front"},
        "ReadOnly": True,
        "Init": None,
        "TTY": False,
        "StopSignal": "SIGUSR1",
        "StopGracePeriod": 3 * 10**9,
        "Mounts": [
            {"Type": "bind", "Source": "/var/log", "Target": "/logs", "ReadOnly": True},
            {
                "Type": "bind",
                "Source": "/srv/{{.Node.ID}}",
                "Target": "/data",
                "BindOptions": {"Propagation": "rslave"},
            },
            {
                "Source": "cache-{{.Task.Slot}}",
                "Target": "/cache",
                "VolumeOptions": {
                    "NoCopy": True,
                    "Labels": {"b": "2", "a": "1"},
                    "DriverConfig": {"Name": "local", "Options": {"type": "tmpfs"}},
                },
            },
            {"Type": "volume", "Target": "/anon"},
            {
                "Type": "tmpfs",
                "Target": "/tmp",
                "TmpfsOptions": {"SizeBytes": 1 << 20, "Mode": 0o1777},
            },
        ],
    }


def test_container_spec_is_checked_stored_as_given_and_viewed() -> None:
    resources = {
        "Limits": {"NanoCPUs": 2 * 10**9, "MemoryBytes": 512 << 20, "Pids": 100},
        "Reservations": {"NanoCPUs": 5 * 10**8, "MemoryBytes": 256 << 20},
    }
    raw = spec("app", 2, Resources=resources)
    raw["TaskTemplate"]["ContainerSpec"] = full_container()
    normal = normalize_service_spec(raw)
    assert normal["TaskTemplate"]["ContainerSpec"] == full_container()  # round-trips exactly
    assert normal["TaskTemplate"]["Resources"] == resources
    assert view(normal).reservations == Resources(5 * 10**8, 256 << 20)
    assert view(spec_of("micro")).reservations == Resources()

    cv = container_view(normal["TaskTemplate"])
    assert cv.image == full_container()["Image"]
    assert (cv.command, cv.args) == (("/app",), ("--port", "8000"))
    assert cv.env[0] == "SLOT={{.Task.Slot}}" and cv.hostname.startswith("{{")
    assert (cv.dir, cv.user, cv.groups) == ("/srv", "app", ("adm",))
    assert dict(cv.labels) == {"tier": "front"}
    with pytest.raises(TypeError):
        # what the type already forbids, checked at run time (the spec's mappings are frozen)
        cv.labels["x"] = "y"  # type: ignore[index]
    assert (cv.read_only, cv.init, cv.tty) == (True, None, False)
    assert (cv.stop_signal, signal_number(cv.stop_signal), cv.stop_grace) == (
        "SIGUSR1",
        10,
        3 * 10**9,
    )
    assert cv.limits == Resources(2 * 10**9, 512 << 20, 100)
    assert cv.reservations == Resources(5 * 10**8, 256 << 20)
    bind, data, cache, anon, tmp = cv.mounts
    assert bind == MountSpec("bind", "/var/log", "/logs", read_only=True, propagation="rprivate")
    assert data.propagation == "rslave" and data.source == "/srv/{{.Node.ID}}"
    assert cache == MountSpec(
        "volume",
        "cache-{{.Task.Slot}}",
        "/cache",
        no_copy=True,
        volume_labels=(("a", "1"), ("b", "2")),
        volume_driver="local",
        volume_options=(("type", "tmpfs"),),
    )
    assert anon == MountSpec("volume", "", "/anon")
    assert tmp == MountSpec("tmpfs", "", "/tmp", tmpfs_size=1 << 20, tmpfs_mode=0o1777)
    hash(cv)  # frozen and hashable, labels and all

    bare = container_view({"ContainerSpec": {"Image": "alpine"}})
    assert bare == ContainerView("alpine")
    assert (bare.stop_grace, bare.init, bare.limits) == (DEFAULT_STOP_GRACE, None, Resources())


def spec_of(image: str, **container: Any) -> dict[str, Any]:
    raw = spec("x")
    raw["TaskTemplate"]["ContainerSpec"] = {"Image": image, **container}
    return normalize_service_spec(raw)


def with_container(**container: Any) -> dict[str, Any]:
    raw = spec("x")
    raw["TaskTemplate"]["ContainerSpec"] = {"Image": "alpine", **container}
    return raw


def with_resources(**resources: Any) -> dict[str, Any]:
    return spec("x", Resources=resources)


def test_valid_images_are_any_reference_now() -> None:
    for image in ["nginx", "redis:7", "192.168.56.1:5000/app", "localhost:5000/a/b:c", "micro"]:
        assert spec_of(image)["TaskTemplate"]["ContainerSpec"]["Image"] == image
    for stop_signal in ["SIGTERM", "TERM", "term", "SIGRTMIN+3", "RTMAX-1", "9", "64"]:
        spec_of("alpine", StopSignal=stop_signal)


CS = "TaskTemplate.ContainerSpec"
MOUNTS = f"{CS}.Mounts"


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        # images
        (
            with_container(Image="Nginx"),
            "invalid reference format for image 'Nginx': repository name must be lowercase",
        ),
        (with_container(Image="nginx:"), "invalid reference format for image 'nginx:': empty tag"),
        (
            with_container(Image="a..b"),
            "invalid reference format for image 'a..b': invalid repository",
        ),
        (
            with_container(Image="x@sha256:12"),
            "invalid reference format for image .*invalid digest",
        ),
        (with_container(Image=7), "an image is required"),
        (with_container(Image="a" * 5000), f"{CS}.Image: 5000 characters, at most 4096"),
        # types
        (with_container(Command="sh -c x"), f"{CS}.Command: expected a list"),
        (with_container(Args=[1]), f"{CS}.Args: expected a list of strings"),
        (with_container(Hostname=5), f"{CS}.Hostname: expected a string"),
        (with_container(User=0), f"{CS}.User: expected a string"),
        (with_container(Groups="adm"), f"{CS}.Groups: expected a list"),
        (with_container(Labels={"a": 1}), f"{CS}.Labels: values must be strings"),
        (with_container(ReadOnly="yes"), f"{CS}.ReadOnly: expected true or false"),
        (with_container(Init=1), f"{CS}.Init: expected true or false"),
        (with_container(TTY="true"), f"{CS}.TTY: expected true or false"),
        (with_container(StopGracePeriod=-1), f"{CS}.StopGracePeriod: -1 is out of range"),
        (with_container(StopGracePeriod="10s"), f"{CS}.StopGracePeriod: expected an integer"),
        (
            with_container(Dir="srv"),
            f"{CS}.Dir: the working directory 'srv' is invalid, it needs to be an absolute",
        ),
        # env
        (with_container(Env=["=x"]), rf"{CS}.Env\[0\]: invalid environment variable '=x'"),
        (with_container(Env=["A=1", ""]), rf"{CS}.Env\[1\]: invalid environment variable ''"),
        (with_container(Env=["A=\0"]), rf"{CS}.Env\[0\]: .*NUL"),
        (with_container(Args=["a\0b"]), rf"{CS}.Args\[0\]: contains a NUL"),
        # signals
        (
            with_container(StopSignal="SIGFOO"),
            f"{CS}.StopSignal: invalid signal 'SIGFOO': use a name like SIGTERM",
        ),
        (with_container(StopSignal="0"), f"{CS}.StopSignal: invalid signal '0'"),
        (with_container(StopSignal="65"), f"{CS}.StopSignal: invalid signal '65'"),
        (with_container(StopSignal="-9"), f"{CS}.StopSignal: invalid signal"),
        # templates
        (
            with_container(Hostname="{{.Foo}}"),
            rf"{CS}.Hostname: unknown placeholder {{{{.Foo}}}}; use {{{{.Service.ID}}}}, "
            r"{{.Service.Name}}",
        ),
        (with_container(Hostname="x-{{.Task.Slot"), f"{CS}.Hostname: unclosed placeholder"),
        (
            with_container(Env=["A={{.Service.Labels}}"]),
            r"Env\[0\]: .*service labels are not supported",
        ),
        (with_container(Env=["A={{ .Task.Slot | printf }}"]), r"Env\[0\]: unknown placeholder"),
        (
            with_container(Mounts=[{"Source": "v{{.Nope}}", "Target": "/v"}]),
            rf"{MOUNTS}\[0\].Source: unknown placeholder",
        ),
        # mounts
        (
            with_container(Mounts=[{"Type": "bind", "Source": "/a"}]),
            rf"{MOUNTS}\[0\].Target: a target",
        ),
        (
            with_container(Mounts=[{"Source": "v", "Target": "data"}]),
            rf"{MOUNTS}\[0\].Target: invalid mount target 'data', must be an absolute path",
        ),
        (
            with_container(Mounts=[{"Type": "bind", "Source": "rel", "Target": "/a"}]),
            rf"{MOUNTS}\[0\].Source: invalid bind mount source 'rel'",
        ),
        (
            with_container(Mounts=[{"Type": "bind", "Target": "/a"}]),
            rf"{MOUNTS}\[0\].Source: invalid bind mount source ''",
        ),
        (
            with_container(Mounts=[{"Type": "volume", "Source": "/host", "Target": "/a"}]),
            rf"{MOUNTS}\[0\].Source: '/host' includes invalid characters for a local volume name",
        ),
        (
            with_container(Mounts=[{"Source": "a b", "Target": "/a"}]),
            "invalid characters for a local volume name",
        ),
        (
            with_container(Mounts=[{"Type": "tmpfs", "Source": "x", "Target": "/a"}]),
            rf"{MOUNTS}\[0\].Source: invalid tmpfs source, source must be empty",
        ),
        (
            with_container(Mounts=[{"Type": "npipe", "Target": "/a"}]),
            rf"{MOUNTS}\[0\].Type: invalid mount type 'npipe': use bind, volume or tmpfs",
        ),
        (
            with_container(
                Mounts=[{"Target": "/a"}, {"Type": "tmpfs", "Target": "/x"}, {"Target": "/x/"}]
            ),
            rf"{MOUNTS}\[2\].Target: duplicate mount point: /x/",
        ),
        (
            with_container(Mounts=[{"Target": "/a", "TmpfsOptions": {}}]),
            rf"{MOUNTS}\[0\].TmpfsOptions: must not be specified on mount type 'volume'",
        ),
        (
            with_container(Mounts=[{"Target": "/a", "BindOptions": {"Propagation": "shared"}}]),
            r"BindOptions: must not be specified on mount type 'volume'",
        ),
        (
            with_container(Mounts=[{"Type": "tmpfs", "Target": "/a", "VolumeOptions": {}}]),
            r"VolumeOptions: must not be specified on mount type 'tmpfs'",
        ),
        (
            with_container(
                Mounts=[
                    {
                        "Type": "bind",
                        "Source": "/a",
                        "Target": "/a",
                        "BindOptions": {"Propagation": "up"},
                    }
                ]
            ),
            r"BindOptions.Propagation: invalid propagation mode 'up'",
        ),
        (
            with_container(
                Mounts=[{"Type": "tmpfs", "Target": "/a", "TmpfsOptions": {"SizeBytes": -1}}]
            ),
            r"TmpfsOptions.SizeBytes: -1 is out of range",
        ),
        (
            with_container(
                Mounts=[{"Type": "tmpfs", "Target": "/a", "TmpfsOptions": {"Mode": 0o10000}}]
            ),
            r"TmpfsOptions.Mode: 4096 is out of range",
        ),
        (
            with_container(Mounts=[{"Target": "/a", "VolumeOptions": {"NoCopy": "1"}}]),
            r"VolumeOptions.NoCopy: expected true or false",
        ),
        (
            with_container(
                Mounts=[{"Target": "/a", "VolumeOptions": {"DriverConfig": {"Options": {"o": 1}}}}]
            ),
            r"DriverConfig.Options: values must be strings",
        ),
        (with_container(Mounts={"Target": "/a"}), rf"{MOUNTS}: expected a list"),
        (with_container(Mounts=["/a:/b"]), rf"{MOUNTS}\[0\]: expected an object"),
        # resources
        (
            with_resources(Limits={"MemoryBytes": 4 << 20}),
            r"Resources.Limits.MemoryBytes: Minimum memory limit allowed is 6MB",
        ),
        (
            with_resources(Limits={"MemoryBytes": -1}),
            r"Resources.Limits.MemoryBytes: -1 is out of range",
        ),
        (
            with_resources(Limits={"NanoCPUs": 1.5}),
            r"Resources.Limits.NanoCPUs: expected an integer",
        ),
        (
            with_resources(Limits={"NanoCPUs": 1000}),
            r"Resources.Limits.NanoCPUs: invalid cpu value 1e-06: Must be at least 0.001",
        ),
        (with_resources(Limits={"Pids": -5}), r"Resources.Limits.Pids: -5 is out of range"),
        (
            with_resources(Reservations={"MemoryBytes": "1G"}),
            r"Resources.Reservations.MemoryBytes: expected an integer",
        ),
        (
            with_resources(
                Limits={"MemoryBytes": 64 << 20}, Reservations={"MemoryBytes": 128 << 20}
            ),
            r"Resources.Reservations.MemoryBytes: the reservation \(134217728\) is larger "
            r"than the limit \(67108864\)",
        ),
        (
            with_resources(Limits={"NanoCPUs": 10**9}, Reservations={"NanoCPUs": 2 * 10**9}),
            r"Reservations.NanoCPUs: the reservation \(2000000000\) is larger than the limit",
        ),
        (with_resources(Limits=[]), r"Resources.Limits: expected an object"),
        # bounds
        (with_container(Env=["A=1"] * 1001), rf"{CS}.Env: 1001 entries, at most 1000 are allowed"),
        (with_container(Args=["a"] * 1001), rf"{CS}.Args: 1001 entries, at most 1000"),
        (with_container(Command=["a"] * 1001), rf"{CS}.Command: 1001 entries, at most 1000"),
        (
            with_container(Env=["A=" + "x" * 65536]),
            rf"{CS}.Env\[0\]: 65538 characters, at most 65536",
        ),
        (with_container(Hostname="h" * 4097), rf"{CS}.Hostname: 4097 characters, at most 4096"),
        (with_container(Dir="/" + "d" * 4096), rf"{CS}.Dir: 4097 characters, at most 4096"),
        (
            with_container(Labels={str(i): "" for i in range(1001)}),
            rf"{CS}.Labels: 1001 labels, at most 1000",
        ),
        (
            with_container(Labels={"k": "v" * 65537}),
            rf"{CS}.Labels\['k'\]: 65537 characters, at most 65536",
        ),
        (with_container(Labels={"k" * 4097: "v"}), rf"{CS}.Labels: a key of 4097 characters"),
        (
            {**spec("x"), "Labels": {str(i): "" for i in range(1001)}},
            "Labels: 1001 labels, at most 1000",
        ),
        (
            with_container(Mounts=[{"Type": "tmpfs", "Target": f"/t{i}"} for i in range(101)]),
            rf"{MOUNTS}: 101 mounts, at most 100 are allowed",
        ),
        (
            with_container(Mounts=[{"Type": "bind", "Source": "/" + "s" * 4096, "Target": "/a"}]),
            r"Source: 4097 characters, at most 4096",
        ),
    ],
)
def test_bad_container_specs_are_refused(bad: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        normalize_service_spec(bad)


def test_bounds_allow_their_limits() -> None:
    normalize_service_spec(
        with_container(
            Env=[f"K{i}=" + "x" * 60000 for i in range(3)] + ["A=1"] * 997,
            Labels={str(i): "v" for i in range(1000)},
            Mounts=[{"Type": "tmpfs", "Target": f"/t{i}"} for i in range(100)],
            Hostname="h" * 4096,
        )
    )
    normalize_service_spec(with_resources(Limits={"MemoryBytes": 6 << 20, "NanoCPUs": 10**6}))


def test_templates_check_and_expand() -> None:
    ctx = TemplateContext(
        service_id="svc1",
        service_name="web",
        node_id="node1",
        node_hostname="sw1",
        task_id="task1",
        task_name="web.2.task1",
        task_slot="2",
        arch="aarch64",
    )
    assert expand("{{.Service.Name}}-{{ .Task.Slot }}", ctx) == "web-2"
    assert expand("{{.Service.ID}}/{{.Node.ID}}/{{.Task.ID}}/{{.Task.Name}}", ctx) == (
        "svc1/node1/task1/web.2.task1"
    )
    assert expand(
        "{{.Node.Hostname}}:{{.Node.Platform.OS}}/{{.Node.Platform.Architecture}}", ctx
    ) == ("sw1:linux/aarch64")
    assert expand("no placeholders } {x} }}", ctx) == "no placeholders } {x} }}"
    assert expand("{{\t.Task.Slot\n}}{{.Task.Slot}}", ctx) == "22"
    check("plain", "f")
    check("{{.Task.Slot}}", "f")
    for bad, message in [
        ("{{.Foo}}", "f: unknown placeholder {{.Foo}}; use {{.Service.ID}}, {{.Service.Name}}"),
        ("{{.Service.Labels}}", "service labels are not supported"),
        ("{{}}", "unknown placeholder {{}}"),
        ("{{.task.slot}}", "unknown placeholder {{.task.slot}}"),
        ("a {{.Task.Slot", "f: unclosed placeholder '{{.Task.Slot'"),
        ("{{.Task.Slot}} {{", "unclosed placeholder"),
        ("{{{.Task.Slot}}}", "unknown placeholder {{{.Task.Slot}}"),
    ]:
        with pytest.raises(SpecError) as err:
            check(bad, "f")
        assert message in str(err.value), (bad, str(err.value))
        with pytest.raises(SpecError):
            expand(bad, ctx)
    start = time.perf_counter()  # linear on hostile input
    with pytest.raises(SpecError):
        check("{{" * 40000, "f")
    with pytest.raises(SpecError):
        check("{{.Task.Slot}}" * 5000 + "{{", "f")
    assert time.perf_counter() - start < 0.5


async def sized_cluster(tmp: Path, nodes: int = 3, **fields: Any) -> tuple[Store, Manager]:
    store, mgr = await cluster(tmp, nodes)

    def size(tx: Tx) -> None:
        for n in tx.list(Node):
            tx.put(dataclasses.replace(n, **fields))

    await store.update(size)
    return store, mgr


def reserving(
    name: str, replicas: int, cpus: float = 0, memory: int = 0, image: str = "micro"
) -> dict[str, Any]:
    out = spec(
        name,
        replicas,
        Resources={"Reservations": {"NanoCPUs": int(cpus * 10**9), "MemoryBytes": memory}},
    )
    out["TaskTemplate"]["ContainerSpec"]["Image"] = image
    del out["EndpointSpec"]
    return out


def test_reservations_spread_fill_nodes_and_wait_with_the_reason(tmp_path: Path) -> None:
    async def run() -> None:
        store, mgr = await sized_cluster(tmp_path, nano_cpus=2 * 10**9, memory_bytes=1 << 30)
        # 6 tasks of 1 CPU on three 2-CPU nodes: all placed in one pass, two per node
        big = await create(store, reserving("big", 6, cpus=1))
        await mgr.reconcile()
        tasks = live(store, big)
        assert all(t.state == TaskState.ASSIGNED for t in tasks)
        assert Counter(t.node_id for t in tasks) == {"node0": 2, "node1": 2, "node2": 2}
        # no CPU left: a task reserving any waits; one reserving nothing is placed
        more = await create(store, reserving("more", 1, cpus=0.5))
        free = await create(store, reserving("free", 1, memory=512 << 20))
        await mgr.reconcile()
        (waiting,) = live(store, more)
        assert waiting.state == TaskState.PENDING
        assert waiting.err == "no suitable node (insufficient resources on 3 nodes)"
        assert live(store, free)[0].state == TaskState.ASSIGNED
        # memory: 512 MiB taken on one node, 1 GiB wanted: fits on the other two only
        mem = await create(store, reserving("mem", 2, memory=1 << 30))
        await mgr.reconcile()
        assert {t.node_id for t in live(store, mem)} == {"node0", "node1", "node2"} - {
            live(store, free)[0].node_id
        }
        third = await create(store, reserving("third", 1, memory=1 << 30))
        await mgr.reconcile()
        assert live(store, third)[0].err == "no suitable node (insufficient resources on 3 nodes)"

        # a finished task frees its reservation, and the waiting one is placed
        def finish(tx: Tx) -> None:
            t = next(t for t in tx.list(Task) if t.service_id == big.id)
            tx.put(
                dataclasses.replace(t, state=TaskState.COMPLETE, desired_state=TaskState.SHUTDOWN)
            )

        await store.update(finish)
        await mgr.reconcile()
        assert live(store, more)[0].state == TaskState.ASSIGNED

        # reasons combine as Docker's do; a node of unknown capacity takes anything
        def shape(tx: Tx) -> None:
            changes: list[tuple[str, dict[str, Any]]] = [
                ("node0", {"labels": {"zone": "c"}}),
                ("node1", {"state": NodeState.DOWN}),
            ]
            for node_id, fields in changes:
                n = tx.get(Node, node_id)
                assert n is not None
                tx.put(dataclasses.replace(n, **fields))

        await store.update(shape)
        picky = await create(
            store,
            {
                **reserving("picky", 1, memory=1 << 30),
                "TaskTemplate": {
                    **reserving("picky", 1, memory=1 << 30)["TaskTemplate"],
                    "Placement": {"Constraints": ["node.labels.zone!=b"]},
                },
            },
        )
        await mgr.reconcile()
        assert live(store, picky)[0].err == (
            "no suitable node (scheduling constraints not satisfied on 1 node; "
            "insufficient resources on 1 node; 1 node not available for new tasks)"
        )

        def unknown_capacity(tx: Tx) -> None:
            n = tx.get(Node, "node0")
            assert n is not None
            tx.put(dataclasses.replace(n, memory_bytes=0, nano_cpus=0))

        await store.update(unknown_capacity)
        await mgr.reconcile()
        assert live(store, picky)[0].node_id == "node0"
        await store.log.close()

    asyncio.run(run())


def test_native_nodes_run_only_their_images(tmp_path: Path) -> None:
    native = sorted(images.known())

    async def run() -> None:
        store, mgr = await sized_cluster(tmp_path, executor="native", images=native)
        redis = await create(store, reserving("redis", 2, image="redis:7"))
        web = await create(store, reserving("web", 3, image="docker.io/library/alpine:3.20"))
        await mgr.reconcile()
        assert all(t.state == TaskState.ASSIGNED for t in live(store, web))
        waiting = live(store, redis)
        assert all(t.state == TaskState.PENDING for t in waiting)
        assert waiting[0].err == (
            "image 'redis:7' runs on no available node: 3 nodes run the native executor, "
            f"which runs {', '.join(native)}; start shoald with a container engine on a node, "
            "see docs/container-executor.md"
        )

        # with another reason on top
        def down(tx: Tx) -> None:
            n = tx.get(Node, "node2")
            assert n is not None
            tx.put(dataclasses.replace(n, state=NodeState.DOWN))

        await store.update(down)
        await mgr.reconcile()
        assert live(store, redis)[0].err.startswith(
            "no suitable node (1 node not available for new tasks); image 'redis:7' runs on "
            "no available node: 2 nodes run the native executor"
        )

        # a node with a container engine (or from before executors: images unknown) runs it
        def engine(tx: Tx) -> None:
            n = tx.get(Node, "node1")
            assert n is not None
            tx.put(dataclasses.replace(n, executor="container", images=[]))

        await store.update(engine)
        await mgr.reconcile()
        assert {(t.state, t.node_id) for t in live(store, redis)} == {(TaskState.ASSIGNED, "node1")}
        await store.log.close()

    asyncio.run(run())


def test_node_descriptions_set_executor_images_and_capacity() -> None:
    assert described(None) == {}
    assert described({"hostname": "sw1", "engine_version": "28"}) == {}  # an older agent
    assert described(
        {
            "executor": "native",
            "images": ["micro", "docker.io/library/alpine:3", "gianarb/micro", "Bad!", 7],
            "nano_cpus": 4 * 10**9,
            "memory_bytes": 8 << 30,
        }
    ) == {
        "executor": "native",
        "images": ["alpine", "gianarb/micro", "micro"],
        "nano_cpus": 4 * 10**9,
        "memory_bytes": 8 << 30,
    }
    assert described({"executor": "container", "nano_cpus": 0, "memory_bytes": -1}) == {
        "executor": "container",
        "images": [],
    }
    assert described({"executor": "kata", "nano_cpus": True, "images": "alpine"}) == {}
    assert described({"images": ["x"] * 10000})["images"] == ["x"]
    # nodes stored before executors decode with none: they run anything, as they did
    old = to_dict(Node(id="n1", hostname="sw1"))
    del old["executor"], old["images"]
    node = from_dict(Node, old)
    assert (node.executor, node.images) == ("", [])


def test_a_failing_pass_backs_off_and_is_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loop that raises: each failure is counted under the loop's name, and the pass is
    retried no sooner than the backoff (doubled per failure, capped) however often the store
    changes meanwhile; a pass that succeeds resets the backoff, and a change wakes it again."""
    first, cap = 0.1, 0.4
    attempts: list[float] = []  # when the scheduler was called
    passed: list[float] = []  # when it returned
    broken = [True]
    real = scheduler.schedule

    def schedule(tx: Tx) -> int:
        attempts.append(time.monotonic())
        if broken[0]:
            raise RuntimeError("a bug in the scheduler")
        done = real(tx)
        passed.append(time.monotonic())
        return done

    monkeypatch.setattr(scheduler, "schedule", schedule)

    async def until(check: Any, what: str, within: float = 10) -> None:
        deadline = time.monotonic() + within
        while not check():
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.005)

    async def run() -> None:
        store, _ = await cluster(tmp_path)
        mgr = Manager(store, backoff=(first, cap))

        def failures(loop: str) -> float:
            value = mgr.registry.get_sample_value(
                "shoal_manager_reconcile_failures_total", {"loop": loop}
            )
            assert value is not None, f"no failure count for {loop}"
            return value

        async def relabel(value: str) -> None:
            def fn(tx: Tx) -> None:
                n = tx.get(Node, "node1")
                assert n is not None
                tx.put(dataclasses.replace(n, labels={**n.labels, "churn": value}))

            await store.update(fn)

        stop = asyncio.Event()

        async def churn() -> None:  # a store that changes all the time
            i = 0
            while not stop.is_set():
                i += 1
                await relabel(str(i))
                await asyncio.sleep(0.01)

        assert {loop: failures(loop) for loop in LOOPS} == dict.fromkeys(LOOPS, 0.0)
        mgr.start()
        churner = asyncio.create_task(churn())
        try:
            await until(lambda: len(attempts) >= 6, "6 failed passes")
            stop.set()
            await churner
            # each failure counted as it happens, under the loop that raised
            assert failures("scheduler") == len(attempts)
            assert {loop: failures(loop) for loop in LOOPS if loop != "scheduler"} == (
                dict.fromkeys(("orchestrator", "allocator", "reaper"), 0.0)
            )
            gaps = [b - a for a, b in itertools.pairwise(attempts[:6])]
            for gap, backoff in zip(gaps, [first, 2 * first, cap, cap, cap], strict=True):
                assert gap >= backoff - 0.01, gaps  # no sooner, though the store changed
            assert gaps[-1] < 2 * cap, gaps  # capped, not doubled again

            # fixed: the next retry succeeds, and the loop waits for the store again
            broken[0] = False
            await until(lambda: bool(passed), "a pass that succeeds")
            failed = failures("scheduler")
            calls = len(attempts)
            await asyncio.sleep(2 * cap)
            assert len(attempts) == calls and failures("scheduler") == failed

            # a change wakes it; failing again, it retries after the first delay again
            broken[0] = True
            await relabel("again")
            await until(lambda: len(attempts) >= calls + 2, "a failure and its retry")
            assert first - 0.01 <= attempts[calls + 1] - attempts[calls] < cap, attempts[calls:]
            assert failures("scheduler") == failed + 2
        finally:
            stop.set()
            await mgr.stop()
            await store.log.close()

    asyncio.run(run())


def test_fields_shoal_does_not_honour_are_refused_and_empty_ones_are_not() -> None:
    def with_container(**cs: object) -> dict[str, object]:
        return {"Name": "u", "TaskTemplate": {"ContainerSpec": {"Image": "busybox", **cs}}}

    for key, value in [
        ("Secrets", [{"SecretName": "pw"}]),
        ("DNSConfig", {"Nameservers": ["10.0.0.2"]}),
        ("Privileges", {"NoNewPrivileges": True}),
        ("Isolation", "process"),
    ]:
        with pytest.raises(SpecError, match=rf"ContainerSpec\.{key}: .*not supported"):
            normalize_service_spec(with_container(**{key: value}))
    with pytest.raises(SpecError, match=r"Placement\.Preferences: .*not supported"):
        normalize_service_spec(
            {
                "Name": "u",
                "TaskTemplate": {
                    "ContainerSpec": {"Image": "busybox"},
                    "Placement": {"Preferences": [{"Spread": {"SpreadDescriptor": "x"}}]},
                },
            }
        )
    # as the docker CLI sends them when no flag asks for anything
    normalize_service_spec(
        with_container(DNSConfig={}, Privileges={"NoNewPrivileges": False}, Hosts=[], Isolation="")
    )
