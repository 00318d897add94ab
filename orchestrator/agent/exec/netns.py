"""Task network namespaces, shared by the executors: named `<node prefix>-<task id[:12]>`
under /run/netns, where the mesh finds and plugs them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
from pathlib import Path

from mesh.netns import list_netns, processes_in
from orchestrator.agent.exec.process import run_quietly

# `ip netns exec` bind-mounts /etc/netns/<ns>/* over /etc (the native executor's resolv.conf,
# hosts and hostname)
ETC_NETNS = Path("/etc/netns")


def netns_name(prefix: str, task_id: str) -> str:
    return f"{prefix}-{task_id[:12]}"


def task_namespaces(prefix: str) -> list[str]:
    """The task namespaces of a node, by the shape of their names (netns_name's, and only it)."""
    shape = re.compile(rf"{re.escape(prefix)}-[0-9a-z]{{12}}")
    return [n for n in list_netns() if shape.fullmatch(n)]


class NamespaceRemover:
    """Removes task namespaces, killing every process in them first; the namespaces asked
    for together go in one pass, with one look through /proc for all of them. A look costs
    what the node runs: at a thousand tasks, one look per namespace took seconds of CPU."""

    def __init__(self) -> None:
        self._asked: dict[str, asyncio.Future[None]] = {}
        self._pass: asyncio.Task[None] | None = None

    async def remove(self, name: str) -> None:
        """Kill every process in the namespace, and remove it with its /etc/netns files."""
        done = self._asked.get(name)
        if done is None:
            done = self._asked[name] = asyncio.get_running_loop().create_future()
        if self._pass is None or self._pass.done():
            self._pass = asyncio.create_task(self._remove_asked())
        await asyncio.shield(done)

    async def _remove_asked(self) -> None:
        await asyncio.sleep(0)  # those asked for in this turn of the loop come along
        while self._asked:
            batch, self._asked = self._asked, {}
            try:
                for pid in await asyncio.to_thread(processes_in, list(batch)):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                for name in batch:
                    await run_quietly("ip", "netns", "del", name)
                    await asyncio.to_thread(shutil.rmtree, ETC_NETNS / name, True)
            finally:
                for done in batch.values():
                    if not done.done():
                        done.set_result(None)

    async def remove_leftovers(self, prefix: str) -> list[str]:
        """The task namespaces an earlier shoald left (it was killed, or the node crashed),
        their processes killed: every task runs once, under this shoald; the managers'
        assignments start them again. Returns the namespaces removed."""
        names = await asyncio.to_thread(task_namespaces, prefix)
        await asyncio.gather(*(self.remove(name) for name in names))
        return names
