"""The dispatcher's assignments (orchestrator/manager/dispatcher.py), read from a real store."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

from orchestrator.manager.dispatcher import MISSED_BEATS, Dispatcher
from orchestrator.store.objects import Cluster, Node, NodeState, Task, TaskState
from orchestrator.store.store import Tx
from tests.test_manager import cluster, create, spec


def test_a_stopping_task_is_drained_once_every_ready_node_applied_its_stop(
    tmp_path: Path,
) -> None:
    """Including a ready node between two sessions (its mesh still balances over its last
    view) and not a node that is down (it balances nothing)."""

    async def run() -> None:
        store, _ = await cluster(tmp_path)  # node0..node2, all ready
        svc = await create(store, spec("web", 1))

        def stop(tx: Tx) -> Task:
            task = Task(
                id="t1",
                service_id=svc.id,
                slot=1,
                node_id="node0",
                state=TaskState.RUNNING,
                desired_state=TaskState.SHUTDOWN,
            )
            tx.put(task)
            node2 = tx.get(Node, "node2")
            assert node2 is not None
            tx.put(dataclasses.replace(node2, state=NodeState.DOWN))
            return task

        await store.update(stop)
        task = store.get(Task, "t1")
        assert task is not None
        dispatcher = Dispatcher(store)

        def drained() -> bool:
            (mine,) = dispatcher.assignment("node0")["tasks"]
            return bool(mine.get("drained"))

        dispatcher._sessions["node0"] = asyncio.Queue()  # node1 has none: it is reconnecting
        dispatcher._applied["node0"] = task.meta.version
        assert not drained(), "node1 still balances over a view with t1 in it"
        dispatcher._applied["node1"] = task.meta.version - 1
        assert not drained()
        dispatcher._applied["node1"] = task.meta.version
        assert drained(), "node2 is down: nobody else balances over t1"

    asyncio.run(run())


def test_a_node_that_just_joined_gets_a_grace_period_and_a_silent_one_goes_down(
    tmp_path: Path,
) -> None:
    async def run() -> None:
        store, _ = await cluster(tmp_path, nodes=0)
        period = 0.5  # s: three missed heartbeats take 1.5 s, far more than a late wake-up

        def setup(tx: Tx) -> None:
            spec = {"Dispatcher": {"HeartbeatPeriod": int(period * 1e9)}}
            tx.put(Cluster(id="c", spec=spec))

        await store.update(setup)
        dispatcher = Dispatcher(store)
        dispatcher.start()
        try:
            await asyncio.sleep(period * MISSED_BEATS * 1.1)  # the leader has led a while

            def join(tx: Tx) -> None:
                tx.put(Node(id="new", hostname="sw9", state=NodeState.READY))

            await store.update(join)
            await asyncio.sleep(period * MISSED_BEATS * 0.6)
            node = store.get(Node, "new")
            assert node is not None and node.state == NodeState.READY, "no grace"
            await asyncio.sleep(period * MISSED_BEATS * 1.2)
            node = store.get(Node, "new")
            assert node is not None and node.state == NodeState.DOWN, "still up, unheard"
        finally:
            await dispatcher.stop()

    asyncio.run(run())


def test_a_manager_that_stalled_does_not_blame_the_nodes(tmp_path: Path) -> None:
    """The manager's event loop (or its whole machine) stops for longer than the heartbeat
    grace: when it runs again, the monitor comes first, before the heartbeats queued
    meanwhile. The node beat just before the stall and beats again after it: it stays ready
    (the grace measures the manager's progress, not the wall clock). A node that stays silent
    once the manager runs again still goes down."""

    async def run() -> None:
        store, _ = await cluster(tmp_path, nodes=0)
        period = 0.5

        def setup(tx: Tx) -> None:
            tx.put(Cluster(id="c", spec={"Dispatcher": {"HeartbeatPeriod": int(period * 1e9)}}))
            tx.put(Node(id="busy", hostname="sw1", state=NodeState.READY))
            tx.put(Node(id="quiet", hostname="sw2", state=NodeState.READY))

        await store.update(setup)
        dispatcher = Dispatcher(store)
        dispatcher.start()
        stalled = asyncio.Event()

        async def beats() -> None:
            while True:
                dispatcher.beat("busy")
                if not stalled.is_set():
                    await asyncio.sleep(period)  # the monitor's timer runs out meanwhile
                    dispatcher.beat("busy")
                    time.sleep(period * MISSED_BEATS * 2)  # noqa: ASYNC251 - the loop stops
                    stalled.set()
                await asyncio.sleep(period)

        beating = asyncio.create_task(beats())
        try:
            await stalled.wait()
            await asyncio.sleep(period * 0.6)  # a look of the monitor's at least
            busy, quiet = store.get(Node, "busy"), store.get(Node, "quiet")
            assert busy is not None and busy.state == NodeState.READY, "blamed for the stall"
            assert quiet is not None and quiet.state == NodeState.READY, "blamed for the stall"
            await asyncio.sleep(period * MISSED_BEATS * 1.2)
            busy, quiet = store.get(Node, "busy"), store.get(Node, "quiet")
            assert busy is not None and busy.state == NodeState.READY, busy
            assert quiet is not None and quiet.state == NodeState.DOWN, "still up, unheard"
        finally:
            beating.cancel()
            await dispatcher.stop()

    asyncio.run(run())


def test_task_states_whose_write_failed_are_written_again(tmp_path: Path) -> None:
    """A batch of reports whose write the log refused (managers too busy to commit in time,
    or no leader for a moment) is kept and written once it can be; the writer once died with
    the first refusal, and every task's state froze where it was."""

    async def run() -> None:
        store, _ = await cluster(tmp_path)
        svc = await create(store, spec("web", 1))

        def place(tx: Tx) -> None:
            tx.put(
                Task(
                    id="t1",
                    service_id=svc.id,
                    slot=1,
                    node_id="node0",
                    state=TaskState.ASSIGNED,
                    desired_state=TaskState.RUNNING,
                )
            )

        await store.update(place)
        dispatcher = Dispatcher(store)
        dispatcher.start(term=store.log.term + 100)  # a term it does not lead: refused
        try:
            dispatcher._updates.append(("node0", {"id": "t1", "state": "running"}))
            await asyncio.sleep(0.5)
            task = store.get(Task, "t1")
            assert task is not None and task.state == TaskState.ASSIGNED
            dispatcher.term = store.log.term  # it can write again
            for _ in range(60):
                task = store.get(Task, "t1")
                if task is not None and task.state == TaskState.RUNNING:
                    break
                await asyncio.sleep(0.1)
            assert task is not None and task.state == TaskState.RUNNING, "the report was lost"
        finally:
            await dispatcher.stop()

    asyncio.run(run())
