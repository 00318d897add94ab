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
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

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

DRAIN_DELAY = 1.0  # between leaving the load balancers and the stop signal
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
        self._task: asyncio.Task[None] | None = None

    @property
    def netns(self) -> str:
        return self.controller.netns

    @property
    def netns_made(self) -> bool:
        return self.controller.netns_made

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"task {self.id}")

    def update(self, desired: str) -> None:
        state = TaskState.parse(desired)
        if state != self.desired:
            self.desired = state
            self._changed.set()

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
        self._report(TaskState.RUNNING, "started", container={**status, "ExitCode": 0})
        waiter = asyncio.create_task(self.controller.wait())
        try:
            while not waiter.done():
                changed = asyncio.create_task(self._changed.wait())
                await asyncio.wait({waiter, changed}, return_when=asyncio.FIRST_COMPLETED)
                changed.cancel()
                self._changed.clear()
                if self.stop_wanted and not waiter.done():
                    end = await self._stop(waiter)
                    self._report(
                        TaskState.SHUTDOWN, "shutdown", container=self._status(status, end)
                    )
                    return
            try:
                end = waiter.result()
            except EngineUnavailable as e:
                self._report(TaskState.FAILED, "running", str(e))
                return
        finally:
            waiter.cancel()
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
        """Its stop signal, then SIGKILL after the grace period; how it ended."""
        await asyncio.sleep(DRAIN_DELAY)  # let load balancers stop sending it connections
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
            if self.state == TaskState.RUNNING:
                self.desired = TaskState.SHUTDOWN
                self._changed.set()
                grace = self.task.spec.stop_grace / 1e9
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        asyncio.shield(self._task), DRAIN_DELAY + grace + KILL_WAIT + 3
                    )
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.controller.remove()


def signal_number(name: str) -> int:
    """SIGTERM, TERM, 15 -> 15 (the spec's StopSignal; validated at create)."""
    if not name:
        return int(signal.SIGTERM)
    if name.isdigit():
        return int(name)
    upper = name.upper()
    try:
        return int(signal.Signals[upper if upper.startswith("SIG") else f"SIG{upper}"])
    except KeyError:  # refused at create; a spec from before that check
        return int(signal.SIGTERM)
