"""The manager's control loops on a real store: orchestration, allocation, scheduling, reaping."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from orchestrator.manager import allocator
from orchestrator.manager.allocator import AddressBook, AllocationError
from orchestrator.manager.manager import Manager
from orchestrator.manager.spec import SpecError, normalize_service_spec, with_replicas
from orchestrator.store.ids import new_id
from orchestrator.store.objects import Network, Node, Service, Task, TaskState
from orchestrator.store.raftlog import RaftLog
from orchestrator.store.store import Store, Tx


async def cluster(tmp: Path, nodes: int = 3) -> tuple[Store, Manager]:
    store = Store(RaftLog(tmp, 1, "", bootstrap=True))
    await store.log.start()

    def setup(tx: Tx) -> None:
        tx.put(allocator.new_network(tx, allocator.ingress_spec(), allocator.INGRESS_SUBNET))
        for i in range(nodes):
            tx.put(
                Node(
                    id=f"node{i}",
                    hostname=f"sw{i + 1}",
                    state="ready",
                    role="manager" if i == 0 else "worker",
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
            tx.put(dataclasses.replace(n, availability="drain"))

        await store.update(drain)
        await mgr.reconcile()
        await mgr.reconcile()
        assert {t.node_id for t in live(store, svc)} == {"node0"}
        assert len(live(store, svc)) == 4

        def down(tx: Tx) -> None:
            n = tx.get(Node, "node0")
            assert n is not None
            tx.put(dataclasses.replace(n, state="down"))

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
    ]:
        with pytest.raises(SpecError, match=message):
            normalize_service_spec(bad)


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
