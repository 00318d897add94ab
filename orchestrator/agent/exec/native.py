"""The native executor: a task's command, with this machine's own programs, in its own
network, UTS, PID and mount namespaces. For nodes without a container engine
(docs/native-executor.md).

The process: `ip netns exec <ns> unshare --uts --pid --fork --mount-proc sh -c ...`: `ip netns
exec` enters the task's network namespace and bind-mounts /etc/netns/<ns>/{resolv.conf,hosts}
(nameserver 127.0.0.11, the task's hostname); unshare gives it its own hostname, PID 1 and
/proc. stdout and stderr go to the task's log, <data-root>/tasks/<id>/log.jsonl.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from orchestrator.agent import images, logs
from orchestrator.agent.exec import health
from orchestrator.agent.exec.base import Exit, LogEntry, Rejected, StartFailed, TaskInfo
from orchestrator.agent.exec.health import Check
from orchestrator.agent.exec.netns import (
    ETC_NETNS,
    NamespaceRemover,
    netns_name,
)
from orchestrator.agent.exec.process import Child, run_quietly
from orchestrator.agent.logs import TaskLog
from orchestrator.manager.spec import signal_number
from orchestrator.manager.templates import expand

_LAUNCH = 'echo "$0" > /proc/sys/kernel/hostname && exec "$@"'
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class NativeExecutor:
    kind = "native"

    def __init__(self, netns_prefix: str, data_dir: Path):
        self.netns_prefix = netns_prefix
        self.data_dir = data_dir  # <data-root>/tasks: a directory per task, its log
        self.logs_open: dict[str, TaskLog] = {}  # the logs of running tasks, for --follow
        self.namespaces = NamespaceRemover()

    async def start(self, node_id: str) -> None:
        await self.namespaces.remove_leftovers(self.netns_prefix)

    async def close(self) -> None:
        pass

    def controller(self, task: TaskInfo) -> NativeController:
        return NativeController(self, task)

    def description(self) -> dict[str, Any]:
        return {"executor": self.kind, "images": images.known()}

    def info(self) -> dict[str, Any]:
        return {"OperatingSystem": "Shoal (native executor)", "Driver": "native"}

    def health(self) -> str | None:
        return None

    async def logs(
        self, task_id: str, tail: int | None, since_ns: int, follow: bool
    ) -> AsyncIterator[LogEntry]:
        path = self.log_path(task_id)
        lines = await asyncio.to_thread(logs.read_lines, path, tail, since_ns)
        for e in lines:
            yield LogEntry(int(e.get("t", 0)), int(e.get("s", 1)), str(e.get("l", "")))
        if follow:
            offset = len(await asyncio.to_thread(logs.read_lines, path))
            async for e in logs.follow(path, self.logs_open.get(task_id), offset):
                yield LogEntry(int(e.get("t", 0)), int(e.get("s", 1)), str(e.get("l", "")))

    async def distribution(self, image: str, auth: str) -> dict[str, Any]:
        raise LookupError(
            f"image {image}: this node runs the native executor, which has no registry; "
            "nodes run it by name"
        )

    def log_path(self, task_id: str) -> Path:
        return self.data_dir / task_id / "log.jsonl"

    async def sweep(self, keep: set[str]) -> None:
        if not self.data_dir.is_dir():
            return
        for d in await asyncio.to_thread(lambda: list(self.data_dir.iterdir())):
            if d.name not in keep and d.name not in self.logs_open:
                await asyncio.to_thread(shutil.rmtree, d, True)


class NativeController:
    def __init__(self, executor: NativeExecutor, task: TaskInfo):
        self.executor = executor
        self.task = task
        self._netns = netns_name(executor.netns_prefix, task.id)
        self._netns_made = False
        self.proc: Child | None = None
        self.log: TaskLog | None = None
        self.argv: list[str] = []
        self._pumps: list[asyncio.Task[None]] = []

    @property
    def netns(self) -> str:
        return self._netns

    @property
    def netns_made(self) -> bool:
        return self._netns_made

    @property
    def hostname(self) -> str:
        given = self.task.spec.hostname
        return expand(given, self.task.template_context) if given else self.task.id[:12]

    async def prepare(self) -> None:
        spec = self.task.spec
        try:
            cmd = images.command(spec.image, spec.command, spec.args)
        except images.UnknownImage as e:
            raise Rejected(str(e)) from None
        if not shutil.which(cmd.argv[0]) and not os.path.isabs(cmd.argv[0]):
            raise Rejected(f"executable {cmd.argv[0]!r} not found on this node")
        self.argv = list(cmd.argv)
        # Not blocking the loop: the tasks of an assignment make their namespaces together.
        if await run_quietly("ip", "netns", "add", self._netns) != 0:
            raise Rejected(f"cannot create network namespace {self._netns}")
        self._netns_made = True
        await asyncio.to_thread(self._write_etc)

    def _write_etc(self) -> None:
        """Its resolv.conf, hosts and hostname (small files)."""
        etc = ETC_NETNS / self._netns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text("nameserver 127.0.0.11\noptions ndots:0\n")
        ips = self.task.ips
        (etc / "hosts").write_text(
            "127.0.0.1\tlocalhost\n" + (f"{ips[0]}\t{self.hostname}\n" if ips else "")
        )
        (etc / "hostname").write_text(self.hostname + "\n")

    async def start(self) -> dict[str, Any]:
        env = {"PATH": PATH, "HOSTNAME": self.hostname, "HOME": "/root"}
        for entry in images.valid_env(self.task.spec.env):
            key, _, value = entry.partition("=")
            env[key] = expand(value, self.task.template_context)
        self.log = TaskLog(self.executor.log_path(self.task.id))
        self.executor.logs_open[self.task.id] = self.log
        try:
            self.proc = await Child.start(
                "ip",
                "netns",
                "exec",
                self._netns,
                "unshare",
                "--uts",
                "--pid",
                "--fork",
                "--mount-proc",
                "sh",
                "-c",
                _LAUNCH,
                self.hostname,
                *self.argv,
                env=env,
                start_new_session=True,
                cwd=self.task.spec.dir or "/",
            )
        except OSError as e:
            self._close_log()
            raise StartFailed(f"starting {self.argv[0]}: {e}") from None
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._pumps = [
            asyncio.create_task(self.log.pump(1, self.proc.stdout)),
            asyncio.create_task(self.log.pump(2, self.proc.stderr)),
        ]
        return {"ContainerID": self.task.id, "PID": self.proc.pid}

    def health_check(self) -> Check | None:
        return health.resolve(self.task.spec.healthcheck, None)

    async def probe(self, argv: list[str]) -> int:
        """The command in the task's namespaces: those of the process unshare started."""
        if self.proc is None:
            return -1
        inner = await asyncio.to_thread(_child, self.proc.pid)
        if inner is None:
            return -1
        child = await Child.start(
            "nsenter",
            f"--target={inner}",
            "--net",
            "--uts",
            "--pid",
            "--mount",
            "--",
            *argv,
            pipes=False,
            env={"PATH": PATH},
        )
        try:
            return await child.wait()
        except asyncio.CancelledError:  # its timeout ran out
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGKILL)
            raise

    async def wait(self) -> Exit:
        assert self.proc is not None
        code = await self.proc.wait()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        self._close_log()
        return Exit(code if code >= 0 else 128 - code)

    async def terminate(self) -> None:
        self._signal(signal_number(self.task.spec.stop_signal or "SIGTERM"))

    async def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, signum: int) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signum)

    def _close_log(self) -> None:
        if self.log is not None:
            self.log.close()
            self.executor.logs_open.pop(self.task.id, None)

    async def remove(self) -> None:
        self._signal(signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 5)
        for pump in self._pumps:
            pump.cancel()
        self._close_log()
        await self.executor.namespaces.remove(self._netns)
        self._netns_made = False


def _child(pid: int) -> int | None:
    """The first child of a process (unshare's: the task's own first process), if any."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(text[0]) if text else None
