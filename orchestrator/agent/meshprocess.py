"""The node's shoal-mesh process, supervised by shoald: restarted if it dies, woken for each
new state, and (on `swarm leave`) asked to remove the data plane it made."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

from mesh.state import applied_path

log = logging.getLogger(__name__)


class MeshProcess:
    """The node's shoal-mesh, restarted if it dies."""

    def __init__(self, state: Path, run_dir: Path, lb_backend: str):
        self.state, self.run_dir = state, run_dir
        # shoald serves the node's :9323 and reads the mesh's metrics here (orchestrator/metrics.py)
        self.metrics_socket = run_dir / "metrics.sock"
        self.cmd = [
            sys.executable,
            "-m",
            "mesh.cli",
            "run",
            "--state",
            str(state),
            "--run-dir",
            str(run_dir),
            "--metrics-socket",
            str(self.metrics_socket),
            "--lb-backend",
            lb_backend,
        ]
        self.proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._started_at = 0.0

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise())

    def nudge(self) -> None:
        """Wake shoal-mesh now for a new state (SIGHUP) rather than at its next poll of the
        file. Only once it has synced since it started: before, SIGHUP would kill it."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        try:
            if applied_path(self.run_dir).stat().st_mtime < self._started_at:
                return
        except OSError:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGHUP)

    async def _supervise(self) -> None:
        backoff = 0.5
        log_path = self.run_dir / "shoal-mesh.log"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        while True:
            out = await asyncio.to_thread(open, log_path, "ab")
            with out:
                self._started_at = time.time()
                self.proc = await asyncio.create_subprocess_exec(
                    *self.cmd, stdout=out, stderr=out, start_new_session=True
                )
            code = await self.proc.wait()
            log.warning(
                "shoal-mesh exited with %s; restarting in %.1f s (log: %s)", code, backoff, log_path
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10)

    async def stop(self, cleanup: bool) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 10)
        if cleanup:
            await asyncio.to_thread(
                subprocess.run,
                [
                    sys.executable,
                    "-m",
                    "mesh.cli",
                    "cleanup",
                    "--state",
                    str(self.state),
                    "--run-dir",
                    str(self.run_dir),
                ],
                capture_output=True,
            )
