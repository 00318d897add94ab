"""Task namespaces removed together (orchestrator/agent/exec/netns.py, NamespaceRemover)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time

from mesh.netns import list_netns, processes_in
from orchestrator.agent.exec.netns import NamespaceRemover, netns_name

PREFIX = "ttns"
COUNT = 40


def test_namespaces_asked_for_together_go_with_every_process_in_them() -> None:
    names = [netns_name(PREFIX, f"{i:012d}") for i in range(COUNT)]
    sleepers = []
    try:
        for name in names:
            subprocess.run(["ip", "netns", "add", name], check=True)
            sleepers.append(subprocess.Popen(["ip", "netns", "exec", name, "sleep", "600"]))
        deadline = time.monotonic() + 10
        while len(processes_in(names)) < COUNT:
            assert time.monotonic() < deadline, "the sleepers did not start"
            time.sleep(0.05)
        untouched = netns_name(PREFIX, "x" * 12)
        subprocess.run(["ip", "netns", "add", untouched], check=True)

        async def remove() -> float:
            remover = NamespaceRemover()
            start = time.monotonic()
            await asyncio.gather(*(remover.remove(name) for name in names))
            await remover.remove(names[0])  # again, once gone: nothing to do, no error
            return time.monotonic() - start

        took = asyncio.run(remove())
        left = set(list_netns())
        assert not left & set(names), sorted(left & set(names))
        assert untouched in left, "a namespace nobody asked for was removed"
        for sleeper in sleepers:
            assert sleeper.wait(5) == -9, "a process in a removed namespace lives on"
        print(f"{COUNT} namespaces and their processes removed in {took:.2f} s")
    finally:
        for p in sleepers:
            p.kill()
            p.wait()
        for name in [*names, netns_name(PREFIX, "x" * 12)]:
            if name in list_netns():
                subprocess.run(["ip", "netns", "del", name], check=False)
        for name in names:
            assert not os.path.exists(f"/etc/netns/{name}")
