"""Rolling updates and rollbacks (manager/orchestrator/update.py) on a real store, the clock
given: parallelism, order, delay, monitoring, failure actions, manual and automatic rollback."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path
from typing import Any

from orchestrator.manager.allocator import AddressBook, allocate_service
from orchestrator.manager.orchestrator import replicated
from orchestrator.manager.orchestrator.restart import RestartTracker
from orchestrator.manager.orchestrator.update import UpdateTracker, roll_back
from orchestrator.manager.spec import SECOND, normalize_service_spec
from orchestrator.store.objects import Node, Service, Task, TaskState
from orchestrator.store.store import Store, Tx
from tests.test_manager import cluster, create, spec


class Harness:
    """One service, its orchestrator passes at a given time, and its tasks' lives."""

    def __init__(self, store: Store, svc: Service):
        self.store = store
        self.id = svc.id
        self.restarts = RestartTracker()
        self.updates = UpdateTracker()
        self.now = time.time()  # tasks carry wall-clock timestamps (restart delays read them)

    async def step(self, seconds: float = 0.0) -> float | None:
        self.now += seconds

        def fn(tx: Tx) -> float | None:
            svc = tx.get(Service, self.id)
            assert svc is not None
            tasks = [t for t in tx.list(Task) if t.service_id == self.id]
            nodes = {n.id: n for n in tx.list(Node)}
            return replicated.reconcile(
                tx, svc, tasks, nodes, self.restarts, self.updates, self.now
            )

        return await self.store.update(fn)

    @property
    def svc(self) -> Service:
        svc = self.store.get(Service, self.id)
        assert svc is not None
        return svc

    def status(self) -> dict[str, Any]:
        status = self.svc.update_status
        assert status is not None
        return status

    def tasks(self) -> list[Task]:
        return [t for t in self.store.list(Task) if t.service_id == self.id]

    def live(self) -> list[Task]:
        return [t for t in self.tasks() if t.desired_state <= TaskState.RUNNING]

    async def settle(self, fail: Collection[str] = frozenset()) -> None:
        """Every task wanted running runs (those in `fail` fail instead); every task wanted
        stopped stops: what the agents would report."""

        def fn(tx: Tx) -> None:
            for t in tx.list(Task):
                if t.service_id != self.id or t.state.terminal:
                    continue
                if t.desired_state > TaskState.RUNNING:
                    tx.put(dataclasses.replace(t, state=TaskState.SHUTDOWN))
                elif t.id in fail:
                    tx.put(dataclasses.replace(t, state=TaskState.FAILED, err="exit 1"))
                elif t.state < TaskState.RUNNING:
                    tx.put(dataclasses.replace(t, state=TaskState.RUNNING))

        await self.store.update(fn)

    async def update(self, **template: Any) -> None:
        """A `service update`, as the API makes it."""

        def fn(tx: Tx) -> None:
            svc = tx.get(Service, self.id)
            assert svc is not None
            new = normalize_service_spec(
                {
                    **svc.spec,
                    "TaskTemplate": {**svc.spec["TaskTemplate"], **template},
                }
            )
            tx.put(
                dataclasses.replace(
                    svc,
                    spec=new,
                    previous_spec=svc.spec,
                    spec_version=svc.spec_version + 1,
                    update_status=None,
                )
            )

        await self.store.update(fn)

    def image(self, t: Task) -> str:
        return str(t.spec["ContainerSpec"]["Image"])


def run(body: Callable[[Harness], Awaitable[None]], tmp: Path, **service: Any) -> None:
    async def main() -> None:
        store, _ = await cluster(tmp)
        svc = await create(store, {**spec("web", 4), **service})
        h = Harness(store, svc)
        await h.step()
        await h.settle()
        try:
            await body(h)
        finally:
            await store.log.close()

    asyncio.run(main())


