"""Feeding the node's shoal-mesh: the mesh state from the managers plus where local tasks live.

The dispatcher sends the node's mesh state (docs/mesh-state.md) without local namespaces; the
agent adds the namespace of each local task whose namespace exists, writes the file atomically,
and can wait until shoal-mesh reports that generation applied (`<run-dir>/applied`).
It edits the document as the dispatcher wrote it (`mesh.state.state_to_dict`) rather than
parsing it into a `MeshState`: it only adds namespaces, and shoal-mesh validates what it reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mesh.state import FORMAT_VERSION, Applied, read_applied

POLL = 0.05
# How long one sync of shoal-mesh's may take, once it works on a task's state, before the
# task is rejected: a node given a thousand endpoints at once takes tens of seconds, and a sync
# that never ends is a stuck mesh.
BUSY_MAX = 600.0
KEEP_INDEXES = 64


class MeshFeed:
    def __init__(self, state_path: Path, run_dir: Path, node_id: str, addr: str):
        self.state_path = state_path
        self.run_dir = run_dir
        self._view: dict[str, Any] = {
            "version": FORMAT_VERSION,
            "node": node_id,
            "generation": 0,
            "peers": {node_id: addr},
        }
        # Generations only grow, across restarts too: they start at the clock in ms.
        self._generation = time.time_ns() // 1_000_000
        self._written: dict[str, Any] | None = None
        # the store index (the view's generation) each written generation carries, newest last
        self._indexes: dict[int, int] = {}
        self._applied: Applied | None = None  # shoal-mesh's last report, as last read
        self._applied_at = 0.0
        self._applied_changed = asyncio.Event()  # set (and replaced) when the report changes
        self._waiters = 0  # tasks waiting for their network
        self._watcher: asyncio.Task[None] | None = None
        # Called after each new state is written (the node wakes shoal-mesh with it rather
        # than leaving the change to its next poll of the file).
        self.on_write: Callable[[], None] | None = None

    def update(self, view: dict[str, Any] | None, netns_of: Callable[[str], str | None]) -> int:
        """Write the state (the latest view, with local namespaces); returns its generation."""
        if view is not None:
            self._view = view
        endpoints = []
        for given in self._view.get("endpoints", []):
            ep = {k: v for k, v in given.items() if k != "netns"}
            if ep.get("node") == self._view["node"]:
                netns = netns_of(str(ep.get("task", "")).rsplit(".", 1)[-1])
                if netns is not None:
                    ep["netns"] = netns
            endpoints.append(ep)
        doc = {**self._view, "endpoints": endpoints}
        comparable = {k: v for k, v in doc.items() if k != "generation"}
        if self._written == comparable:
            return self._generation
        self._generation += 1
        doc["generation"] = self._generation
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        # it may hold the encrypted overlays' keys: readable by root only
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # a leftover from a crash may have been made otherwise
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(doc, indent=1))
        tmp.replace(self.state_path)
        self._written = comparable
        self._indexes[self._generation] = int(self._view.get("generation") or 0)
        while len(self._indexes) > KEEP_INDEXES:
            del self._indexes[next(iter(self._indexes))]
        if self.on_write is not None:
            self.on_write()
        return self._generation

    def _read_applied(self) -> Applied:
        """shoal-mesh's last report, read at most once per POLL however many ask."""
        now = time.monotonic()
        if self._applied is None or now - self._applied_at >= POLL:
            applied, self._applied_at = read_applied(self.run_dir), now
            if applied != self._applied:
                self._applied = applied
                self._applied_changed.set()  # wakes every waiter
                self._applied_changed = asyncio.Event()
        assert self._applied is not None
        return self._applied

    async def _watch_applied(self) -> None:
        """While tasks wait for their network, one reader of shoal-mesh's report for them all:
        a thousand tasks polling it each (20 reads and wake-ups a second apiece) held the
        daemon's event loop for seconds, and its heartbeats and API with it."""
        while self._waiters:
            self._read_applied()
            await asyncio.sleep(POLL)

    def _errors_about(self, task_id: str, applied: Applied) -> str | None:
        """The errors naming the task, or one of its networks (an encrypted network the node
        refuses to attach leaves the task without it); None: none."""
        if not applied.errors:
            return None
        nets = {
            f"network {ep.get('network')}"
            for ep in self._view.get("endpoints", [])
            if task_id in str(ep.get("task", ""))
        }
        mine = [
            f"{k}: {v}"
            for k, v in applied.errors.items()
            if task_id in k or task_id[:12] in k or k in nets
        ]
        return "; ".join(mine) or None

    def applied_index(self) -> int:
        """The store index of the newest view shoal-mesh has applied (-1: none known): every
        task that left the load balancers at or before it has left them on this node."""
        applied = self._read_applied().balanced
        done = [index for gen, index in self._indexes.items() if gen <= applied]
        return max(done) if done else -1

    async def wait(self, generation: int, task_id: str, within: float = 30.0) -> str | None:
        """None once shoal-mesh applied the generation without an error about the task. The
        deadline is about progress: it moves on whenever shoal-mesh starts or finishes a sync
        (a busy node applies older generations first), a sync of this generation (or a newer
        one) may run for up to BUSY_MAX, and only `within` s without any of that fail the
        task."""
        now = time.monotonic()
        deadline = now + within
        applied = self._read_applied()
        last, since = (applied.generation, applied.applying), now
        self._waiters += 1
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._watch_applied())
        try:
            while True:
                changed = self._applied_changed
                now = time.monotonic()
                applied = self._read_applied()
                if (applied.generation, applied.applying) != last:
                    last, since = (applied.generation, applied.applying), now
                    deadline = now + within
                if applied.generation >= generation:
                    return self._errors_about(task_id, applied)
                working = applied.applying >= generation and now - since < BUSY_MAX
                if now >= deadline and not working:
                    break
                left = (since + BUSY_MAX if working else deadline) - now
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), max(left, POLL))
        finally:
            self._waiters -= 1
        if applied.applying >= generation:
            return f"the node's mesh was still applying the task's network after {BUSY_MAX:.0f} s"
        return (
            f"the node's mesh applied nothing for {within:.0f} s while the task waited for "
            "its network"
        )
