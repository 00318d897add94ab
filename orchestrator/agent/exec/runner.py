"""The task state machine, the same for every executor (swarmkit's agent/exec `Do`).

One TaskRunner per task walks it through swarmkit's states, reporting each, while its
executor's Controller does the work:
  ACCEPTED -> PREPARING (controller.prepare: image, namespace, container; REJECTED if it fails)
  -> READY (the mesh has plugged the task's endpoints into its namespace)
  -> STARTING (controller.start; FAILED if it fails) -> RUNNING
  -> COMPLETE (exit 0) | FAILED (non-zero exit, OOM, the engine gone)
and SHUTDOWN when the managers want it stopped: it leaves the load balancers first, then gets
its stop signal and, after its grace period, SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from orchestrator.agent.exec import health
from orchestrator.agent.exec.base import (
    Controller,
    EngineUnavailable,
    Exit,
    Rejected,
    StartFailed,
    TaskInfo,
)
from orchestrator.store.objects import TaskState

log = logging.getLogger(__name__)

DRAIN_MAX = 30.0  # at most this long (and the grace period) for the load balancers to let go
KILL_WAIT = 5.0  # after SIGKILL, how long to wait for the exit to be seen


@dataclass
class Hooks:
    """What a runner needs from its agent."""

    report: Callable[[str, TaskState, str, str, dict[str, Any]], None]
    network_ready: Callable[[str], Awaitable[str | None]]  # task id -> error, None when ready


class TaskRunner:
    def __init__(
        self, hooks: Hooks, task: TaskInfo, controller: Controller, state: str, desired: str
    ):
        self.hooks = hooks
        self.task = task
        self.id = task.id
        self.controller = controller
        self.desired = TaskState.parse(desired)
        self.state = TaskState.parse(state)
        self.making_netns = False  # its namespace is being made (the agent batches mesh writes)
        self._changed = asyncio.Event()
        # the managers saw every node's load balancers let it go (a stop waits for it)
        self.drained = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def netns(self) -> str:
        return self.controller.netns

    @property
    def netns_made(self) -> bool:
        return self.controller.netns_made

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"task {self.id}")

    def update(self, desired: str, drained: bool = False) -> None:
        state = TaskState.parse(desired)
        if state != self.desired:
            self.desired = state
            self._changed.set()
        if drained:
            self.drained.set()

    @property
    def stop_wanted(self) -> bool:
        return self.desired > TaskState.RUNNING

    @property
    def done(self) -> bool:
        return self._task is not None and self._task.done()

    def _report(
        self, state: TaskState, message: str, err: str = "", container: dict[str, Any] | None = None
    ) -> None:
        if state <= self.state and state != TaskState.RUNNING:
            return
        self.state = max(self.state, state)
        self.hooks.report(self.id, state, message, err, container or {})

    async def _run(self) -> None:
        try:
            await self._lifecycle()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the task fails, the agent goes on
            log.exception("task %s failed in the executor", self.id)
            self._report(TaskState.FAILED, "executor error", str(e))

    async def _lifecycle(self) -> None:
        if self.state.terminal:
            return
        if self.state >= TaskState.ACCEPTED:
            # We knew this task before a restart of the agent, which removed what it left.
            self._report(TaskState.FAILED, "the node's agent restarted", "agent restarted")
            return
        if self.stop_wanted:
            self._report(TaskState.SHUTDOWN, "shutdown before start")
            return
        self._report(TaskState.ACCEPTED, "accepted")
        self._report(TaskState.PREPARING, "preparing")
        self.making_netns = True
        try:
            await self.controller.prepare()
        except (Rejected, EngineUnavailable) as e:
            self._report(TaskState.REJECTED, "preparing", str(e))
            return
        finally:
            self.making_netns = False
        err = await self.hooks.network_ready(self.id)
        if err is not None:
            self._report(TaskState.REJECTED, "preparing", f"network attachment failed: {err}")
            return
        self._report(TaskState.READY, "prepared")
        if self.stop_wanted:
            self._report(TaskState.SHUTDOWN, "shutdown")
            return
        self._report(TaskState.STARTING, "starting")
        try:
            status = await self.controller.start()
        except (StartFailed, EngineUnavailable) as e:
            self._report(TaskState.FAILED, "starting", str(e))
            return
        waiter = asyncio.create_task(self.controller.wait())
        check = self.controller.health_check()
        monitor = health.Monitor(check, self.controller.probe) if check is not None else None
        watcher = asyncio.create_task(monitor.run()) if monitor is not None else None
        try:
            if monitor is None:
                self._report(TaskState.RUNNING, "started", container={**status, "ExitCode": 0})
            # STARTING until its check passes (it enters the load balancers only then)
            while not waiter.done() and (watcher is None or not watcher.done()):
                events: set[asyncio.Future[Any]] = {
                    waiter,
                    asyncio.ensure_future(self._changed.wait()),
                }
                healthy = None
                if monitor is not None and self.state < TaskState.RUNNING:
                    healthy = asyncio.ensure_future(monitor.healthy.wait())
                    events.add(healthy)
                if watcher is not None:
                    events.add(watcher)
                await asyncio.wait(events, return_when=asyncio.FIRST_COMPLETED)
                for pending in events - {waiter, watcher}:
                    pending.cancel()
                self._changed.clear()
                if healthy is not None and monitor is not None and monitor.healthy.is_set():
                    self._report(TaskState.RUNNING, "started", container={**status, "ExitCode": 0})
                if self.stop_wanted and not waiter.done():
                    end = await self._stop(waiter)
                    self._report(
                        TaskState.SHUTDOWN, "shutdown", container=self._status(status, end)
                    )
                    return
            if watcher is not None and watcher.done() and not waiter.done():
                # unhealthy: Docker kills it and the task fails; the restart policy replaces it
                with contextlib.suppress(EngineUnavailable):
                    await self.controller.kill()
                with contextlib.suppress(TimeoutError, EngineUnavailable):
                    end = await asyncio.wait_for(asyncio.shield(waiter), KILL_WAIT)
                self._report(
                    TaskState.FAILED,
                    "unhealthy",
                    health.UNHEALTHY,
                    container=self._status(status, waiter.result() if waiter.done() else None),
                )
                return
            try:
                end = waiter.result()
            except EngineUnavailable as e:
                self._report(TaskState.FAILED, "running", str(e))
                return
        finally:
            waiter.cancel()
            if watcher is not None:
                watcher.cancel()
                if watcher.done() and not watcher.cancelled():
                    watcher.exception()  # Unhealthy: reported above, not an unretrieved error
        container = self._status(status, end)
        if end.code == 0:
            self._report(TaskState.COMPLETE, "finished", container=container)
        else:
            err = end.describe(self.task.spec.limits.memory_bytes)
            self._report(TaskState.FAILED, "started", err, container=container)

    @staticmethod
    def _status(started: dict[str, Any], end: Exit | None) -> dict[str, Any]:
        return {**started, "PID": 0, "ExitCode": end.code if end is not None else -9}

    async def _stop(self, waiter: asyncio.Task[Exit]) -> Exit | None:
        """Once no load balancer on any node sends it new connections (the managers say so,
        or DRAIN_MAX passed), its stop signal, then SIGKILL after the grace period; how it
        ended."""
        wait = min(DRAIN_MAX, self.task.spec.stop_grace / 1e9)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.drained.wait(), wait)
        if not self.drained.is_set():
            log.warning("task %s: stopping before every node's mesh let it go", self.id)
        with contextlib.suppress(EngineUnavailable):
            await self.controller.terminate()
        with contextlib.suppress(TimeoutError, EngineUnavailable):
            await asyncio.wait_for(asyncio.shield(waiter), self.task.spec.stop_grace / 1e9)
        if not waiter.done():
            with contextlib.suppress(EngineUnavailable):
                await self.controller.kill()
            with contextlib.suppress(TimeoutError, EngineUnavailable):
                await asyncio.wait_for(asyncio.shield(waiter), KILL_WAIT)
        if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
            return waiter.result()
        return None

    async def remove(self) -> None:
        """Stop it if it runs (gracefully) and release what it holds on the node."""
        if self._task is not None and not self._task.done():
            if self.state >= TaskState.STARTING:
                self.drained.set()  # gone from the managers' view (or the agent stops)
                self.desired = TaskState.SHUTDOWN
                self._changed.set()
                grace = self.task.spec.stop_grace / 1e9
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        asyncio.shield(self._task), DRAIN_MAX + grace + KILL_WAIT + 3
                    )
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.controller.remove()
