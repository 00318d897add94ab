"""How long a task waits for its network (orchestrator/agent/meshfeed.py, MeshFeed.wait):
as long as shoal-mesh makes progress, including one long sync of the task's own state."""

from __future__ import annotations

import asyncio
from pathlib import Path

from mesh.state import Applied, write_applied
from orchestrator.agent.meshfeed import MeshFeed

WITHIN = 0.3  # s without progress that fail a task (30 s in shoald)


def _feed(tmp_path: Path) -> MeshFeed:
    return MeshFeed(tmp_path / "state.json", tmp_path / "run", "n1", "192.168.0.1")


def test_a_long_sync_of_the_tasks_state_is_progress(tmp_path: Path) -> None:
    """A node given a thousand endpoints at once synced them for 35 s: every task waiting
    on that sync was rejected at 30 s. The mesh says which generation it is applying."""
    run = tmp_path / "run"

    async def run_it() -> str | None:
        feed = _feed(tmp_path)
        write_applied(run, Applied(5))
        waiting = asyncio.create_task(feed.wait(6, "t1", within=WITHIN))
        await asyncio.sleep(WITHIN / 3)
        write_applied(run, Applied(5, applying=6))
        await asyncio.sleep(WITHIN * 4)  # the sync takes four deadlines
        assert not waiting.done(), waiting.result()
        write_applied(run, Applied(6))
        return await asyncio.wait_for(waiting, 5)

    assert asyncio.run(run_it()) is None


def test_no_progress_fails_the_task_and_says_so(tmp_path: Path) -> None:
    run = tmp_path / "run"

    async def run_it() -> str | None:
        write_applied(run, Applied(5, applying=5))  # busy, but with an older state
        return await asyncio.wait_for(_feed(tmp_path).wait(6, "t1", within=WITHIN), 5)

    assert asyncio.run(run_it()) == (
        "the node's mesh applied nothing for 0 s while the task waited for its network"
    )


def test_an_error_about_the_task_is_its_answer(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_applied(run, Applied(7, {"endpoint web.1.t1x on ingress": "no namespace"}))

    async def run_it() -> str | None:
        return await _feed(tmp_path).wait(6, "t1x", within=WITHIN)

    assert asyncio.run(run_it()) == "endpoint web.1.t1x on ingress: no namespace"