def test_stop_first_one_at_a_time_then_completed_after_monitoring(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.update(ContainerSpec={"Image": "micro:2"})
        await h.step()
        assert h.status()["State"] == "updating"
        assert h.status()["Message"] == "update in progress"
        new = [t for t in h.live() if h.image(t) == "micro:2"]
        assert len(new) == 1 and len(h.live()) == 4  # stop-first: the old one of its slot
        for _ in range(3):
            await h.step()
            assert len([t for t in h.live() if h.image(t) == "micro:2"]) == len(new)  # waits
            await h.settle()
            await h.step()
            new = [t for t in h.live() if h.image(t) == "micro:2"]
        assert len(new) == 4
        await h.settle()
        wake = await h.step()
        assert h.status()["State"] == "updating"  # watched for Monitor (5 s)
        assert wake is not None and 4 <= wake - h.now <= 5
        await h.step(5)
        status = h.status()
        assert status["State"] == "completed" and status["Message"] == "update completed"
        assert status["CompletedAt"] >= status["StartedAt"]

    run(body, tmp_path)


def test_start_first_keeps_the_old_task_until_the_new_one_runs(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.update(ContainerSpec={"Image": "micro:2"})
        await h.step()
        assert len(h.live()) == 5  # the new one is made first
        slot = next(t.slot for t in h.live() if h.image(t) == "micro:2")
        assert {h.image(t) for t in h.live() if t.slot == slot} == {"micro", "micro:2"}
        await h.step()
        assert len(h.live()) == 5  # not before it runs
        await h.settle()
        await h.step()
        old = [t for t in h.tasks() if t.slot == slot and h.image(t) == "micro"]
        assert all(t.desired_state == TaskState.SHUTDOWN for t in old)

    run(body, tmp_path, UpdateConfig={"Order": "start-first", "Parallelism": 1})


def test_parallelism_and_delay(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.update(ContainerSpec={"Image": "micro:2"})
        await h.step()
        assert len([t for t in h.live() if h.image(t) == "micro:2"]) == 2
        await h.settle()
        wake = await h.step()  # both slots done: the workers wait out the 10 s delay
        assert len([t for t in h.live() if h.image(t) == "micro:2"]) == 2
        assert wake == h.now + 10
        await h.step(9)
        assert len([t for t in h.live() if h.image(t) == "micro:2"]) == 2
        await h.step(1)
        assert len([t for t in h.live() if h.image(t) == "micro:2"]) == 4

    run(body, tmp_path, UpdateConfig={"Parallelism": 2, "Delay": 10 * SECOND})


def test_a_failure_pauses_and_the_next_update_resumes(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.update(ContainerSpec={"Image": "broken"})
        await h.step()
        [bad] = [t for t in h.live() if h.image(t) == "broken"]
        await h.settle(fail={bad.id})
        await h.step()
        status = h.status()
        assert status["State"] == "paused"
        assert status["Message"] == (
            f"update paused due to failure or early termination of task {bad.id}"
        )
        for _ in range(3):  # paused: nothing more is replaced
            await h.step(10)
            await h.settle()
        assert len([t for t in h.live() if h.image(t) == "micro"]) == 3
        await h.update(ContainerSpec={"Image": "micro:3"})
        await h.step()
        assert h.status()["State"] == "updating"
        for _ in range(5):
            await h.settle()
            await h.step()
        assert {h.image(t) for t in h.live()} == {"micro:3"}

    run(body, tmp_path)


def test_failure_action_rollback_restores_the_previous_spec(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        before = h.svc.spec
        await h.update(ContainerSpec={"Image": "broken"}, Env=None)
        await h.step()
        [bad] = [t for t in h.live() if h.image(t) == "broken"]
        await h.settle(fail={bad.id})
        await h.step()
        status = h.status()
        assert status["State"] == "rollback_started"
        assert status["Message"] == (
            f"update rolled back due to failure or early termination of task {bad.id}"
        )
        assert h.svc.spec == before and h.svc.previous_spec is None
        for _ in range(6):
            await h.settle()
            await h.step()
        await h.step(6)
        assert {h.image(t) for t in h.live()} == {"micro"}
        assert len(h.live()) == 4
        assert h.status()["State"] == "rollback_completed"
        assert h.status()["Message"] == "rollback completed"

    run(body, tmp_path, UpdateConfig={"Parallelism": 1, "FailureAction": "rollback"})


def test_a_failing_rollback_pauses_rather_than_rolling_back_again(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.update(ContainerSpec={"Image": "micro:2"})
        for _ in range(6):
            await h.step()
            await h.settle()
        await h.step(6)
        assert h.status()["State"] == "completed"

        def back(tx: Tx) -> None:
            svc = tx.get(Service, h.id)
            assert svc is not None
            tx.put(roll_back(svc, "manually requested rollback", manual=True))

        await h.store.update(back)
        assert h.svc.previous_spec is not None  # manual: the rolled-back spec is kept
        await h.step()
        [first] = [t for t in h.live() if h.image(t) == "micro"]
        await h.settle(fail={first.id})
        await h.step()
        assert h.status()["State"] == "rollback_paused"
        assert h.status()["Message"].startswith("rollback paused due to failure")

    run(body, tmp_path, RollbackConfig={"Parallelism": 1, "FailureAction": "pause"})


def test_max_failure_ratio_and_continue(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.update(ContainerSpec={"Image": "micro:2"})
        await h.step()
        [first] = [t for t in h.live() if h.image(t) == "micro:2"]
        await h.settle(fail={first.id})  # 1 of 4 = 0.25: not above 0.5
        await h.step()
        assert h.status()["State"] == "updating"

    run(body, tmp_path, UpdateConfig={"Parallelism": 1, "MaxFailureRatio": 0.5})


def test_a_config_without_parallelism_updates_every_slot_at_once(tmp_path: Path) -> None:
    """Docker's zero value: an UpdateConfig given without Parallelism means all at once (no
    UpdateConfig at all means swarmkit's default, 1)."""

    async def body(h: Harness) -> None:
        await h.update(ContainerSpec={"Image": "micro:2"})
        await h.step()
        assert len([t for t in h.live() if h.image(t) == "micro:2"]) == 4

    run(body, tmp_path, UpdateConfig={"Delay": SECOND})


def _update_with_ports(h: Harness, image: str, published: int) -> Callable[[Tx], None]:
    """A `service update` of the image and the published port, allocated as the API does."""

    def fn(tx: Tx) -> None:
        svc = tx.get(Service, h.id)
        assert svc is not None
        new = normalize_service_spec(
            {
                **svc.spec,
                "TaskTemplate": {**svc.spec["TaskTemplate"], "ContainerSpec": {"Image": image}},
                "EndpointSpec": {"Ports": [{"TargetPort": 8000, "PublishedPort": published}]},
            }
        )
        updated = dataclasses.replace(
            svc,
            spec=new,
            previous_spec=svc.spec,
            spec_version=svc.spec_version + 1,
            update_status=None,
        )
        tx.put(allocate_service(tx, updated, AddressBook(tx)))

    return fn


def published(svc: Service) -> list[int]:
    return [int(p["PublishedPort"]) for p in svc.ports]


ROLLBACK_ON_FAILURE: dict[str, Any] = {
    "UpdateConfig": {"Parallelism": 1, "FailureAction": "rollback"},
    "EndpointSpec": {"Ports": [{"TargetPort": 8000, "PublishedPort": 30800}]},
}


def test_an_automatic_rollback_publishes_the_previous_ports_again(tmp_path: Path) -> None:
    """The rollback gives back the previous spec's allocation too (Endpoint.Ports: what the
    routing mesh publishes), not only its EndpointSpec."""

    async def body(h: Harness) -> None:
        assert published(h.svc) == [30800]
        await h.store.update(_update_with_ports(h, "broken", 30801))
        assert published(h.svc) == [30801]
        await h.step()
        [bad] = [t for t in h.live() if h.image(t) == "broken"]
        await h.settle(fail={bad.id})
        await h.step()
        assert h.status()["State"] == "rollback_started"
        assert h.svc.spec["EndpointSpec"]["Ports"][0]["PublishedPort"] == 30800
        assert published(h.svc) == [30800]

    run(body, tmp_path, **ROLLBACK_ON_FAILURE)


def test_a_rollback_whose_ports_were_taken_meanwhile_pauses_saying_why(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        await h.store.update(_update_with_ports(h, "broken", 30801))
        other = await create(
            h.store,
            {
                **spec("other", 1),
                "EndpointSpec": {"Ports": [{"TargetPort": 80, "PublishedPort": 30800}]},
            },
        )
        await h.step()
        [bad] = [t for t in h.live() if h.image(t) == "broken"]
        await h.settle(fail={bad.id})
        await h.step()
        status = h.status()
        assert status["State"] == "paused"
        assert status["Message"] == (
            f"update paused due to failure or early termination of task {bad.id}; it cannot be "
            f"rolled back: port '30800' is already in use by service 'other' ({other.id}) as an "
            "ingress port"
        )
        # the spec and its ports stay as they were
        assert h.svc.spec["EndpointSpec"]["Ports"][0]["PublishedPort"] == 30801
        assert published(h.svc) == [30801]

    run(body, tmp_path, **ROLLBACK_ON_FAILURE)
