"""The dispatcher's assignments (orchestrator/manager/dispatcher.py), read from a real store."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from orchestrator.manager.dispatcher import Dispatcher
from orchestrator.store.objects import Node, NodeState, Task, TaskState
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
