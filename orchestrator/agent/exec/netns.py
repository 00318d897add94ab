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


async def remove_namespace(name: str) -> None:
    """Kill every process in the namespace, and remove it with its /etc/netns files."""
    for pid in await asyncio.to_thread(processes_in, [name]):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    await run_quietly("ip", "netns", "del", name)
    await asyncio.to_thread(shutil.rmtree, ETC_NETNS / name, True)


async def remove_leftover_namespaces(prefix: str) -> list[str]:
    """The task namespaces an earlier shoald left (it was killed, or the node crashed), their
    processes killed: every task runs once, under this shoald; the managers' assignments start
    them again. Returns the namespaces removed."""
    names = await asyncio.to_thread(task_namespaces, prefix)
    for name in names:
        await remove_namespace(name)
    return names
