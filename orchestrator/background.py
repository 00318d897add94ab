"""The shape of every control loop: one asyncio task, from start() until stop()."""

from __future__ import annotations

import asyncio
import contextlib


class BackgroundLoop:
    """Subclasses write `_run`; `stop` cancels it and waits for it to end."""

    task_name = "loop"
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.task_name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        raise NotImplementedError
